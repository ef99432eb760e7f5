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
import msgpack
from hivemind.p2p import PeerID

from p2ptrain.errors import ConfigError, ManifestInvalid, PeerUnreachable
from p2ptrain.fileio import atomic_write_bytes, atomic_write_json, read_json
from p2ptrain.settings import PeerSettings
from p2ptrain.swarm import discovery
from p2ptrain.swarm import manifest as mf
from p2ptrain.swarm.admission import Admission, NotAdmitted, Token, grant, make_pass
from p2ptrain.swarm.identity import author_key
from p2ptrain.swarm.invite import Invite

logger = logging.getLogger(__name__)
MAX_REMEMBERED_PEERS = 16
INVITE_LIFETIME_S = 7 * 86400  # a private swarm's first invite, unless `seed --invite-days` says otherwise


@dataclass(frozen=True)
class SeedRequest:
    """Start a new swarm: the manifest fields chosen by the researcher (author and time are added). A private swarm
    (``admission="token"``) prints an invite whose join token lasts ``invite_lifetime_s``."""

    manifest_values: dict[str, Any]
    invite_lifetime_s: float = 0.0  # 0: INVITE_LIFETIME_S


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


def first_peers(
    settings: PeerSettings, request: SeedRequest | JoinRequest, data_dir: Path, rejoining: bool
) -> tuple[list[str], list[str]]:
    """(the peers to bootstrap from, the remembered ones to fall back on). The given peers (flags, invite) alone, or
    the remembered when none are given; on a rejoin within a run, the remembered ones (peers met in this run: the
    invite's may have left since, and a volunteer that rejoins because its relays are gone would find none of them)
    then the given ones."""
    given = bootstrap_peers(settings, request)
    remembered = [p for p in recall_swarm(data_dir).get("peers", []) if isinstance(p, str)]
    if not given:
        return [], remembered
    if rejoining:
        return [*remembered, *(p for p in given if p not in remembered)], []
    return given, []


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


def admit(
    manifest: mf.SwarmManifest,
    peer_id: PeerID,
    data_dir: Path,
    request: SeedRequest | JoinRequest,
) -> tuple[Admission | None, Token | None]:
    """This peer's admission to a private swarm (None, None for an open one): its rules and pass, and the join token
    its invite shares. The author signs its own pass, and at its first start a token for the invite it prints;
    anyone else needs the token of an invite (this one, or the last one it joined this swarm with, kept in the data
    directory).

    Raises:
        ConfigError: the swarm is private and this peer has no valid join token."""
    if manifest.admission == "open":
        return None, None
    path = token_path(data_dir, manifest.run_id)
    token = request.invite.token if isinstance(request, JoinRequest) and request.invite is not None else None
    if token is None and path.exists():
        token = Token.from_wire(msgpack.unpackb(path.read_bytes(), raw=False))
    key = author_key(data_dir) if (data_dir / "author.key").exists() else None  # a joiner has none: none is made
    if key is not None and mf.public_key_bytes(key) == manifest.author_key:
        if token is None or token.grants[-1].expires <= time.time():
            lifetime = getattr(request, "invite_lifetime_s", 0.0) or INVITE_LIFETIME_S
            token = grant(key, manifest.run_id, lifetime, invite=False)
        own_pass = make_pass(manifest.run_id, peer_id.to_bytes(), author=key)
    elif token is None:
        raise ConfigError(
            f"swarm {manifest.run_id} is private: only peers invited by its seeder may join. Ask the seeder for an "
            f"invite, then: p2ptrain join --model {manifest.model} --invite p2pt1-…"
        )
    else:
        own_pass = make_pass(manifest.run_id, peer_id.to_bytes(), token=token)
    admission = Admission(manifest.run_id, manifest.author_key, own_pass)
    try:
        admission.check(peer_id.to_bytes(), own_pass)
    except NotAdmitted as e:
        reason = str(e).replace("its ", "your invite's ", 1)
        message = f"cannot join private swarm {manifest.run_id}: {reason}. Ask the seeder for a new invite"
        raise ConfigError(message) from None
    atomic_write_bytes(path, msgpack.packb(token.to_wire(), use_bin_type=True), mode=0o600)
    return admission, token


def token_path(data_dir: Path, run_id: str) -> Path:
    """The join token this peer uses in swarm ``run_id``: a secret, as the invite that carried it."""
    return data_dir / f"token-{run_id}.bin"


def revocations_path(data_dir: Path, run_id: str) -> Path:
    """The author's signed list of revoked join tokens (``p2ptrain invite --revoke``), which its peer publishes."""
    return data_dir / f"revoked-{run_id}.bin"


def describe_swarm(
    manifest: mf.SwarmManifest, peer_id: PeerID, invite: str, n_params: int, token: Token | None = None
) -> str:
    text = (
        f"Swarm {manifest.run_id}: {manifest.model} ({n_params / 1e6:.1f}M parameters) on {manifest.dataset!r}, "
        f"manifest {manifest.hash.hex()[:16]}…, this peer {peer_id.to_base58()}\n"
        f"Invite: {invite}\n"
        f"Others join with:\n  p2ptrain join --model {manifest.model} --invite {invite}"
    )
    if token is not None:
        text += (
            f"\nThis swarm is private: the invite holds {token.describe()}. Keep it secret; more invites: "
            f"p2ptrain invite; revoke this one: p2ptrain invite --revoke {token.grants[-1].id.hex()}"
        )
    return text


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
