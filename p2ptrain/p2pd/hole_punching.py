"""Changes to py-libp2p 0.8.1's hole punching (DCUtR), so that Python daemons behind NAT punch holes to each other
and to Go daemons, installed with ``libp2p_patches.install``.

Over a relayed connection the two peers tell each other the addresses their routers show, then dial each other at
the same moment from their listening ports, and the SYNs cross the routers as one connection (a TCP simultaneous
open). py-libp2p 0.8.1 dialled from the first address the host advertises, took the spec's roles where go-libp2p
takes the other ones, and started a try from both ends at once; each of the three spoiled the punch.
"""

from __future__ import annotations


def hole_punches_from_the_listening_port() -> None:
    """DCUtR's hole-punching dials leave from the address the host listens on (``0.0.0.0:31337``), not from the
    first address it advertises, which can be one a dial cannot be bound to or leave from: ``127.0.0.1`` on a host
    with nothing else, the router's address that peers observed behind NAT (seen: with ``127.0.0.1`` first, every
    punch dial stayed on the machine)."""
    from libp2p.relay.circuit_v2 import dcutr

    if getattr(dcutr, "_p2ptrain_listen_source", False):
        return

    def local_tcp_listen_addrs(host) -> list[tuple[int, str, int]]:  # noqa: ANN001
        found = (dcutr._tcp_ip_port(a) for a in host.get_transport_addrs() if "/p2p-circuit" not in str(a))
        return [f for f in found if f is not None]

    dcutr._local_tcp_listen_addrs = local_tcp_listen_addrs
    dcutr._p2ptrain_listen_source = True


def hole_punch_roles_like_go() -> None:
    """The peer that sends DCUtR's SYNC is the client of the punched connection, as go-libp2p makes it
    (``holePunchConnect(..., isClient=true)`` in its holepuncher), and the peer that receives SYNC the server.

    The two sides' dials cross (TCP simultaneous open): both ends hold an outbound socket, and only this choice says
    which one starts the security handshake. py-libp2p 0.8.1 takes the spec's roles, the other way round, so with a
    Go daemon both ends started Noise as initiators (or both waited) and the punched connection failed. Every Python
    daemon of a swarm is p2ptrain's, so taking go-libp2p's roles keeps two Python daemons agreeing as well."""
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

    if getattr(DCUtRProtocol, "_p2ptrain_go_roles", False):
        return
    perform = DCUtRProtocol._perform_hole_punch

    async def _perform_hole_punch(self: DCUtRProtocol, peer_id, addrs, as_responder: bool = False) -> bool:  # noqa: ANN001
        return await perform(self, peer_id, addrs, as_responder=not as_responder)

    DCUtRProtocol._perform_hole_punch = _perform_hole_punch
    DCUtRProtocol._p2ptrain_go_roles = True


def hole_punches_started_by_the_callee() -> None:
    """A hole punch starts from the peer that accepted the relayed connection, as go-libp2p's holepuncher starts on
    an inbound relayed connection; the peer that dialled through the relay only answers.

    py-libp2p's DCUtR drives a try to every peer it reaches only through a relay, from both ends at once: two
    sessions whose dials leave from the same port to the same address, where one socket each can exist, and whose
    roles cross."""
    from libp2p.rcmgr import Direction
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

    if getattr(DCUtRProtocol, "_p2ptrain_callee_starts", False):
        return
    initiate = DCUtRProtocol.initiate_hole_punch

    def called_through_a_relay(conn) -> bool:  # noqa: ANN001 - py-libp2p's INetConn
        try:
            relayed = any("/p2p-circuit" in str(a) for a in conn.get_transport_addresses())
        except Exception:  # noqa: BLE001 - a connection closing under us
            return False
        return relayed and getattr(conn, "direction", None) == Direction.INBOUND

    async def initiate_hole_punch(self: DCUtRProtocol, peer_id) -> bool:  # noqa: ANN001
        conns = self.host.get_network().connections.get(peer_id) or []
        if not any(called_through_a_relay(c) for c in (conns if isinstance(conns, list) else [conns])):
            return False
        return await initiate(self, peer_id)

    DCUtRProtocol.initiate_hole_punch = initiate_hole_punch
    DCUtRProtocol._p2ptrain_callee_starts = True


def no_plain_dial_before_a_punch() -> None:
    """A try starts with the DCUtR exchange, not with py-libp2p's "unilateral upgrade": a plain dial, from the
    listening port, to every address the peerstore holds for the peer, which after a first try includes the
    router addresses the peer sent (stored for 10 minutes). That dial leaves this peer's router holding state for
    the peer's router address, and the peer's punching SYN that meets it reaches this peer's listener as a plain
    inbound connection, on which neither end starts the handshake (the failure of a Go peer dialling an advertised
    router address, ``host.advertised``). A peer reached only through a relay is one p2ptrain found behind NAT."""
    from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol

    async def _try_unilateral_upgrade(self: DCUtRProtocol, peer_id) -> bool:  # noqa: ANN001, ARG001
        return False

    DCUtRProtocol._try_unilateral_upgrade = _try_unilateral_upgrade


def install() -> None:
    hole_punches_from_the_listening_port()
    hole_punch_roles_like_go()
    hole_punches_started_by_the_callee()
    no_plain_dial_before_a_punch()
