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
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from hivemind.optim.progress_tracker import GlobalTrainingProgress, LocalTrainingProgress
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time

from p2ptrain.compat.hivemind import ProgressTracker

logger = logging.getLogger(__name__)

EPOCH_SLACK = 2  # peers one global step ahead of the others are normal: the first ones to step
RATE_BOUND = 10.0
WARN_EVERY_S = 60.0


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
    """hivemind's ``ProgressTracker`` that reads the swarm's progress through ``plausible``."""

    def swarm_progress(self, metadata: Any) -> GlobalTrainingProgress:
        kept, notes = plausible(metadata, self.target_batch_size, self.metadata_expiration, get_dht_time())
        warned = self.__dict__.setdefault("_warned_at", {})  # hivemind's __init__ reads progress before ours runs
        for key, note in notes.items():
            if time.monotonic() - warned.get(key, -math.inf) > WARN_EVERY_S:
                warned[key] = time.monotonic()
                logger.warning("Left out of the swarm's progress: %s", note)
        return super().swarm_progress(kept)
