"""Finding a swarm: the DHT records p2ptrain publishes and reads (``protocols/dht-records.md``).

- ``p2ptrain/v1/manifest/<hash hex>`` → the signed manifest envelope (bytes). Any member republishes
  it, so the swarm outlives its seeder; a reader checks that it hashes to the key it asked for.
- ``p2ptrain/v1/swarms/<model>``, subkey ``<run_id>`` → the manifest hash (32 bytes): how
  ``join --model X`` finds swarms with no invite.
- ``p2ptrain/v1/members/<run_id>``, subkey ``<peer id>`` → the manifest hash: who is in the swarm
  (hivemind's own progress records appear only once a peer has trained a step).
- ``p2ptrain/v1/relays/<run_id>``, subkey ``<peer id>`` → a list of that peer's public multiaddrs: members that
  others can reach directly, which relay for members behind NAT (``nat.py``).
- private swarms only (``admission.py``): ``p2ptrain/v1/passes/<run_id>``, subkey ``<peer id>`` → that peer's pass,
  which members check before serving it their state; ``p2ptrain/v1/revoked/<run_id>`` → the author's signed list
  of revoked join tokens, which every member republishes verbatim.

Records expire after ``RECORD_TTL_S``; every member refreshes them every ``REPUBLISH_EVERY_S``.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from p2ptrain.errors import ManifestInvalid, PeerUnreachable
from p2ptrain.swarm import manifest as mf
from p2ptrain.swarm.admission import Admission, NotAdmitted

logger = logging.getLogger(__name__)

RECORD_TTL_S = 300.0
REPUBLISH_EVERY_S = 60.0
DHT_TIMEOUT_S = 15.0  # every DHT call from p2ptrain is bounded by this
MAX_SWARMS_LISTED = 32


def bounded(future, timeout_s: float = DHT_TIMEOUT_S):
    """The result of a DHT call made with ``return_future=True``, or None if it took longer than ``timeout_s``."""
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        future.cancel()
        logger.debug("A DHT call took longer than %.0f s; giving up on it", timeout_s)
        return None


def manifest_key(manifest_hash: bytes) -> str:
    return f"p2ptrain/v1/manifest/{manifest_hash.hex()}"


def swarms_key(model: str) -> str:
    return f"p2ptrain/v1/swarms/{model}"


def members_key(run_id: str) -> str:
    return f"p2ptrain/v1/members/{run_id}"


def relays_key(run_id: str) -> str:
    return f"p2ptrain/v1/relays/{run_id}"


def finishing_key(run_id: str) -> str:
    return f"p2ptrain/v1/finishing/{run_id}"


def passes_key(run_id: str) -> str:
    return f"p2ptrain/v1/passes/{run_id}"


PARAM_SLOTS = 16  # parameter sketches rotate over this many keys, so that the signature validator knows them all


def params_key(run_id: str, slot: int) -> str:
    """The parameter sketches of global steps N with N % PARAM_SLOTS == slot (``train/param_check.py``)."""
    return f"p2ptrain/v1/params/{run_id}/{slot}"


def revoked_key(run_id: str) -> str:
    return f"p2ptrain/v1/revoked/{run_id}"


AVERAGERS = ("grad_averager", "state_averager", "outer")  # a run's averagers: prefixes f"{run_id}_{name}"


def accusations_key(averager_prefix: str) -> str:
    """The evidence that peers hold against others in one averager's rounds (``train/accusations.py``)."""
    return f"p2ptrain/v1/accusations/{averager_prefix}"


MAX_RELAY_ADDRS = 4  # per relay record
MAX_RELAYS = 16  # read per swarm
MAX_MADDR_CHARS = 256


def publish(
    dht: hivemind.DHT,
    manifest: mf.SwarmManifest,
    envelope: bytes,
    ttl_s: float = RECORD_TTL_S,
    relay_addrs: list[str] = (),
    admission: Admission | None = None,
) -> bool:
    """Store (or refresh) the manifest, the swarm index entry and this peer's membership, and its relay record if
    it has public addresses to offer; in a private swarm, this peer's pass and the newest revocations it holds. True
    if all succeeded."""
    expiration = get_dht_time() + ttl_s
    peer_id = dht.peer_id.to_base58()
    futures = [
        dht.store(manifest_key(manifest.hash), envelope, expiration, return_future=True),
        dht.store(swarms_key(manifest.model), manifest.hash, expiration, subkey=manifest.run_id, return_future=True),
        dht.store(members_key(manifest.run_id), manifest.hash, expiration, subkey=peer_id, return_future=True),
    ]
    if relay_addrs:
        addrs = [a for a in relay_addrs if len(a) <= MAX_MADDR_CHARS][:MAX_RELAY_ADDRS]
        futures.append(dht.store(relays_key(manifest.run_id), addrs, expiration, subkey=peer_id, return_future=True))
    if admission is not None:
        key = passes_key(manifest.run_id)
        futures.append(dht.store(key, admission.own_pass, expiration, subkey=peer_id, return_future=True))
        if admission.revocation_record is not None:
            record = admission.revocation_record
            futures.append(dht.store(revoked_key(manifest.run_id), record, expiration, return_future=True))
    return all(bool(bounded(f)) for f in futures)


def read_revocations(dht: hivemind.DHT, admission: Admission | None, file: Path | None = None) -> None:
    """Adopt the author's newest revocation record, from ``file`` (the author's own) or the DHT
    (``admission.take_revocations`` checks it). Nothing to do in an open swarm (``admission`` None)."""
    if admission is None:
        return
    if file is not None and file.exists():
        admission.take_revocations(file.read_bytes())
    found = bounded(dht.get(revoked_key(admission.run), latest=True, return_future=True))
    if found is not None:
        admission.take_revocations(found.value)


def admitted_peers(dht: hivemind.DHT, admission: Admission) -> set[str]:
    """The peers (base58 ids) whose pass, as published under ``passes_key``, checks out now (revocations read
    first); an unreadable record counts as no pass."""
    read_revocations(dht, admission)
    found = bounded(dht.get(passes_key(admission.run), latest=True, return_future=True))
    passes = found.value if found is not None and isinstance(found.value, dict) else {}
    admitted = set()
    for peer, entry in passes.items():
        try:
            admission.check(PeerID.from_base58(peer).to_bytes(), getattr(entry, "value", None))
        except (NotAdmitted, ValueError, TypeError):
            continue
        admitted.add(peer)
    return admitted


def find_relays(dht: hivemind.DHT, run_id: str) -> list[str]:
    """Public members' multiaddrs (``.../p2p/<their id>``), freshest record first; malformed entries skipped. Each
    address names the peer id of the record it came from, so a record cannot pass off another peer's address (the
    libp2p handshake then checks that the peer there holds that id)."""
    found = bounded(dht.get(relays_key(run_id), latest=True, return_future=True))
    if found is None or not isinstance(found.value, dict):
        return []
    entries = sorted(found.value.items(), key=lambda kv: -float(getattr(kv[1], "expiration_time", 0.0)))
    addrs: list[str] = []
    for peer_id, entry in entries[:MAX_RELAYS]:
        value = getattr(entry, "value", None)
        if peer_id == dht.peer_id.to_base58() or not isinstance(peer_id, str) or not isinstance(value, list):
            continue
        for addr in value[:MAX_RELAY_ADDRS]:
            if isinstance(addr, str) and len(addr) <= MAX_MADDR_CHARS and addr.startswith("/ip4/") and "/tcp/" in addr:
                addrs.append(addr.split("/p2p/")[0] + f"/p2p/{peer_id}")
    return addrs


def count_members(dht: hivemind.DHT, manifest: mf.SwarmManifest) -> int:
    """Peers that announced membership of this swarm within the record TTL (this one included)."""
    found = bounded(dht.get(members_key(manifest.run_id), latest=True, return_future=True))
    if found is None or not isinstance(found.value, dict):
        return 0
    return sum(1 for entry in found.value.values() if getattr(entry, "value", None) == manifest.hash)


def member_ids(dht: hivemind.DHT, run_id: str) -> list[str]:
    """The peer ids with a membership record in this swarm (unverified: whoever wrote one)."""
    found = bounded(dht.get(members_key(run_id), latest=True, return_future=True))
    if found is None or not isinstance(found.value, dict):
        return []
    return [p for p in found.value if isinstance(p, str)]


def fetch_manifest(dht: hivemind.DHT, manifest_hash: bytes) -> tuple[mf.SwarmManifest, bytes]:
    """Fetch and verify the manifest with this hash.

    Raises:
        PeerUnreachable: no peer serves it (the swarm is gone, or the peers are unreachable).
        ManifestInvalid: what was served does not hash to ``manifest_hash`` or is badly signed.
    """
    found = bounded(dht.get(manifest_key(manifest_hash), latest=True, return_future=True))
    if found is None:
        raise PeerUnreachable(
            f"no peer serves the swarm manifest {manifest_hash.hex()[:16]}…: the swarm may have ended, or its "
            "peers are unreachable. Ask for a fresh invite."
        )
    envelope = found.value
    if not isinstance(envelope, bytes):
        raise ManifestInvalid(f"the DHT record for manifest {manifest_hash.hex()[:16]}… is not bytes")
    return mf.verify(envelope, expected_hash=manifest_hash), envelope


@dataclass(frozen=True)
class SwarmListing:
    run_id: str
    manifest_hash: bytes
    expiration: float  # DHT time; the most recently refreshed swarm is the liveliest


def find_swarms(dht: hivemind.DHT, model: str) -> list[SwarmListing]:
    """Swarms training ``model`` that members advertise, freshest first (unverified: fetch to verify)."""
    found = bounded(dht.get(swarms_key(model), latest=True, return_future=True))
    if found is None or not isinstance(found.value, dict):
        return []
    listings = []
    for run_id, entry in list(found.value.items())[:MAX_SWARMS_LISTED]:
        value = getattr(entry, "value", None)
        if isinstance(run_id, str) and isinstance(value, bytes) and len(value) == 32:
            listings.append(SwarmListing(run_id, value, float(entry.expiration_time)))
        else:
            logger.debug("Ignoring malformed swarm listing %r", run_id)
    return sorted(listings, key=lambda s: -s.expiration)


class Republisher:
    """Refreshes this swarm's records in the DHT until stopped (owned and stopped by the peer). ``relay_addrs``
    says, at each refresh, which public addresses this peer offers as a relay (none while it is behind NAT)."""

    def __init__(
        self,
        dht: hivemind.DHT,
        manifest: mf.SwarmManifest,
        envelope: bytes,
        relay_addrs=lambda: [],  # noqa: ANN001
        admission: Admission | None = None,
        revocations: Path | None = None,
    ):
        """``admission``: a private swarm's; ``revocations``: the author's file of them (``revocations_path``), which
        ``p2ptrain invite --revoke`` writes while the seeder runs: published at the next refresh."""
        self._dht, self._manifest, self._envelope, self._relay_addrs = dht, manifest, envelope, relay_addrs
        self._admission, self._revocations = admission, revocations
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="republisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._admission is not None:
                    read_revocations(self._dht, self._admission, self._revocations)
                if not publish(
                    self._dht,
                    self._manifest,
                    self._envelope,
                    relay_addrs=self._relay_addrs(),
                    admission=self._admission,
                ):
                    logger.debug("Could not refresh the swarm records in the DHT (no reachable peers?)")
            except (RuntimeError, OSError, TimeoutError) as e:  # the DHT is shutting down or unreachable
                logger.debug("Republishing failed: %s", e)
            self._wake.wait(REPUBLISH_EVERY_S)
            self._wake.clear()

    def refresh(self) -> None:
        """Publish now (this peer's reachability changed)."""
        self._wake.set()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)


def shareable_maddrs(dht: hivemind.DHT, limit: int = 8) -> list[str]:
    """This peer's addresses for an invite: public ones first, loopback only if nothing else."""
    addrs = [str(a) for a in dht.get_visible_maddrs()]

    def rank(addr: str) -> int:
        parts = addr.split("/")
        try:
            ip = ipaddress.ip_address(parts[2])
        except (IndexError, ValueError):
            return 1
        return 3 if ip.is_loopback else 2 if ip.is_private else 0

    addrs.sort(key=rank)
    non_loopback = [a for a in addrs if rank(a) < 3]
    return (non_loopback or addrs)[:limit]
