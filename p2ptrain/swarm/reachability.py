"""Can other peers open a connection to this one, and if not, what kind of NAT is in the way?

A peer behind a NAT still trains: it opens its connections itself. What it cannot do is accept one, so how it
takes part depends on what its NAT does (``nat.py`` draws the consequences). Neither daemon tells hivemind, so
p2ptrain asks: ``p2ptrain.reach`` is a unary handler on every peer; a caller sends the TCP port it listens on,
the callee tries one TCP connect to **the address it sees the caller at** (never an address the caller names: no
peer can use another as a port scanner) and answers whether it got through, and the address and port it sees the
caller's connection come from. protocols/reach.md has the wire format.

From the answers (``classify``):

- ``direct``: a peer connected back, to an address of this machine: it is on the internet itself;
- ``mapped``: a peer connected back through a NAT (the address it saw is not this machine's): the router forwards
  the port, mapped by UPnP / NAT-PMP or by hand;
- ``nat``: no peer got through, and at least half of them saw this peer's connections come from its own listening
  port: a NAT that keeps ports, which TCP hole punching gets through (the daemon dials from its listening port;
  now and then it dials from another one, when a dial from it collides with one from the other side);
- ``symmetric-nat``: no peer got through, and most ports they saw differ from it: a NAT that picks a new port per
  connection; only a relay reaches this peer;
- ``unknown``: nobody answered yet.

``Checker`` asks again every 10 minutes, and within seconds when this machine's addresses change (a laptop moving
to another network, a router handing out a new address).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from functools import partial
from typing import Any

import hivemind
import msgpack
import psutil
from hivemind.p2p import P2PContext

logger = logging.getLogger(__name__)

PROTOCOL = "p2ptrain.reach"
DIAL_TIMEOUT_S = 3.0
ASK_TIMEOUT_S = 10.0
ASK_PEERS = 5  # peers asked per check (some may be plain DHT nodes that do not answer)
MIN_INTERVAL_PER_CALLER_S = 5.0  # a caller gets at most one dial-back per this interval
CHECK_EVERY_S = 600.0
UNKNOWN_RETRY_S = 10.0  # how soon to ask again while nobody has answered
WATCH_ADDRESSES_S = 5.0  # how often this machine's addresses are compared with the last check's
MAX_MESSAGE_BYTES = 256
MAX_MAPPED = 4  # ports a router maps to the caller, dialed as well


class Message(dict):
    """A small msgpack map with the two methods hivemind's P2P calls on a protobuf message."""

    @classmethod
    def FromString(cls, data: bytes) -> Message:  # noqa: N802 - hivemind's protobuf-style name
        if len(data) > MAX_MESSAGE_BYTES:
            raise ValueError(f"{PROTOCOL} message of {len(data)} bytes")
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
        if not isinstance(value, dict):
            raise ValueError(f"{PROTOCOL} message is not a map")
        return cls(value)

    def SerializeToString(self) -> bytes:  # noqa: N802
        return msgpack.packb(dict(self), use_bin_type=True)


@dataclass(frozen=True)
class Answer:
    """One peer's answer: did its dial-back get through, and where does it see our connection come from."""

    reachable: bool
    ip: str
    port: int = 0  # the port our connection comes from; 0: the peer did not say (an older peer)
    through: int = 0  # the port its dial-back got through on (one we listen on, or one a router maps to us)


class Kind(str, Enum):
    DIRECT = "direct"
    MAPPED = "mapped"
    NAT = "nat"
    SYMMETRIC_NAT = "symmetric-nat"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Reach:
    """What the last check found (``classify``)."""

    kind: Kind
    ip: str = ""  # the address peers see this one at
    port: int = 0  # the port this peer listens on

    @property
    def public(self) -> bool:
        """Others can open connections to this peer: it can aggregate for anyone and relay for peers behind NAT."""
        return self.kind in (Kind.DIRECT, Kind.MAPPED)

    @property
    def behind_nat(self) -> bool:
        return self.kind in (Kind.NAT, Kind.SYMMETRIC_NAT)

    def describe(self) -> str:
        """One line a volunteer can act on: what it is, and what it costs."""
        at = f"{self.ip}:{self.port}"
        if self.kind == Kind.DIRECT:
            return f"reachable directly at {at}"
        if self.kind == Kind.MAPPED:
            return f"reachable directly at {at} (port mapped on the router)"
        forward = f"forward TCP port {self.port} to this machine (or turn on UPnP in the router) to be reachable"
        if self.kind == Kind.NAT:
            return (
                f"behind NAT ({self.ip}): peers reach this one through a relay, then directly by hole punching; "
                f"{forward}"
            )
        if self.kind == Kind.SYMMETRIC_NAT:
            return (
                f"behind a NAT that changes ports ({self.ip}): hole punching cannot work, so this peer averages only "
                f"through reachable peers (slower); {forward}"
            )
        return "not checked yet (no other peer to ask)"


UNKNOWN = Reach(Kind.UNKNOWN)


def observed_addr(peers: list[Any], peer_id: Any) -> tuple[str, int] | None:
    """The IPv4 address and TCP port a direct connection to ``peer_id`` comes from (as ``list_peers`` has it)."""
    for info in peers:
        if info.peer_id != peer_id:
            continue
        for addr in info.addrs:
            parts = str(addr).split("/")
            if len(parts) > 4 and parts[1] == "ip4" and parts[3] == "tcp" and "p2p-circuit" not in parts:
                return parts[2], int(parts[4])
    return None


async def can_connect(ip: str, port: int, timeout_s: float = DIAL_TIMEOUT_S) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), timeout_s)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


async def serve(_dht: hivemind.DHT, node: Any, min_interval_s: float = MIN_INTERVAL_PER_CALLER_S) -> None:
    """Register the dial-back handler (runs in hivemind's DHT process)."""
    last_dial: dict[Any, float] = {}

    async def answer(request: Message, context: P2PContext) -> Message:
        port, mapped = request.get("port"), request.get("mapped", [])
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError("port must be an integer in 1-65535")
        if not isinstance(mapped, list) or len(mapped) > MAX_MAPPED or not all(valid_port(p) for p in mapped):
            raise ValueError(f"mapped must be a list of at most {MAX_MAPPED} ports")
        now = time.monotonic()
        if context.remote_id in last_dial and now - last_dial[context.remote_id] < min_interval_s:
            raise ValueError("asked too often")
        last_dial[context.remote_id] = now
        seen = observed_addr(await node.p2p.list_peers(), context.remote_id)
        if seen is None:  # only a relayed connection: we cannot tell where the caller is
            return Message(reachable=False, ip="", port=0)
        ip, seen_port = seen
        ports = list(dict.fromkeys([port, *mapped]))
        results = await asyncio.gather(*(can_connect(ip, p) for p in ports))
        through = next((p for p, ok in zip(ports, results, strict=True) if ok), 0)
        return Message(reachable=bool(through), ip=ip, port=seen_port, through=through)

    await node.p2p.add_protobuf_handler(PROTOCOL, answer, Message)


def valid_port(port: object) -> bool:
    return isinstance(port, int) and 1 <= port <= 65535


async def ask(_dht: hivemind.DHT, node: Any, port: int, mapped: tuple[int, ...] = ()) -> list[Answer]:
    """Ask up to ASK_PEERS peers we have direct connections to to dial ``port`` (and the ports a router maps to us,
    ``mapped``) back; their answers."""
    infos = await node.p2p.list_peers()
    direct = [i.peer_id for i in infos if any(not relayed(a) for a in i.addrs)]
    peers = list(dict.fromkeys(p for p in direct if p != node.peer_id))
    random.shuffle(peers)
    peers = peers[:ASK_PEERS]

    async def one(peer_id: Any) -> Answer | None:
        try:
            response = await asyncio.wait_for(
                node.p2p.call_protobuf_handler(
                    peer_id, PROTOCOL, Message(port=port, mapped=list(mapped[:MAX_MAPPED])), Message
                ),
                ASK_TIMEOUT_S,
            )
        except Exception as e:  # noqa: BLE001 - an old peer without the handler, a timeout: no answer
            logger.debug("reachability: %s did not answer: %s", peer_id, e)
            return None
        reachable, ip = response.get("reachable"), response.get("ip")
        seen_port, through = response.get("port", 0), response.get("through", port if reachable else 0)
        if not isinstance(reachable, bool) or not isinstance(ip, str):
            return None
        if not isinstance(seen_port, int) or not isinstance(through, int):
            return None
        return Answer(reachable, ip, seen_port, through) if ip else None

    answers = await asyncio.gather(*(one(p) for p in peers))
    return [a for a in answers if a is not None]


def listen_port(maddrs: list[Any], own_ips: set[str] | None = None) -> int | None:
    """The TCP port we listen on: that of an address at one of ``own_ips`` (a router's mapped port is not it)."""
    candidates = []
    for addr in maddrs:
        parts = str(addr).split("/")
        if "tcp" in parts and "p2p-circuit" not in parts:
            port = int(parts[parts.index("tcp") + 1])
            if port:
                candidates.append((own_ips is not None and len(parts) > 2 and parts[2] not in own_ips, port))
    return min(candidates)[1] if candidates else None


def local_ips() -> set[str]:
    """This machine's IPv4 addresses."""
    return {a.address for nics in psutil.net_if_addrs().values() for a in nics if a.family.name == "AF_INET"}


def relayed(addr: object) -> bool:
    """A multiaddr (a connection's remote address, one of ours) that goes through a circuit relay."""
    return "/p2p-circuit" in str(addr)


def direct_peers(infos: list[Any]) -> set[str]:
    """The peers (base58 ids) with at least one direct connection among ``infos`` (the daemon's ``list_peers``: one
    entry per connection)."""
    return {i.peer_id.to_base58() for i in infos if any(not relayed(a) for a in i.addrs)}


def is_global(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_global
    except ValueError:
        return False


def classify(answers: list[Answer], port: int, own_ips: set[str]) -> Reach:
    """What the answers say about this peer listening on ``port`` (see the module docstring). Answers from peers on
    the internet outweigh those from peers on this LAN (which see a private address): reachable from a neighbour is
    not reachable from the internet."""
    from_internet = [a for a in answers if is_global(a.ip)]
    answers = from_internet or answers
    through = [a for a in answers if a.reachable]
    if through:
        ip, at = through[0].ip, through[0].through or port
        return Reach(Kind.DIRECT if ip in own_ips else Kind.MAPPED, ip, at)
    if not answers:
        return Reach(Kind.UNKNOWN, "", port)
    ip = answers[0].ip
    told = [a.port for a in answers if a.port]
    keeps_port = bool(told) and 2 * sum(p == port for p in told) >= len(told)
    return Reach(Kind.NAT if keeps_port else Kind.SYMMETRIC_NAT, ip, port)


def mapped_ports(maddrs: list[Any], own_ips: set[str]) -> tuple[int, ...]:
    """Ports of our advertised addresses at an IP that is not this machine's: a router maps them to us (UPnP,
    NAT-PMP: the Go daemon advertises the external address it got)."""
    ports = []
    for addr in maddrs:
        parts = str(addr).split("/")
        if len(parts) > 4 and parts[1] == "ip4" and parts[3] == "tcp" and "p2p-circuit" not in parts:
            if parts[2] not in own_ips and int(parts[4]):
                ports.append(int(parts[4]))
    return tuple(dict.fromkeys(ports))


def news(found: Reach, known: Reach | None) -> Reach:
    """``found``, unless nobody answered (peers answer a caller once per interval): then what was ``known``."""
    return known if found.kind == Kind.UNKNOWN and known is not None else found


def check(dht: hivemind.DHT, mapped: tuple[int, ...] | None = None) -> Reach:
    """Ask now (a few seconds at most). ``mapped``: ports a router maps to us (default: those of our advertised
    addresses at an IP that is not this machine's)."""
    maddrs, own = dht.get_visible_maddrs(latest=True), local_ips()
    port = listen_port(maddrs, own)
    if port is None:
        return UNKNOWN
    mapped = mapped_ports(maddrs, own) if mapped is None else mapped
    answers = dht.run_coroutine(partial(ask, port=port, mapped=mapped))
    reach = classify(answers, port, own)
    logger.debug("Reachability answers for port %d: %s → %s", port, answers, reach.kind.value)
    seen = sorted({a.port for a in answers if a.port})
    if reach.behind_nat and seen != [port]:
        logger.info("Peers saw this peer's connections come from ports %s (it listens on %d)", seen, port)
    return reach


class Checker:
    """Checks reachability now and then (and when this machine's addresses change), logs changes, and tells
    ``on_change`` (the peer: its status, and whether its role must change)."""

    def __init__(
        self,
        dht: hivemind.DHT,
        on_change: Callable[[Reach], None],
        first: Reach = UNKNOWN,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._dht, self._on_change, self._clock = dht, on_change, clock
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reachability", daemon=True)
        self.last = first

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        addresses, next_check = local_ips(), self._clock() + (0.0 if self.last.kind == Kind.UNKNOWN else CHECK_EVERY_S)
        while not self._stop.wait(WATCH_ADDRESSES_S):
            now_addresses = local_ips()
            moved = now_addresses != addresses
            if moved:
                logger.info("This machine's addresses changed: checking reachability again")
                addresses = now_addresses
            if not moved and self._clock() < next_check:
                continue
            try:
                result = check(self._dht)
            except Exception as e:  # noqa: BLE001 - the DHT is shutting down; nothing to report
                logger.debug("reachability check failed: %s", e)
                result = self.last
            if result.kind == Kind.UNKNOWN and self.last.kind != Kind.UNKNOWN:  # nobody answered: the last finding
                next_check = self._clock() + UNKNOWN_RETRY_S  # stands (peers answer a caller once per interval)
                continue
            if result != self.last:
                logger.info("Reachability: %s", result.describe())
                self.last = result
                self._on_change(result)
            next_check = self._clock() + (UNKNOWN_RETRY_S if result.kind == Kind.UNKNOWN else CHECK_EVERY_S)

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
