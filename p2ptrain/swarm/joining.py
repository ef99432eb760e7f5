"""Which swarm a peer joins, and what it remembers of it: the request (seed or join), the invite's or remembered
or advertised swarm, verified, and the swarm and peers remembered so that a restarted peer rejoins with no flags.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hivemind
from hivemind.p2p import PeerID

from p2ptrain.errors import ConfigError, ManifestInvalid, PeerUnreachable
from p2ptrain.fileio import atomic_write_json, read_json
from p2ptrain.settings import PeerSettings
from p2ptrain.swarm import discovery
from p2ptrain.swarm import manifest as mf
from p2ptrain.swarm.invite import Invite

logger = logging.getLogger(__name__)
MAX_REMEMBERED_PEERS = 16


@dataclass(frozen=True)
class SeedRequest:
    """Start a new swarm: the manifest fields chosen by the researcher (author and time are added)."""

    manifest_values: dict[str, Any]


@dataclass(frozen=True)
class JoinRequest:
    """Join a swarm training ``model``: by invite, or whatever the DHT (or memory) offers."""

    model: str
    invite: Invite | None = None


def bootstrap_peers(settings: PeerSettings, request: SeedRequest | JoinRequest) -> list[str]:
    peers = list(settings.initial_peers)
    if isinstance(request, JoinRequest) and request.invite is not None:
        peers += [p for p in request.invite.peers if p not in peers]
    return peers


def find_swarm(dht: hivemind.DHT, request: JoinRequest, data_dir: Path) -> tuple[mf.SwarmManifest, bytes] | None:
    """Find and verify the swarm to join: the invite's, the one remembered, or one the DHT lists; None: none."""
    if request.invite is not None:
        if request.invite.model != request.model:
            raise ConfigError(
                f"the invite is for model {request.invite.model!r}, not --model {request.model}. "
                f"Run: p2ptrain join --model {request.invite.model} --invite …"
            )
        return fetch_with_retry(dht, request.invite.manifest_hash)
    remembered = recall_swarm(data_dir)
    if remembered.get("model") == request.model:
        envelope = base64.b64decode(remembered["envelope"])
        manifest = mf.verify(envelope)
        logger.info("Rejoining swarm %s (remembered from the last run)", manifest.run_id)
        return manifest, envelope
    for listing in discovery.find_swarms(dht, request.model):
        try:
            manifest, envelope = discovery.fetch_manifest(dht, listing.manifest_hash)
        except (ManifestInvalid, PeerUnreachable) as e:
            logger.warning("Skipping advertised swarm %s: %s", listing.run_id, e)
            continue
        if manifest.run_id == listing.run_id and manifest.model == request.model:
            logger.info(
                "Found swarm %s for %s (signed by %s…)", manifest.run_id, request.model, manifest.author_key.hex()[:16]
            )
            return manifest, envelope
    return None


def fetch_with_retry(dht: hivemind.DHT, manifest_hash: bytes, attempts: int = 5) -> tuple[mf.SwarmManifest, bytes]:
    """The DHT may need a moment after bootstrap to route to the record: retry a bounded number of times."""
    for attempt in range(attempts):
        try:
            return discovery.fetch_manifest(dht, manifest_hash)
        except PeerUnreachable:
            if attempt == attempts - 1:
                raise
            threading.Event().wait(1.0 + attempt)
    raise AssertionError("unreachable")


def describe_swarm(manifest: mf.SwarmManifest, peer_id: PeerID, invite: str, n_params: int) -> str:
    return (
        f"Swarm {manifest.run_id}: {manifest.model} ({n_params / 1e6:.1f}M parameters) on {manifest.dataset!r}, "
        f"manifest {manifest.hash.hex()[:16]}…, this peer {peer_id.to_base58()}\n"
        f"Invite: {invite}\n"
        f"Others join with:\n  p2ptrain join --model {manifest.model} --invite {invite}"
    )


# -- memory of the last swarm, so a restarted peer rejoins with no flags --------------------------


async def connected_peer_maddrs(_dht: hivemind.DHT, node: Any) -> list[str]:
    infos = await node.p2p.list_peers()
    return [f"{addr}/p2p/{info.peer_id}" for info in infos for addr in info.addrs][:MAX_REMEMBERED_PEERS]


def remember_swarm(data_dir: Path, manifest: mf.SwarmManifest, envelope: bytes, dht: hivemind.DHT) -> None:
    try:
        peers = discovery.bounded(dht.run_coroutine(connected_peer_maddrs, return_future=True), timeout_s=3.0)
    except (RuntimeError, OSError) as e:
        logger.debug("Could not list connected peers: %s", e)
        peers = None
    if peers is None:
        peers = recall_swarm(data_dir).get("peers", [])
    atomic_write_json(
        data_dir / "swarm.json",
        {
            "run_id": manifest.run_id,
            "model": manifest.model,
            "envelope": base64.b64encode(envelope).decode(),
            "peers": [p for p in peers if isinstance(p, str)][:MAX_REMEMBERED_PEERS],
        },
    )


def recall_swarm(data_dir: Path) -> dict[str, Any]:
    remembered = read_json(data_dir / "swarm.json")
    return remembered if isinstance(remembered, dict) and isinstance(remembered.get("peers"), list) else {}


def wait_for_members(
    dht: hivemind.DHT, manifest: mf.SwarmManifest, settings: PeerSettings, stop: threading.Event
) -> None:
    """Hold the first step until ``settings.wait_for_peers`` peers have joined (bounded by ``wait_for_peers_s``)."""
    if settings.wait_for_peers <= 1:
        return
    logger.info(
        "Waiting for %d peers before training (at most %.0f s)", settings.wait_for_peers, settings.wait_for_peers_s
    )
    deadline = time.monotonic() + settings.wait_for_peers_s
    while time.monotonic() < deadline and not stop.is_set():
        members = discovery.count_members(dht, manifest)
        if members >= settings.wait_for_peers:
            logger.info("%d peers are here: starting", members)
            return
        stop.wait(1.0)
    if not stop.is_set():
        logger.warning(
            "Only %d of %d peers arrived in %.0f s: training anyway",
            discovery.count_members(dht, manifest),
            settings.wait_for_peers,
            settings.wait_for_peers_s,
        )
