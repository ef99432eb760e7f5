"""A peer's place in the network: its DHT node started in the role its reachability calls for, and the watch
that notices when that role no longer fits.

1. ``start_dht``: hivemind's DHT (and with it the libp2p daemon) from the bootstrap peers, falling back to the
   peers remembered from last time, then to none; on a LAN with ``--p2p py``, mDNS finds the neighbours.
2. ``settle_role``: ask the peers it reached whether they can connect back (``reachability.check``), and the router
   whether it maps our port (``port_mapping``). Until then the DHT advertises only this machine's own addresses
   (``nat.Role.own_addrs_only``). Reachable through the router, start the DHT again advertising the mapping; behind
   NAT, as ``nat.py`` says: with slots on the swarm's relays, or as a client if no relay gives it one.
3. ``NetworkWatch`` while the peer trains: re-checks reachability (every 10 minutes, and when this machine's
   addresses change), keeps the relay slots in view, and

   - keeps trying to replace relayed connections to members behind NAT by direct ones (``PunchSchedule``);
   - asks the peer to rejoin (``rejoin`` set) when the role changed (a port got mapped, the laptop moved behind
     a NAT) or the relays it held slots on are gone while others are up;
   - pauses training when no member of the swarm can be reached at all (``isolated``): behind NAT with no relay,
     a peer can meet nobody new, and training alone would part its model from the swarm's for good. It keeps its
     progress and asks to rejoin as soon as a relay answers again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import hivemind
from hivemind.p2p import P2PDaemonError

from p2ptrain import discovery, nat, p2p_stack, port_mapping, reachability
from p2ptrain.errors import PeerUnreachable
from p2ptrain.gate import Gate
from p2ptrain.identity import p2p_identity_path
from p2ptrain.idle_policy import Verdict
from p2ptrain.reachability import relayed
from p2ptrain.settings import PeerSettings

logger = logging.getLogger(__name__)

LAN_WAIT_S = 5.0  # --p2p py with mDNS and no peer given: how long to look for LAN peers
WATCH_EVERY_S = 10.0  # how often a peer behind NAT looks at its relay slots (and, isolated, for a relay)
NO_RELAY = (
    "no member is reachable directly (no relay): peers behind NAT can meet nobody new, and train on only with "
    "the members they are connected to; waiting for a reachable peer to return"
)
ISOLATED = "no member of the swarm can be reached (no relay): waiting for one to return; progress is kept"


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


def settle_role(
    settings: PeerSettings,
    data_dir: Path,
    dht: hivemind.DHT,
    run_id: str,
    bootstrap: list[str],
    validators: tuple = (),
) -> tuple[hivemind.DHT, nat.Role]:
    """Find out whether peers can reach this one and start the DHT again in the role for it (step 2 of the module
    docstring). Returns the DHT to use (``dht`` itself, or its replacement) and the role."""
    reach = reachability.check(dht)
    if reach.behind_nat:  # a router that offers UPnP has mapped the daemon's port: ask again with the mapping
        mapping = port_mapping.find_mapping(settings.port, reachability.local_ips())
        if mapping is not None:
            reach = reachability.check(dht, mapped=(mapping[1],))
    logger.info("Reachability: %s", reach.describe())
    if reach.kind == reachability.Kind.MAPPED:  # advertise what the router maps: start again, as a public peer
        dht.shutdown()
        dht = start_dht(settings, data_dir, bootstrap, [], nat.mapped(reach), validators)
        if wait_for_mapping(dht):  # the new daemon's own mapping (or the forwarded address peers observe)
            reach = reachability.check(dht)
        return dht, nat.mapped(reach)
    if not reach.behind_nat:
        return dht, nat.Role(reach)
    relays = relay_candidates(dht, run_id, bootstrap)
    dht.shutdown()
    if not relays:
        logger.warning("Behind NAT, and no member of the swarm can be reached directly: averaging as a client")
        role = nat.client(reach)
        return start_dht(settings, data_dir, bootstrap, [], role, validators), role
    # go-libp2p's AutoRelay asks its static relays for slots only once it has connected to all of them (else it
    # waits 3 minutes): if one of them fails, the others are asked one at a time
    for some in [relays, *([r] for r in relays if len(relays) > 1)]:
        role = nat.behind_nat(reach, some)
        dht = start_dht(settings, data_dir, some, [], role, validators)
        if nat.wait_for_reservation(dht, nat.RESERVATION_WAIT_S if some is relays else nat.RESERVATION_WAIT_S / 2):
            logger.info("Behind NAT: %s", role.describe())
            return dht, role
        dht.shutdown()
    logger.warning("None of %d relays gave this peer a slot: averaging as a client", len(relays))
    role = nat.client(reach)
    return start_dht(settings, data_dir, relays, [], role, validators), role


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


MEET_AT_MOST = 16  # members a peer opens connections to ahead of averaging
MEET_EVERY_LOOKS = 3  # the network watch meets new members every third look (30 s)


async def _meet(_dht: hivemind.DHT, node: Any, peer_ids: list[str]) -> int:
    """Ping members we have no connection to yet (a relayed one first; hole punching then makes it direct), so
    that averaging rounds find connections ready; how many answered."""
    from hivemind.p2p import PeerID

    connected = {info.peer_id for info in await node.p2p.list_peers()}
    targets = []
    for text in peer_ids[:MEET_AT_MOST]:
        try:
            peer_id = PeerID.from_base58(text)
        except ValueError:  # a malformed membership record
            continue
        if peer_id != node.peer_id and peer_id not in connected:
            targets.append(peer_id)
    answers = await asyncio.gather(*(node.protocol.call_ping(p) for p in targets), return_exceptions=True)
    return sum(1 for a in answers if a is not None and not isinstance(a, BaseException))


def meet_members(dht: hivemind.DHT, run_id: str, members: list[str] | None = None) -> int:
    """Open connections to the swarm's members ahead of the first averaging round (``_meet``)."""
    members = discovery.member_ids(dht, run_id) if members is None else members
    if not members:
        return 0
    return bounded_call(dht, partial(_meet, peer_ids=members)) or 0


PUNCH_GRACE_S = 20.0  # a member newly reached only through a relay: go-libp2p's own try comes first
PUNCH_SPACING_S = 150.0  # between two tries with one member: routers remember a try for 120 s (PunchSchedule)
PUNCH_TRIES = 6  # per member, then its parts go through a relay for good


@dataclass
class PunchSchedule:
    """When to make go-libp2p try hole punching again with a member reached only through a relay.

    go-libp2p tries (DCUtR: up to 3 attempts, 5 s apart) when a relayed connection opens, and never later; to try
    again, the watch opens a fresh relayed connection (``_reconnect``). Not sooner than ``spacing_s`` after the last
    try: each try leaves on both home routers a connection-tracking entry for the SYN they let out, kept 120 s
    (Linux's ``nf_conntrack_tcp_timeout_syn_sent``, what most home routers run). A try that meets such an entry
    fails whenever the other side's SYN reaches the router before our own: the stale entry lets it in, our listening
    socket answers with a sequence number the entry does not expect, and the router forwards that answer as an
    invalid packet, untranslated, to be dropped; our own dial then finds the port taken and leaves from another one,
    which the other NAT drops. Once the entries have expired, an early SYN is dropped like any unsolicited packet and
    the later one completes a simultaneous open.

    Pure: the clock is an argument."""

    grace_s: float = PUNCH_GRACE_S
    spacing_s: float = PUNCH_SPACING_S
    tries: int = PUNCH_TRIES
    _relayed_since: dict[str, float] = field(default_factory=dict)
    _last_try: dict[str, float] = field(default_factory=dict)
    _count: dict[str, int] = field(default_factory=dict)

    def due(self, relayed_only: set[str], direct: set[str], now: float) -> list[str]:
        """The members (of ``relayed_only``, reached only through a relay now) to try again with now."""
        for member in direct:
            self._count.pop(member, None)  # a hole that closes later gets fresh tries
        self._relayed_since = {m: t for m, t in self._relayed_since.items() if m in relayed_only}
        due = []
        for member in sorted(relayed_only):
            since = self._relayed_since.setdefault(member, now)
            count = self._count.get(member, 0)
            last = self._last_try.get(member, float("-inf"))
            if count >= self.tries or now - since < self.grace_s or now - last < self.spacing_s:
                continue
            self._count[member] = count + 1
            self._last_try[member] = now
            if count + 1 == self.tries:
                logger.info("Hole punching with %s: last of %d tries; its parts go through a relay", member, self.tries)
            due.append(member)
        return due


def ours_to_punch(relayed_only: set[str], behind_nat: set[str], me: str) -> set[str]:
    """Of the members reached only through a relay, those whose hole punching this peer starts: all but members
    behind NAT with a smaller peer id than ours (they start it; two tries at once spoil each other)."""
    return {m for m in relayed_only if m not in behind_nat or me < m}


async def _reconnect(_dht: hivemind.DHT, node: Any, peer_ids: list[str]) -> None:
    """Close our connections to these members and open one again (through a relay): go-libp2p tries hole punching
    when a relayed connection opens."""
    from hivemind.p2p import PeerID

    for text in peer_ids:
        try:
            peer_id = PeerID.from_base58(text)
            await node.p2p._client.disconnect(peer_id)  # hivemind's P2P has no public disconnect
            await node.protocol.call_ping(peer_id)
        except Exception as e:  # noqa: BLE001 - the daemon cannot disconnect, the peer left: the next look tries
            logger.debug("hole punching again with %s: %s", text, e)


async def _connections(_dht: hivemind.DHT, node: Any) -> list[Any]:
    return await node.p2p.list_peers()


async def _own_addrs(_dht: hivemind.DHT, node: Any) -> list[Any]:
    return await node.p2p.get_visible_maddrs(latest=True)


def bounded_call(dht: hivemind.DHT, coroutine: Callable) -> Any | None:
    """``coroutine`` run in the DHT's process, or None if it has not answered within the DHT timeout: the network
    watch skips a look rather than hang on a busy daemon."""
    return discovery.bounded(dht.run_coroutine(coroutine, return_future=True))


def connection_kinds(infos: list[Any], punched_if_direct: set[str]) -> dict[str, int]:
    """This peer's connections: ``relayed``, ``hole-punched`` (direct, to a peer of ``punched_if_direct``: members
    behind NAT, seen from behind NAT), and ``direct`` (the rest: public members, DHT bootstrap nodes)."""
    kinds = {"direct": 0, "hole-punched": 0, "relayed": 0}
    for info in infos:
        if any(relayed(a) for a in info.addrs):
            kinds["relayed"] += 1
        elif info.peer_id.to_base58() in punched_if_direct:
            kinds["hole-punched"] += 1
        else:
            kinds["direct"] += 1
    return kinds


class NetworkWatch:
    """Owned by the peer for one stay in the swarm: started after the DHT, stopped before it (see the module
    docstring). ``on_status`` gets each change for the status file; ``rejoin`` is set when the peer should leave
    and join again with a new role; ``gate`` is closed while the swarm cannot be reached."""

    def __init__(
        self,
        dht: hivemind.DHT,
        role: nat.Role,
        run_id: str,
        on_status: Callable[[dict[str, Any]], None],
        known_peers: Callable[[], list[str]],
        every_s: float = WATCH_EVERY_S,
    ):
        self.dht, self.role, self.run_id, self._on_status, self._known = dht, role, run_id, on_status, known_peers
        self.every_s = every_s
        self.rejoin = threading.Event()
        self.reason = ""
        self.gate = Gate()
        self.isolated = False
        self.no_relay = False
        self.reach = role.reach  # the latest finding
        self._punch = PunchSchedule()
        self._hole_punched: set[str] = set()  # members reached directly, not public: holes punched
        self._looks = 0
        self._stop = threading.Event()
        self._checker = reachability.Checker(dht, self._on_reach, first=role.reach)
        self._thread = threading.Thread(target=self._run, name="network-watch", daemon=True)

    def start(self) -> None:
        self._on_status(
            dict(
                reachability=self.role.reach.describe(),
                network_role=self.role.describe(),
                network_no_relay=False,
                network_isolated=False,
            )
        )
        self._checker.start()
        self._thread.start()

    def ask_rejoin(self, reason: str) -> None:
        if not self.rejoin.is_set():
            logger.info("Rejoining the swarm: %s", reason)
            self.reason = reason
            self.rejoin.set()
            self.gate.set(Verdict(True))

    def _on_reach(self, reach: reachability.Reach) -> None:
        """A new finding: the status says it; a new role means rejoining (not checked yet → public is the same one)."""
        self._on_status(dict(reachability=reach.describe()))
        was, self.reach = self.reach, reach
        unknown, direct = reachability.Kind.UNKNOWN, reachability.Kind.DIRECT
        if reach.kind == unknown or (was.kind == unknown and reach.kind == direct):  # it advertises that already
            return
        if reach.kind != was.kind:
            self.ask_rejoin(f"reachability changed ({was.kind.value} → {reach.kind.value})")

    def _run(self) -> None:
        while not self._stop.wait(self.every_s) and not self.rejoin.is_set():
            try:
                self._look()
            except Exception as e:  # noqa: BLE001 - the DHT is shutting down
                logger.warning("Network watch failed: %r", e, exc_info=logger.isEnabledFor(logging.DEBUG))

    def _look(self) -> None:
        members = discovery.member_ids(self.dht, self.run_id)
        self._looks += 1
        if self._looks % MEET_EVERY_LOOKS == 1:  # pings to members that left wait out their timeouts: not every look
            met = meet_members(self.dht, self.run_id, members)
            if met:
                logger.debug("Opened connections to %d more members", met)
        relays = discovery.find_relays(self.dht, self.run_id)
        infos = bounded_call(self.dht, _connections)
        if infos is None:
            logger.debug("The daemon did not list its connections in time: next look")
            return
        public = {a.rsplit("/p2p/", 1)[-1] for a in relays}
        # behind NAT ourselves, a direct connection to a member behind NAT is a punched hole
        behind_nat = set(members) - public if self.role.reach.behind_nat else set()
        direct = reachability.direct_peers(infos)
        self._on_status(dict(connections=connection_kinds(infos, behind_nat)))
        self._log_punched(direct & behind_nat)
        if not (self.role.reach.behind_nat or self.role.client_mode):
            return
        alive = nat.reachable(list(self.role.relays) + relays + self._known())
        if not alive:
            # no relay: nobody behind NAT can reach us anew; train on only with members we are connected to directly
            self._set_no_relay(True)
            self._set_isolated(not direct & (set(members) - {self.dht.peer_id.to_base58()}))
            return
        if self.no_relay:
            self.ask_rejoin(f"a relay is reachable again ({alive[0]})")
            return
        if self.role.client_mode:
            return
        own = bounded_call(self.dht, _own_addrs)
        if own is None:
            return
        slots = nat.relays_with_slots(own)
        if not slots & {a.rsplit("/p2p/", 1)[-1] for a in alive}:
            self.ask_rejoin("the relays it had slots on are gone; others are up")
        elif self.role.reach.kind == reachability.Kind.NAT:
            me = self.dht.peer_id.to_base58()
            relayed_only = {i.peer_id.to_base58() for i in infos} - direct
            due = self._punch.due(ours_to_punch(relayed_only, behind_nat, me), direct, time.monotonic())
            if due:
                bounded_call(self.dht, partial(_reconnect, peer_ids=due))

    def _log_punched(self, punched: set[str]) -> None:
        """One line per member behind NAT we now reach directly: a hole was punched (its parts skip the relays)."""
        for peer in sorted(punched - self._hole_punched):
            logger.info("Direct connection to %s (hole-punched through both NATs)", peer)
        self._hole_punched = punched

    def _set_no_relay(self, no_relay: bool) -> None:
        if no_relay and not self.no_relay:
            logger.warning("The swarm has no relay: %s", NO_RELAY)
        self.no_relay = no_relay
        self._on_status(dict(network_no_relay=no_relay))

    def _set_isolated(self, isolated: bool) -> None:
        """Alone with no relay: training would part this peer's model from the swarm's. Wait, progress kept."""
        if isolated == self.isolated:
            return
        self.isolated = isolated
        if isolated:
            logger.warning("No member of the swarm can be reached: training waits for a relay (progress is kept)")
            self.gate.set(Verdict(False, reasons=(ISOLATED,)))
        else:
            self.gate.set(Verdict(True))
        self._on_status(dict(network_isolated=isolated))

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._checker.stop(timeout)
        self._thread.join(timeout)
