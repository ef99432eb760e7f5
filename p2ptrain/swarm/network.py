"""A peer's place in the network: its DHT node started in the role its reachability calls for, and the watch
that notices when that role no longer fits.

1. ``start_dht``: hivemind's DHT (and with it the libp2p daemon) from the bootstrap peers, falling back to the
   peers remembered from last time, then to none; on a LAN with ``--p2p py``, mDNS finds the neighbours.
2. ``settle_role``: ask the peers it reached whether they can connect back (``reachability.check``), and the router
   whether it maps our port (``port_mapping``). Until then the DHT advertises only this machine's own addresses
   (``nat.Role.own_addrs_only``). Reachable through the router, start the DHT again advertising the mapping; behind
   NAT, as ``nat.py`` says: with slots on the swarm's relays, or as a client if no relay gives it one. A start in
   the new role that reaches none of the peers met a moment ago is tried again before the peer gives up
   (``restart_dht``).
3. ``watch.NetworkWatch`` while the peer trains: notices when that role no longer fits (``watch.py``).

``claim_port`` resolves ``--port 0`` once, so that every stay listens on (and announces) the same port.
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from pathlib import Path
from typing import Any

import hivemind
from hivemind.p2p import P2PDaemonError

from p2ptrain.compat.hivemind import hold_dht_tasks
from p2ptrain.errors import ConfigError, PeerUnreachable, PortInUse
from p2ptrain.settings import PeerSettings
from p2ptrain.swarm import discovery, nat, p2p_stack, port_mapping, reachability
from p2ptrain.swarm.identity import p2p_identity_path
from p2ptrain.swarm.reachability import Reach, relayed

logger = logging.getLogger(__name__)

LAN_WAIT_S = 5.0  # --p2p py with mDNS and no peer given: how long to look for LAN peers
RESTART_TRIES, RESTART_WAIT_S = 3, 2.0  # a start in a new role, to peers met a moment ago: a dial may fail once
# hivemind waits 15 s for its daemon; a Python daemon on a loaded machine (four peers, their daemons and relays on
# two cores) has taken longer, and a volunteer rejoining in a new role then exited. A daemon that cannot reach its
# bootstrap peers still fails at once (it exits and says so).
DAEMON_START_S = 60.0


def start_dht(
    settings: PeerSettings,
    data_dir: Path,
    initial_peers: list[str],
    remembered: list[str],
    role: nat.Role = nat.PUBLIC,
    validators: tuple = (),
) -> hivemind.DHT:
    """Start this peer's DHT node; fall back to ``remembered`` peers, then to none, only when none were given."""
    p2p_stack.select(settings.p2p, mdns=settings.mdns, flags=role.flags)
    announce = list(settings.announce) or (own_addrs(settings.host, settings.port) if role.own_addrs_only else None)
    attempts = [initial_peers] if initial_peers else ([remembered, []] if remembered else [[]])
    for peers in attempts:
        try:
            dht = hivemind.DHT(
                start=True,
                initial_peers=peers,
                host_maddrs=[f"/ip4/{settings.host}/tcp/{settings.port}"],
                announce_maddrs=announce,
                identity_path=str(p2p_identity_path(data_dir)),
                startup_timeout=DAEMON_START_S,
                # its own stop takes ~0.1 s, but a request left in its pipe by an averager process that
                # has just exited stalls it 3 s each (hivemind dht.py _run): do not wait that out
                shutdown_timeout=1.0,
                # a restart (a new role) reuses the identity the peers saw a moment ago
                check_if_identity_free=role is nat.PUBLIC,
                **role.dht_kwargs,
            )
        except P2PDaemonError as e:
            if peers is remembered:
                logger.info("None of the %d peers remembered from last time answered", len(remembered))
                continue
            if "bootstrap" in str(e):
                raise PeerUnreachable(
                    f"none of the {len(peers)} initial peers answered (--initial-peers / --invite). Check the "
                    "addresses and that those peers are running, or ask for a fresh invite."
                ) from None
            raise PeerUnreachable(f"the p2p daemon failed to start: {e}") from None
        if validators:
            dht.add_validators(list(validators))
        dht.run_coroutine(hold_dht_tasks)
        dht.run_coroutine(reachability.serve)
        if not peers and settings.p2p == "py" and settings.mdns:
            meet_lan_peers(dht)
        return dht
    raise AssertionError("unreachable: the last attempt has no peers and raises on failure")


def own_addrs(host: str, port: int) -> list[str] | None:
    """The addresses of this machine a peer listening on ``host`` (0.0.0.0: every IPv4 interface) and ``port``
    has; None for port 0 (not known before the daemon listens)."""
    if not port:
        return None
    ips = sorted(reachability.local_ips()) if host == "0.0.0.0" else [host]
    return [f"/ip4/{ip}/tcp/{port}" for ip in ips]


def restart_dht(
    settings: PeerSettings, data_dir: Path, peers: list[str], role: nat.Role, validators: tuple = ()
) -> hivemind.DHT:
    """``start_dht`` again, in ``role``, to ``peers`` this one reached a moment ago: a daemon that could not connect
    to any of them (one busy, a router's mapping not open yet) is started again, ``RESTART_TRIES`` times in all,
    ``RESTART_WAIT_S`` apart, before the peer gives up with ``PeerUnreachable``."""
    for attempt in range(1, RESTART_TRIES):
        try:
            return start_dht(settings, data_dir, peers, [], role, validators)
        except PeerUnreachable as e:
            logger.warning("Starting again (%s): %s; try %d of %d in %.0f s", role.describe(), e, attempt + 1,
                           RESTART_TRIES, RESTART_WAIT_S)  # fmt: skip
            time.sleep(RESTART_WAIT_S)
    return start_dht(settings, data_dir, peers, [], role, validators)


def settle_role(
    settings: PeerSettings,
    data_dir: Path,
    dht: hivemind.DHT,
    run_id: str,
    bootstrap: list[str],
    validators: tuple = (),
    previous: Reach | None = None,
) -> tuple[hivemind.DHT, nat.Role]:
    """Find out whether peers can reach this one and start the DHT again in the role for it (step 2 of the module
    docstring). Returns the DHT to use (``dht`` itself, or its replacement) and the role. ``previous``: what the
    last stay found, taken if no peer answers now (else the next check would find it again, and rejoin again)."""
    reach = reachability.news(reachability.check(dht), previous)
    answered = time.monotonic()
    if reach.behind_nat:  # a router that offers UPnP has mapped the daemon's port: ask again with the mapping
        mapping = port_mapping.find_mapping(settings.port, reachability.local_ips())
        if mapping is not None:  # once the peers that just answered will again (one ask per caller per interval)
            time.sleep(max(0.0, answered + reachability.MIN_INTERVAL_PER_CALLER_S - time.monotonic()))
            reach = reachability.news(reachability.check(dht, mapped=(mapping[1],)), reach)
    logger.info("Reachability: %s", reach.describe())
    if reach.kind == reachability.Kind.MAPPED:  # advertise what the router maps: start again, as a public peer
        dht.shutdown()
        dht = restart_dht(settings, data_dir, bootstrap, nat.mapped(reach), validators)
        if wait_for_mapping(dht):  # the new daemon's own mapping (or the forwarded address peers observe)
            again = reachability.check(dht)  # one that did not reach it is no news: the watch checks again later
            reach = again if again.public else reach
        return dht, nat.mapped(reach)
    if not reach.behind_nat:
        return dht, nat.Role(reach)
    relays = relay_candidates(dht, run_id, bootstrap)
    dht.shutdown()
    if not relays:
        logger.warning("Behind NAT, and no member of the swarm can be reached directly: averaging as a client")
        role = nat.client(reach)
        return restart_dht(settings, data_dir, bootstrap, role, validators), role
    # go-libp2p's AutoRelay asks its static relays for slots only once it has connected to all of them (else it
    # waits 3 minutes): if one of them fails, the others are asked one at a time
    for some in [relays, *([r] for r in relays if len(relays) > 1)]:
        role = nat.behind_nat(reach, some)
        try:
            dht = restart_dht(settings, data_dir, some, role, validators)
        except PeerUnreachable as e:  # none of these relays answers now: the next ones, or a client
            logger.warning("No relay of %s answered: %s", some, e)
            continue
        if nat.wait_for_reservation(dht, nat.RESERVATION_WAIT_S if some is relays else nat.RESERVATION_WAIT_S / 2):
            logger.info("Behind NAT: %s", role.describe())
            return dht, role
        dht.shutdown()
    logger.warning("None of %d relays gave this peer a slot: averaging as a client", len(relays))
    role = nat.client(reach)
    return restart_dht(settings, data_dir, relays, role, validators), role


def wait_for_mapping(dht: hivemind.DHT, timeout_s: float = port_mapping.WAIT_S) -> bool:
    """Wait (bounded) for the daemon to advertise an address a router maps to it; False if none came. The Go
    daemon discovers the gateway and maps the port within seconds of starting (``-natPortMap``, on by default)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if reachability.mapped_ports(dht.get_visible_maddrs(latest=True), reachability.local_ips()):
            time.sleep(max(0.0, reachability.MIN_INTERVAL_PER_CALLER_S - 1.0))  # the peers answer one ask per 5 s
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(1.0)


MAX_RELAY_SLOTS = 4  # relays a peer behind NAT asks for slots (go-libp2p's AutoRelay keeps up to 2 by default)


def relay_candidates(dht: hivemind.DHT, run_id: str, bootstrap: list[str]) -> list[str]:
    """Public members this machine can connect to now: the swarm's relay records first, then bootstrap peers."""
    candidates = discovery.find_relays(dht, run_id) + [a for a in bootstrap if not relayed(a)]
    alive = nat.reachable(candidates)
    by_peer: dict[str, str] = {}
    for addr in alive:
        by_peer.setdefault(addr.rsplit("/p2p/", 1)[-1], addr)
    return list(by_peer.values())[:MAX_RELAY_SLOTS]


async def _ping_lan_peers(_dht: hivemind.DHT, node: Any) -> int:
    """Greet, in hivemind's DHT, the peers the daemon found by mDNS; how many answered."""
    answered = 0
    for peer_id in dict.fromkeys(info.peer_id for info in await node.p2p.list_peers()):  # one per connection
        if await node.protocol.call_ping(peer_id) is not None:
            answered += 1
    return answered


def meet_lan_peers(dht: hivemind.DHT, wait_s: float = LAN_WAIT_S) -> int:
    """With no peer known, give mDNS a few seconds to find swarm members on this LAN (PC cafés, labs)."""
    logger.info("No peer given: looking for swarm peers on the LAN (mDNS, up to %.0f s)", wait_s)
    deadline = time.monotonic() + wait_s
    while True:
        answered = dht.run_coroutine(_ping_lan_peers)
        if answered or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    logger.info("Found %d peer(s) on the LAN", answered)
    return answered


def claim_port(host: str, port: int) -> int:
    """``port`` if it is free on ``host``; for 0, a free one (the daemons then listen on it, stay after stay)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons bind: a restart finds it free
        try:
            sock.bind((host, port))
            return sock.getsockname()[1]
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} is in use by another program (--port={port}). "
                    "Choose another port, or --port 0 for any free one."
                ) from None
            raise ConfigError(f"cannot listen on {host}:{port} (--host/--port): {e.strerror}") from None
