"""The network watch: while a peer trains, it keeps the peer's place in the network right (``network.py`` starts it).

- re-checks reachability (every 10 minutes, and when this machine's addresses change) and keeps the relay slots in
  view;
- keeps trying to replace relayed connections to members behind NAT by direct ones (``PunchSchedule``);
- asks the peer to rejoin (``rejoin`` set) when the role changed (a port got mapped, the laptop moved behind a NAT)
  or the relays it held slots on are gone while others are up;
- pauses training when no member of the swarm can be reached at all (``isolated``): behind NAT with no relay, a peer
  can meet nobody new, and training alone would part its model from the swarm's for good. It keeps its progress and
  asks to rejoin as soon as a relay answers again.

Every call into the DHT process is bounded (``bounded_call``): a watch that hangs would never say "no relay".
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hivemind

from p2ptrain.compat.hivemind import disconnect
from p2ptrain.gate import Gate, Verdict
from p2ptrain.swarm import discovery, nat, reachability
from p2ptrain.swarm.proximity import Measured, Prober
from p2ptrain.swarm.reachability import relayed

logger = logging.getLogger(__name__)
WATCH_EVERY_S = 10.0  # how often a peer behind NAT looks at its relay slots (and, isolated, for a relay)
NO_RELAY = (
    "no member is reachable directly (no relay): peers behind NAT can meet nobody new, and train on only with "
    "the members they are connected to; waiting for a reachable peer to return"
)
ISOLATED = "no member of the swarm can be reached (no relay): waiting for one to return; progress is kept"
MEET_AT_MOST = 16  # members a peer opens connections to ahead of averaging
MEET_EVERY_LOOKS = 3  # the network watch meets new members every third look (30 s)
NEAREST_SHOWN = 3  # nearest measured members in the status


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
            await disconnect(node.p2p, peer_id)
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
        self.prober = Prober(dht, run_id, on_probe=self._on_probe)
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
        self.prober.start()
        self._thread.start()

    def ask_rejoin(self, reason: str) -> None:
        if not self.rejoin.is_set():
            logger.info("Rejoining the swarm: %s", reason)
            self.reason = reason
            self.rejoin.set()  # a trainer paused by ``gate`` stays paused: it leaves with the stay, taking no step

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

    def _on_probe(self, nearest: list[tuple[str, Measured]]) -> None:
        """The nearest measured members, for the status (the near record carries the same)."""
        self._on_status(dict(nearest=[[peer, round(m.rtt_ms, 1)] for peer, m in nearest[:NEAREST_SHOWN]]))

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._checker.stop(timeout)
        self.prober.stop(timeout)
        self._thread.join(timeout)
