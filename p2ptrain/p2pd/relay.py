"""Circuit relay v2 in p2ptrain-p2pd: py-libp2p's implementation, switched on by the flags the Go daemon takes.

- A public peer (``-relay``, hivemind's default, and not ``-forceReachabilityPrivate``) relays for peers behind NAT
  (the hop protocol), within ``LIMITS``: slots, circuits, bytes and time per circuit, as go-libp2p's relay service
  bounds them.
- A peer behind NAT (``-autoRelay -forceReachabilityPrivate -trustedRelays=…``, what ``p2ptrain.swarm.nat`` asks for)
  holds a slot on each trusted relay (reserved, then refreshed by py-libp2p before it expires), accepts the
  connections relayed to it (the stop protocol: Noise and yamux run inside the circuit, so hivemind's protocols
  work over it as over TCP), advertises ``<relay address>/p2p-circuit`` addresses, and dials the circuit addresses
  of other peers behind NAT (``Relays.dial``).

A peer behind NAT also runs py-libp2p's hole punching (DCUtR, ``Relays.punch_holes``): over a relayed connection,
both ends tell each other their router's address with their listening port (what a NAT that keeps ports maps it
to), dial each other from that port at the same moment, and the two SYNs cross the routers as one connection (a TCP
simultaneous open); the relayed connection is then closed. Both ends have outbound sockets, so which one starts the
security handshake is agreed beforehand: the one that sent SYNC, as go-libp2p has it (``libp2p_patches``), so that
a Python and a Go daemon punch holes to each other as two of a kind do (in the lab, ``tests/test_nat_daemons.py``).
"""

from __future__ import annotations

import itertools
import logging

import multiaddr
import trio
from libp2p.abc import IHost, INetConn
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

logger = logging.getLogger("p2pd.relay")

# what this daemon's relay grants (go-libp2p's DefaultResources give 128 KiB and 2 minutes per circuit: enough to
# find each other; p2ptrain sends no averaging data through a relay, see p2ptrain.swarm.nat)
LIMITS = RelayLimits(duration=120, data=1 << 20, max_circuit_conns=16, max_reservations=64, reservation_ttl=3600)
RESERVE_TIMEOUT_S = 10.0
RESERVE_EVERY_S = 30.0  # go-libp2p's autorelay refreshes every minute; a reservation is a few hundred bytes
# the first waits are shorter: a Go relay that has just started replaces its relay service, forgetting every slot,
# once AutoNAT finds it public (seconds after its first peers dial back), and a slot lost then would be gone 30 s
EARLY_RESERVE_S = (3.0, 6.0, 12.0)


def is_circuit(addr: multiaddr.Multiaddr) -> bool:
    return "/p2p-circuit" in str(addr)


class Relays:
    """The relay roles of one daemon (see the module docstring). ``extra_addrs``: the list the host advertises
    besides its own addresses; circuit addresses are added to it as slots are granted."""

    def __init__(self, host: IHost, extra_addrs: list[multiaddr.Multiaddr], serve: bool, trusted: tuple[str, ...]):
        self.host, self.extra_addrs, self.trusted = host, extra_addrs, trusted
        self.serve = serve
        self.protocol = CircuitV2Protocol(host, limits=LIMITS, allow_hop=serve)
        self.transport = CircuitV2Transport(host, self.protocol, RelayConfig(roles=RelayRole.STOP | RelayRole.CLIENT))

    async def run(self, node, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        """Serve (hop and/or stop) and hold slots on the trusted relays until cancelled."""
        async with background_trio_service(self.protocol), trio.open_nursery() as nursery:
            await self.protocol.event_started.wait()
            task_status.started()
            if self.serve:
                logger.info("relaying for peers behind NAT (circuit v2)")
            for text in self.trusted:
                nursery.start_soon(self._reserve, node, text, nursery)
            await trio.sleep_forever()

    async def _reserve(self, node, text: str, nursery: trio.Nursery) -> None:  # noqa: ANN001
        """Hold a slot on one relay: reserve, advertise the circuit address, and reserve again every
        ``RESERVE_EVERY_S``, sooner at first (``EARLY_RESERVE_S``): a relay may lose its slots (the Go daemon
        replaces its relay service once it finds itself public, and a restarted relay knows nobody)."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(text))
        circuit = _circuit_of(text)
        held = None  # unknown yet
        for attempt in itertools.count():
            try:
                with trio.fail_after(RESERVE_TIMEOUT_S):
                    await node.connect(info.peer_id, list(info.addrs))
                    stream = await self.host.new_stream(info.peer_id, [PROTOCOL_ID])
                    granted = await self.transport.reserve(stream, info.peer_id, nursery)
                    await stream.close()
                why = "" if granted else "refused"
            except Exception as e:  # noqa: BLE001 - a relay that is down: the others may hold one
                granted, why = False, repr(e)
            if granted and held is not True:
                if circuit not in self.extra_addrs:
                    self.extra_addrs.append(circuit)
                logger.info("relay %s holds a slot for us: reachable at %s", info.peer_id, circuit)
                await node.announce()
            elif not granted and held is not False:
                logger.warning("relay %s: no slot (%s)", text, why)
            held = granted
            await trio.sleep(EARLY_RESERVE_S[attempt] if attempt < len(EARLY_RESERVE_S) else RESERVE_EVERY_S)

    async def punch_holes(self, task_status=trio.TASK_STATUS_IGNORED) -> None:  # noqa: ANN001
        """py-libp2p's DCUtR until cancelled: it tries (up to 3 times) with each peer it is connected to only through
        a relay, and answers the tries of others (Go's too: the protocol is the same)."""
        async with background_trio_service(DCUtRProtocol(self.host)) as manager:
            task_status.started()
            await manager.wait_finished()

    def circuits_through_trusted(self) -> list[multiaddr.Multiaddr]:
        """A circuit address through each trusted relay: where a peer behind NAT in the same swarm holds its slots.
        For a peer known only by its LAN address (a Node dials it so), this is the only way in."""
        return [_circuit_of(text) for text in self.trusted]

    async def dial(self, peer_id: ID, circuit_addrs: list[multiaddr.Multiaddr]) -> INetConn:
        """A connection to ``peer_id`` through the first of its circuit addresses that works."""
        failures = []
        for addr in circuit_addrs:
            text = str(addr)
            full = addr if text.endswith(f"/p2p/{peer_id}") else multiaddr.Multiaddr(f"{text}/p2p/{peer_id}")
            try:
                return await self.transport.dial(full)
            except Exception as e:  # noqa: BLE001 - try the next relay
                failures.append(f"{addr}: {e!r}")
        raise ConnectionError(f"no relay reached {peer_id}: {'; '.join(failures) or 'no circuit address'}")


def _circuit_of(relay: str) -> multiaddr.Multiaddr:
    """``<relay address>/p2p/<relay id>/p2p-circuit`` for a relay's ``<address>/p2p/<id>``."""
    info = info_from_p2p_addr(multiaddr.Multiaddr(relay))
    base = multiaddr.Multiaddr(relay.split("/p2p/")[0])
    return base.encapsulate(multiaddr.Multiaddr(f"/p2p/{info.peer_id}/p2p-circuit"))
