"""What a peer's reachability (``reachability.py``) means for how it takes part in the swarm.

- ``direct``, ``mapped``: a full node of hivemind's DHT and averaging; its daemon relays for peers behind NAT;
  it aggregates a part of every group it is in.
- ``nat``, with a slot on a relay: a full node, reachable through the swarm's relays and then directly by hole
  punching (DCUtR); it aggregates unless a member of its group is behind a symmetric NAT.
- ``symmetric-nat``, with a slot on a relay: a full node that aggregates nothing.
- behind NAT, no relay gave it a slot: hivemind's client mode (no DHT or averaging requests reach it).
- behind NAT, and no member of the swarm reachable: it waits for one (``peer.py``).

A relay is for finding each other, not the data path: a connection between two members behind NAT opens through
a relay, and go-libp2p's hole punching (DCUtR) then replaces it with a direct one; p2ptrain opens connections to
the swarm's members ahead of averaging (``watch.meet_members``) and retries hole punching a few times
(``watch.PunchSchedule``). A part would cross a relay's uplink twice, and go-libp2p's relays bound what a circuit
carries (the default relay: 128 KiB for 2 minutes; the Go daemon's unlimited relay service can be replaced by the
default one at start-up, a race in ``p2pd/main.go``). So a member aggregates a part only if every other member of
its group can open a direct connection to it: anyone can to a public peer; a peer behind a port-keeping NAT
(``nat``) gets one from the public peers it dialed and, by hole punching, from other ``nat`` peers; nobody gets one
to a peer behind a symmetric NAT, which takes part by sending its vector to the aggregators and receiving the
average, like hivemind's clients. ``aggregates`` turns this into each member's share; every member computes it
from the same gathered reports, so all agree without a coordinator.

Peers behind NAT learn the relays from the relay records public members publish in the DHT
(``discovery.find_relays``) and from the peers they bootstrap from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import hivemind

from p2ptrain.swarm.reachability import Kind, Reach, can_connect, is_global, relayed

logger = logging.getLogger(__name__)

RESERVATION_WAIT_S = 10.0  # a peer behind NAT waits this long for a relay slot before averaging as a client
PROBE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Role:
    """How this peer joins the network: hivemind DHT arguments, extra daemon flags, and the reason."""

    reach: Reach
    client_mode: bool = False
    relays: tuple[str, ...] = ()  # relays it holds (or asks for) slots on
    dht_kwargs: dict = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    # advertise only this machine's own addresses, not the NAT's address that peers observe: until a peer knows that
    # address can be dialed, advertising it makes others dial it, and each such SYN leaves their router holding
    # state that spoils hole punching between the two for 120 s (watch.PunchSchedule), and collides with this
    # peer's own dials to them (a simultaneous open with two initiators, reset)
    own_addrs_only: bool = True

    def describe(self) -> str:
        if self.client_mode:
            return "averaging as a client (sends its part, receives the average): no relay took it"
        if self.reach.behind_nat:
            return f"reachable through {len(self.relays)} relay(s)"
        return "aggregates and relays for peers behind NAT" if self.reach.public else "joined"


PUBLIC = Role(Reach(Kind.UNKNOWN))  # hivemind's defaults: a full node; the daemon relays once it finds it is public


def mapped(reach: Reach) -> Role:
    """Reachable through the router (a port mapped by UPnP, or forwarded): the daemon advertises what the router
    maps (its own mapping, or the address peers observe it at)."""
    return Role(reach, own_addrs_only=False)


def behind_nat(reach: Reach, relays: Sequence[str]) -> Role:
    """The daemon of a peer behind NAT reserves slots on ``relays`` at once: go-libp2p's AutoRelay with the swarm's
    relays as static ones (``-relayDiscovery=0``: no minutes of looking for candidates in the DHT) and the
    reachability forced private (it does not wait for AutoNAT to find out what we already know)."""
    return Role(
        reach,
        relays=tuple(relays),
        dht_kwargs=dict(use_auto_relay=True, force_reachability="private", trusted_relays=list(relays)),
        flags=("-relayDiscovery=0",),
        own_addrs_only=False,  # AutoRelay advertises its relay addresses and the LAN ones, never the NAT's
    )


def client(reach: Reach) -> Role:
    return Role(reach, client_mode=True, dht_kwargs=dict(client_mode=True))


def offered_addrs(maddrs: Sequence[object]) -> list[str]:
    """The addresses a public peer offers as a relay: TCP on IPv4, not loopback, not itself relayed."""
    out = []
    for addr in map(str, maddrs):
        parts = addr.split("/")
        if len(parts) > 4 and parts[1] == "ip4" and parts[3] == "tcp" and "p2p-circuit" not in parts:
            if not parts[2].startswith("127."):
                out.append(addr)
    return sorted(out, key=lambda a: not is_global(a.split("/")[2]))


def tcp_target(addr: str) -> tuple[str, int] | None:
    parts = addr.split("/")
    if len(parts) > 4 and parts[1] == "ip4" and parts[3] == "tcp":
        return parts[2], int(parts[4])
    return None


def reachable(addrs: Sequence[str], timeout_s: float = PROBE_TIMEOUT_S) -> list[str]:
    """The addresses this machine can open a TCP connection to now (all probed at once)."""
    targets = [(a, tcp_target(a)) for a in dict.fromkeys(addrs)]
    targets = [(a, t) for a, t in targets if t is not None]

    async def probe() -> list[bool]:
        return await asyncio.gather(*(can_connect(ip, port, timeout_s) for _, (ip, port) in targets))

    results = asyncio.run(probe()) if targets else []
    return [a for (a, _), ok in zip(targets, results, strict=True) if ok]


def relays_with_slots(maddrs: Sequence[object]) -> set[str]:
    """Peer ids of the relays this peer's own (circuit) addresses go through."""
    out = set()
    for addr in map(str, maddrs):
        if "/p2p-circuit" in addr:
            relay = addr.split("/p2p-circuit")[0]
            if "/p2p/" in relay:
                out.add(relay.rsplit("/p2p/", 1)[-1])
    return out


def has_reservation(dht: hivemind.DHT) -> bool:
    return any(relayed(a) for a in dht.get_visible_maddrs(latest=True))


def wait_for_reservation(dht: hivemind.DHT, timeout_s: float = RESERVATION_WAIT_S) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if has_reservation(dht):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)


# "nat/py": what a Python daemon behind a port-keeping NAT reported before 2026-12-06, when it could hole-punch only
# with its own kind (py-libp2p took the other DCUtR roles than go-libp2p: ``p2pd/libp2p_patches.py``). Members now
# report their kind alone; an older member's "nat/py" still keeps it from aggregating beside a Go daemon behind NAT.
PY_DAEMON = "/py"
NAT_KINDS = (Kind.NAT.value, Kind.NAT.value + PY_DAEMON)  # behind a port-keeping NAT: hole punching, within its kind
REPORTED_KINDS = frozenset({*(k.value for k in Kind), *NAT_KINDS})


def cannot_average(kinds: Sequence[str]) -> bool:
    """Whether a group (by its members' reachability kinds) has no member that every other can open a direct
    connection to, because some sit behind a port-keeping NAT and others behind a symmetric one: then they are behind
    different routers, and the symmetric one reaches the others only through a relay, which carries no averaging
    parts (a Go relay cuts a circuit after 128 KiB). Such a round would wait out its timeout and fail; members
    behind one kind of NAT only may share a LAN, and are left to try."""
    return any(k in NAT_KINDS for k in kinds) and not any(_reached_by_all(kinds))


def _reached_by_all(kinds: Sequence[str]) -> list[bool]:
    """A member behind a port-keeping NAT is reached by all if nobody is behind a symmetric NAT and every other
    member behind NAT can punch a hole to it (the same daemon kind)."""
    symmetric = any(k == Kind.SYMMETRIC_NAT for k in kinds)
    punching = {k for k in kinds if k in NAT_KINDS}
    return [k != Kind.SYMMETRIC_NAT and not (k in punching and (symmetric or len(punching) > 1)) for k in kinds]


def aggregates(kinds: Sequence[str]) -> list[bool]:
    """Which members of a group (by their reachability kinds, in group order) aggregate a part of its vector: never
    one behind a symmetric NAT; one behind a port-keeping NAT if no member is behind a symmetric one (it could not
    reach it) or behind a port-keeping NAT with an older Python daemon (``PY_DAEMON``); every other (public, or not
    checked yet: the first peer of a swarm, a LAN). If that leaves nobody (members all behind symmetric NATs,
    perhaps one LAN's: ``cannot_average`` refuses the other such groups), everybody: the round then succeeds or
    fails as it would have."""
    chosen = _reached_by_all(kinds)
    return chosen if any(chosen) else [True] * len(kinds)
