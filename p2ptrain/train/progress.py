"""The swarm's progress as hivemind's ``ProgressTracker`` reads it, without believing one record's claims.

hivemind's tracker reads every peer's progress record (``<run>_progress``: its epoch, the samples it accumulated
since the global step, its samples per second, when it wrote that) and takes the swarm's global step as the
*largest* epoch any training peer's record claims, and the samples towards the next step as the *sum* of the claims
at that epoch, extrapolated by each record's rate since its time. The records are signed (each under its writer's
RSA key, hivemind's ``RSASignatureValidator``), but anyone can sign their own: one record claiming epoch 10⁹ makes
every peer believe it is behind, and each downloads the swarm's state at every step instead of training; one
claiming a whole batch of samples, or a huge rate, makes every peer end the global step at once, on a fraction of
the batch.

``plausible`` leaves such claims out before hivemind's rules run, judging each record against the others, as the
aggregation does (``robust.py``):

- **epoch**: a training peer's record whose epoch is more than ``EPOCH_SLACK`` beyond the median epoch of the training
  peers' records is left out (a new peer at epoch 0 is below the median, not above);
- **samples per second**: counted up to ``RATE_BOUND`` × the records' median rate;
- **samples accumulated**: counted up to the larger of ``RATE_BOUND`` × the median claim at that epoch and an even
  share of the target batch (``target / training peers``), so a fast honest peer still counts for what it did;
- **time**: counted as at most ``max_age_s`` old (hivemind's record lifetime) and never in the future.

Each record left out or cut is logged at WARNING, at most once a minute per record (its signing key). The medians
are the upper ones (with two records, the other peer's claim is believed: a new peer must be able to catch up with the
one it joins), so the bounds hold while honest records are the majority of those read.

Before that, ``bound_to_signers`` keeps only records signed by the peer they name: a p2ptrain peer signs its record
with its libp2p identity key (``signs_with``), so the key in the record's subkey hashes to the record's peer id. A
stranger can still sign records of its own, one per key it makes (a Sybil: the medians above are what bounds it in an
open swarm), but not in another peer's name; and in a private swarm only the records of peers whose pass (published
under ``passes_key``) checks out count, so a stranger without a join token moves nobody's progress.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time

from p2ptrain.compat.hivemind import ProgressTracker, record_signing_key
from p2ptrain.swarm.admission import Admission
from p2ptrain.swarm.discovery import admitted_peers
from p2ptrain.swarm.identity import peer_id_of

logger = logging.getLogger(__name__)

EPOCH_SLACK = 2  # peers one global step ahead of the others are normal: the first ones to step
RATE_BOUND = 10.0
WARN_EVERY_S = 60.0
PASSES_EVERY_S = 30.0  # a private swarm's passes are read again this often, or sooner for a record from a new peer
PASSES_SOON_S = 5.0  # for one peer not admitted (a stranger's records do not make every read a DHT lookup)
OWNER = re.compile(rb"\[owner:(ssh-rsa [A-Za-z0-9+/=]+)\]")  # hivemind's subkey of a record signed by its writer


@functools.lru_cache(maxsize=4096)
def signer_of(subkey: Any) -> str | None:
    """The peer id of the RSA key that signed a progress record (its subkey names the key), or None."""
    match = OWNER.fullmatch(subkey) if isinstance(subkey, bytes) else None
    if match is None:
        return None
    try:
        public = serialization.load_ssh_public_key(match.group(1))
    except (ValueError, TypeError):
        return None
    if not isinstance(public, rsa.RSAPublicKey):
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return peer_id_of(der)


def signs_with(identity: rsa.RSAPrivateKey) -> dict[str, Any]:
    """The tracker option that makes hivemind sign this peer's progress record with its identity key (not with the
    key hivemind makes for each process), so that readers can tie the record to the peer."""
    der = identity.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return {"private_key": record_signing_key(der)}


def bound_to_signers(metadata: Any, admitted: Callable[[str], bool] | None = None) -> tuple[Any, dict[bytes, str]]:
    """``metadata`` without the records that name another peer than the one whose identity key signed them and, in a
    private swarm (``admitted``: whether a peer id holds a valid pass), those of peers without one; why, by subkey."""
    if not isinstance(metadata, dict):
        return metadata, {}
    kept, notes = {}, {}
    for key, entry in metadata.items():
        if getattr(entry, "value", None) is None:  # a peer that left (hivemind writes None): counts for nothing
            continue
        signer = signer_of(key)
        try:
            named = PeerID(LocalTrainingProgress.parse_obj(entry.value).peer_id).to_base58()
        except Exception:  # noqa: BLE001 - a stranger's bytes: left out below
            named = None
        if signer is None or named != signer:
            notes[key] = f"a progress record in the name of peer {named}, signed by another key ({signer or 'not RSA'})"
        elif admitted is not None and not admitted(signer):
            notes[key] = f"the progress record of peer {signer}, who holds no valid pass to this private swarm"
        else:
            kept[key] = entry
    return kept, notes


def upper_median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def plausible(metadata: Any, target_batch_size: int, max_age_s: float, now: float) -> tuple[Any, dict[bytes, str]]:
    """``metadata`` (what hivemind read: subkey → ``ValueWithExpiration`` of a progress record) without the claims
    described in the module docstring, and why each record (by subkey) was left out or cut."""
    if not isinstance(metadata, dict):
        return metadata, {}
    records = {
        key: (LocalTrainingProgress.parse_obj(entry.value), entry.expiration_time)
        for key, entry in metadata.items()
        if getattr(entry, "value", None) is not None
    }
    training = [r.epoch for r, _ in records.values() if not r.client_mode]
    epoch_cap = upper_median(training) + EPOCH_SLACK if training else math.inf
    rates = [r.samples_per_second for r, _ in records.values()]
    rate_cap = RATE_BOUND * upper_median(rates) if rates else 0.0
    share = target_batch_size / max(1, len(training))
    kept, notes = {}, {}
    for key, (record, expiration) in records.items():
        if not record.client_mode and record.epoch > epoch_cap:
            beyond = f"beyond the records' median {epoch_cap - EPOCH_SLACK:g} + {EPOCH_SLACK}"
            notes[key] = f"{_writer(record)}: epoch {record.epoch}, {beyond}"
            continue
        same_epoch = [r.samples_accumulated for r, _ in records.values() if r.epoch == record.epoch]
        samples_cap = max(RATE_BOUND * upper_median(same_epoch), share)
        cut = record.copy(
            update=dict(
                samples_per_second=min(record.samples_per_second, rate_cap),
                samples_accumulated=min(record.samples_accumulated, int(samples_cap)),
                time=min(max(record.time, now - max_age_s), now),
            )
        )
        if cut.samples_accumulated < record.samples_accumulated or cut.samples_per_second < record.samples_per_second:
            notes[key] = (
                f"{_writer(record)}: {record.samples_accumulated} samples at {record.samples_per_second:.3g}/s counted "
                f"as {cut.samples_accumulated} at {cut.samples_per_second:.3g}/s ({RATE_BOUND:g}× the records' median)"
            )
        kept[key] = ValueWithExpiration(cut.dict(), expiration)
    return kept, notes


def _writer(record: LocalTrainingProgress) -> str:
    try:
        return f"the progress record of peer {PeerID(record.peer_id)} (as it says)"
    except Exception:  # noqa: BLE001 - a stranger's bytes
        return "a progress record with an unreadable peer id"


class CheckedProgressTracker(ProgressTracker):
    """hivemind's ``ProgressTracker`` that reads the swarm's progress through ``plausible``; with ``bound``, only
    records signed by the peers they name (``bound_to_signers``), and with ``admission`` (a private swarm's) only those
    of admitted peers."""

    def __init__(self, *args: Any, bound: bool = False, admission: Admission | None = None, **kwargs: Any):
        self.bound, self.admission = bound or admission is not None, admission
        self._passes_read_at, self._admitted = -math.inf, frozenset()
        self._asked: dict[str, float] = {}  # when the passes were last read for a peer not admitted
        self._warned_at: dict[bytes, float] = {}
        super().__init__(*args, **kwargs)  # it reads the swarm's progress once already

    def swarm_progress(self, metadata: Any) -> GlobalTrainingProgress:
        notes: dict[bytes, str] = {}
        if self.bound:
            metadata, notes = bound_to_signers(metadata, None if self.admission is None else self.admits)
        kept, cut = plausible(metadata, self.target_batch_size, self.metadata_expiration, get_dht_time())
        notes.update(cut)
        warned = self._warned_at
        for key, note in notes.items():
            if time.monotonic() - warned.get(key, -math.inf) > WARN_EVERY_S:
                warned[key] = time.monotonic()
                logger.warning("Left out of the swarm's progress: %s", note)
        return super().swarm_progress(kept)

    def admits(self, peer_id: str) -> bool:
        """Whether ``peer_id`` published a pass that checks out: the passes are read from the DHT every
        ``PASSES_EVERY_S``, and at once for a peer not admitted yet (a member that has just joined; again for the
        same peer only after ``PASSES_SOON_S``)."""
        now = time.monotonic()
        if now - self._passes_read_at > PASSES_EVERY_S:
            self._asked = {}
        elif peer_id in self._admitted or now - self._asked.get(peer_id, -math.inf) < PASSES_SOON_S:
            return peer_id in self._admitted
        self._asked[peer_id] = self._passes_read_at = now
        self._admitted = frozenset(admitted_peers(self.dht, self.admission))
        return peer_id in self._admitted
