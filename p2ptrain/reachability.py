"""Can other peers open a connection to this one? Asked of swarm members, answered by their dialing back.

A peer behind a NAT still trains (it opens its connections itself), but nobody can open one to it, so it
can only ever be the dialing side; the user should know, and know which port to forward. Neither daemon tells
hivemind its NAT status, so p2ptrain asks: ``p2ptrain.reach`` is a unary handler on every peer; a caller sends
the TCP port it listens on, the callee tries one TCP connect to **the address it sees the caller at** (never
an address the caller names: no peer can use another as a port scanner) and says whether it got through.
protocols/reach.md has the wire format. A relay address (``/p2p-circuit``) in this peer's own addresses
means it is reachable only through that relay.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from functools import partial
from typing import Any

import hivemind
import msgpack
from hivemind.p2p import P2PContext

logger = logging.getLogger(__name__)

PROTOCOL = "p2ptrain.reach"
DIAL_TIMEOUT_S = 3.0
ASK_TIMEOUT_S = 10.0
ASK_PEERS = 3  # members asked per check
MIN_INTERVAL_PER_CALLER_S = 30.0  # a caller gets at most one dial-back per this interval
CHECK_EVERY_S = 600.0
MAX_MESSAGE_BYTES = 256

UNKNOWN = "not checked yet (no other peer to ask)"


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


def observed_ip(peers: list[Any], peer_id: Any) -> str | None:
    """The IPv4 address our connection to ``peer_id`` comes from (as ``list_peers`` reports it)."""
    for info in peers:
        if info.peer_id == peer_id:
            for addr in info.addrs:
                parts = str(addr).split("/")
                if len(parts) > 2 and parts[1] == "ip4":
                    return parts[2]
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
        port = request.get("port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError("port must be an integer in 1-65535")
        now = time.monotonic()
        if context.remote_id in last_dial and now - last_dial[context.remote_id] < min_interval_s:
            raise ValueError("asked too often")
        last_dial[context.remote_id] = now
        ip = observed_ip(await node.p2p.list_peers(), context.remote_id)
        if ip is None:
            return Message(reachable=False, ip="")
        return Message(reachable=await can_connect(ip, port), ip=ip)

    await node.p2p.add_protobuf_handler(PROTOCOL, answer, Message)


async def ask(_dht: hivemind.DHT, node: Any, port: int) -> list[tuple[bool, str]]:
    """Ask up to ASK_PEERS connected peers to dial ``port`` back; their (reachable, ip-they-saw) answers."""
    peers = [info.peer_id for info in await node.p2p.list_peers()]
    peers = list(dict.fromkeys(p for p in peers if p != node.peer_id))[:ASK_PEERS]

    async def one(peer_id: Any) -> tuple[bool, str] | None:
        try:
            response = await asyncio.wait_for(
                node.p2p.call_protobuf_handler(peer_id, PROTOCOL, Message(port=port), Message), ASK_TIMEOUT_S
            )
        except Exception as e:  # noqa: BLE001 - an old peer without the handler, a timeout: no answer
            logger.debug("reachability: %s did not answer: %s", peer_id, e)
            return None
        reachable, ip = response.get("reachable"), response.get("ip")
        if not isinstance(reachable, bool) or not isinstance(ip, str):
            return None
        return reachable, ip

    answers = await asyncio.gather(*(one(p) for p in peers))
    return [a for a in answers if a is not None]


def listen_port(maddrs: list[Any]) -> int | None:
    for addr in maddrs:
        parts = str(addr).split("/")
        if "tcp" in parts and "p2p-circuit" not in parts:
            port = int(parts[parts.index("tcp") + 1])
            if port:
                return port
    return None


def verdict(maddrs: list[Any], answers: list[tuple[bool, str]]) -> str:
    port = listen_port(maddrs)
    if any("p2p-circuit" in str(a) for a in maddrs) and not any(ok for ok, _ in answers):
        return "reachable only through a relay"
    if port is None:
        return "not reachable: this peer does not listen on TCP"
    if any(ok for ok, _ in answers):
        ip = next(ip for ok, ip in answers if ok)
        return f"reachable directly (a peer connected back to {ip}:{port})"
    if answers:
        return (
            f"not reachable from the internet: forward TCP port {port} to this machine (or pass --port and "
            f"--announce /ip4/<public ip>/tcp/<port>); it still trains through connections it opens itself"
        )
    return UNKNOWN


class Checker:
    """Checks reachability now and then, logs changes, keeps the last verdict in the peer's status."""

    def __init__(self, dht: hivemind.DHT, on_verdict):
        self._dht, self._on_verdict = dht, on_verdict
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reachability", daemon=True)
        self.last = UNKNOWN

    def start(self) -> None:
        self._dht.run_coroutine(serve)
        self._thread.start()

    def check(self) -> str:
        maddrs = self._dht.get_visible_maddrs()
        port = listen_port(maddrs)
        answers = self._dht.run_coroutine(partial(ask, port=port)) if port else []
        return verdict(maddrs, answers)

    def _run(self) -> None:
        wait_s = 5.0
        while not self._stop.wait(wait_s):
            try:
                result = self.check()
            except Exception as e:  # noqa: BLE001 - the DHT is shutting down; nothing to report
                logger.debug("reachability check failed: %s", e)
                result = self.last
            if result != self.last:
                logger.info("Reachability: %s", result)
                self.last = result
                self._on_verdict(result)
            wait_s = 30.0 if result == UNKNOWN else CHECK_EVERY_S

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
