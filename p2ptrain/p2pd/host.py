"""The libp2p host behind the daemon: identity, TCP + Noise + yamux, Kademlia peer routing, mDNS.

What the Go daemon hivemind bundles offers and what this one matches (protocols/p2pd.md has the list):
the same peer id from the same key file, the same security (Noise) and muxer (yamux) so the two dial each
other, and Kademlia on ``/ipfs/kad/1.0.0`` so that a bare peer id — all that hivemind's DHT stores —
resolves to addresses.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import multiaddr
import psutil
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import create_new_key_pair as new_ed25519
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from p2ptrain.p2pd.flags import Options
from p2ptrain.p2pd.relay import is_circuit

logger = logging.getLogger("p2pd.host")

DIAL_TIMEOUT_S = 15.0
DIRECT_FIRST_S = 4.0  # a direct dial, before the relay is tried (when there is one)
ADDRESS_TTL_S = 120  # as py-libp2p's host.connect
# never dialled: a peer that advertises an unspecified address (py-libp2p's mDNS and identify do, for a host on
# 0.0.0.0) means its own machine, and the dial would reach ours; py-libp2p would try it first, fail, and then
# refuse the peer's real addresses for a while (its negative dial cache)
UNDIALABLE = ("0.0.0.0/32", "::/128")
ANNOUNCE_TIMEOUT_S = 10.0
NEXT_ADDRESS_S = 0.25  # a peer's next direct address is dialled this long after the previous one (go-libp2p's ranker)
MAX_KEY_FILE_BYTES = 64 * 1024


def load_identity(path: str | None) -> KeyPair:
    """The key in ``path`` (libp2p's protobuf ``PrivateKey``, as hivemind writes it), else a fresh ed25519 key."""
    if path is None:
        return new_ed25519()
    data = Path(path).read_bytes()
    if len(data) > MAX_KEY_FILE_BYTES:
        raise ValueError(f"{path} is not a libp2p private key ({len(data)} bytes)")
    private = deserialize_private_key(data)
    return KeyPair(private, private.get_public_key())


def local_ipv4() -> list[str]:
    """This machine's IPv4 interface addresses, loopback first."""
    return sorted(
        {a.address for nics in psutil.net_if_addrs().values() for a in nics if a.family.name == "AF_INET"},
        key=lambda ip: (not ipaddress.ip_address(ip).is_loopback, ip),
    )


def expand_unspecified(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """``/ip4/0.0.0.0/tcp/N`` → one address per local IPv4 interface, as go-libp2p's ``host.Addrs()`` does."""
    local = local_ipv4()
    out: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        text = str(addr)
        if text.startswith("/ip4/0.0.0.0/"):
            out.extend(multiaddr.Multiaddr(text.replace("/ip4/0.0.0.0/", f"/ip4/{ip}/", 1)) for ip in local)
        else:
            out.append(addr)
    seen: set[str] = set()
    return [a for a in out if not (str(a) in seen or seen.add(str(a)))]


def without_peer_id(addr: multiaddr.Multiaddr) -> multiaddr.Multiaddr:
    """``addr`` without a trailing ``/p2p/<id>`` (a circuit address keeps its relay's id)."""
    head, sep, tail = str(addr).rpartition("/p2p/")
    return multiaddr.Multiaddr(head) if sep and "/" not in tail else addr


@dataclass
class Node:
    """A running host, its Kademlia routing, and how peers are found."""

    options: Options
    host: IHost
    dht: KadDHT
    extra_addrs: list[multiaddr.Multiaddr] = field(default_factory=list)  # advertised too (a mapped port, circuits)
    relays: object | None = None  # p2pd.relay.Relays: dials circuit addresses
    mapped_port: int | None = None  # the TCP port the router maps to us (UPnP), removed at exit
    remembered: set[ID] = field(default_factory=set)  # peers already offered to the routing table
    dialing: dict[ID, trio.Lock] = field(default_factory=dict)  # one dial at a time per peer (``_dial``)

    async def map_port(self, upnp) -> None:  # noqa: ANN001 - py-libp2p's UpnpManager
        """Map the TCP port we listen on, on the router (UPnP IGD, through py-libp2p's miniupnpc manager), and
        advertise the external address: the router then forwards the same port to us. Runs in the background: a
        network without an IGD costs a discovery timeout, never the daemon's start."""
        port = next((a.value_for_protocol("tcp") for a in self.host.get_transport_addrs()), None)
        if not port or not await upnp.discover():
            logger.info("UPnP: no gateway found (no port mapped)")
            return
        external = upnp.get_external_ip()
        if external and await upnp.add_port_mapping(int(port), "TCP"):
            self.mapped_port = int(port)
            self.extra_addrs.append(multiaddr.Multiaddr(f"/ip4/{external}/tcp/{port}"))
            logger.info("UPnP: the router maps %s:%s to us", external, port)
            await self.announce()

    async def announce(self) -> None:
        """Tell the peers we are connected to that our addresses changed (identify push), as go-libp2p does:
        a relay slot or a mapped port is of use only once others know it."""
        from libp2p.identity.identify_push.identify_push import push_identify_to_peers

        with trio.move_on_after(ANNOUNCE_TIMEOUT_S):
            await push_identify_to_peers(self.host)

    def listen_addrs(self) -> list[multiaddr.Multiaddr]:
        """What this host advertises (``advertised``), without the ``/p2p`` suffix: IDENTIFY's answer to hivemind."""
        return [without_peer_id(a) for a in self.host.get_addrs()]

    async def ensure_connected(self, peer_id: ID, timeout_s: float = DIAL_TIMEOUT_S) -> None:
        """Connected to ``peer_id`` or an exception: known addresses first, then a Kademlia lookup."""
        if self.is_connected(peer_id):
            return
        with trio.fail_after(timeout_s):
            addrs = self.host.get_peerstore().addrs(peer_id) if peer_id in self.host.get_peerstore().peer_ids() else []
            if not addrs:
                found = await self.dht.find_peer(peer_id)
                if found is None or not found.addrs:
                    raise ConnectionError(f"peer {peer_id} not found (no known address, not in the DHT)")
                addrs = found.addrs
            await self._dial(peer_id, addrs)
        await self.remember(peer_id)

    async def connect(self, peer_id: ID, addrs: list[multiaddr.Multiaddr], timeout_s: float = DIAL_TIMEOUT_S) -> None:
        """Connected to ``peer_id``; its direct addresses are kept even when a connection is already open (as
        go-libp2p's ``Connect`` does): an inbound connection tells only the peer's ephemeral port, and the next dial
        after it closes needs a listening one."""
        if not addrs:
            await self.ensure_connected(peer_id, timeout_s)
            return
        if self.is_connected(peer_id):
            self.host.get_peerstore().add_addrs(peer_id, [a for a in addrs if not is_circuit(a)], ADDRESS_TTL_S)
        else:
            with trio.fail_after(timeout_s):
                await self._dial(peer_id, addrs)
        await self.remember(peer_id)

    def is_connected(self, peer_id: ID) -> bool:
        """An open connection: py-libp2p keeps a closed one listed for a while and would not dial again."""
        return any(not conn.is_closed for conn in self.host.get_network().get_connections(peer_id))

    async def _dial(self, peer_id: ID, addrs: list[multiaddr.Multiaddr]) -> None:
        """``_dial_once``, one at a time per peer: hivemind opens several streams to a peer at once, and each would
        otherwise dial it (a relay circuit each: seen, 8 relayed connections to one peer, then py-libp2p's per-peer
        limit refused more)."""
        lock = self.dialing.setdefault(peer_id, trio.Lock())
        try:
            async with lock:
                if not self.is_connected(peer_id):  # else another call has just dialled it
                    await self._dial_once(peer_id, addrs)
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self.dialing.pop(peer_id, None)

    async def _dial_once(self, peer_id: ID, addrs: list[multiaddr.Multiaddr]) -> None:
        """Directly if it has a direct address that answers, else through a relay: its circuit addresses, or else
        the trusted relays (the swarm's peers behind NAT hold their slots there; seen: a Python peer behind NAT knew
        a Go peer behind another NAT, both on a Python relay, only by its LAN address). A peer known
        only by LAN addresses gets ``DIRECT_FIRST_S`` for the direct attempt when a relay is there to fall back on:
        a LAN address behind another router never answers, and waiting out the TCP timeout would use up the
        caller's. A peer with a public address is never dialled through the trusted relays (averaging data does
        not go through relays)."""
        circuits = [a for a in addrs if is_circuit(a)]
        direct = [a for a in addrs if not is_circuit(a)]
        lan_only = not any(is_public(a) for a in direct)
        if self.relays is not None and not circuits and lan_only:
            circuits = [c for c in self.relays.circuits_through_trusted() if f"/p2p/{peer_id}/" not in str(c)]
        if direct:
            self.host.get_peerstore().add_addrs(peer_id, direct, ADDRESS_TTL_S)
            try:
                with trio.fail_after(DIRECT_FIRST_S if circuits and lan_only else math.inf):
                    connection = await self._dial_direct(peer_id, direct)
                    await connection.event_started.wait()
                return
            except Exception:
                if not (circuits and self.relays is not None):
                    raise
        if not circuits or self.relays is None:
            raise ConnectionError(f"peer {peer_id} has no address this daemon can dial")
        await self.relays.dial(peer_id, circuits)

    async def _dial_direct(self, peer_id: ID, addrs: list[multiaddr.Multiaddr]):  # noqa: ANN202 - INetConn
        """The first connection that one of ``addrs`` gives, each dialled ``NEXT_ADDRESS_S`` after the one before,
        as go-libp2p's dialer does. py-libp2p's ``dial_peer`` dials one address per transport, the first its
        peerstore lists: for a peer behind a router that maps its port, that was its LAN address (identify lists the
        mapped one last), which no one outside that LAN can reach, so the dial timed out (seen: a Python peer behind
        NAT never reached a Python peer with a mapped port)."""
        network, won, errors = self.host.get_network(), [], []
        addrs = [a for a in addrs if await network.connection_gate.is_allowed(a)]  # as dial_peer: UNDIALABLE
        if not addrs:
            raise ConnectionError(f"All addresses for peer {peer_id} blocked by connection gate")
        addrs = [a for a in addrs if not is_loopback(a)] or addrs  # as dial_peer: not ours, if it has others

        async def attempt(addr: multiaddr.Multiaddr, delay_s: float, done: trio.CancelScope) -> None:
            await trio.sleep(delay_s)
            try:
                won.append(await network.dial_addr(addr, peer_id))
                done.cancel()
            except Exception as e:  # noqa: BLE001 - the next address may answer
                errors.append(f"{addr}: {e}")

        async with trio.open_nursery() as nursery:
            for i, addr in enumerate(addrs):
                nursery.start_soon(attempt, addr, i * NEXT_ADDRESS_S, nursery.cancel_scope)
        if not won:
            raise ConnectionError(f"no address of peer {peer_id} answered: {'; '.join(errors)}")
        return won[0]

    async def remember(self, peer_id: ID) -> None:
        """Put a peer we talk to in the Kademlia routing table, so that others can find it through us."""
        if peer_id in self.remembered:
            return
        self.remembered.add(peer_id)
        try:
            await self.dht.add_peer(peer_id, skip_server_mode_check=True)
        except Exception as e:  # noqa: BLE001 - a routing-table hiccup must not fail the call that led here
            logger.debug("routing table: could not add %s: %s", peer_id, e)

    async def bootstrap(self) -> int:
        """Dial the bootstrap peers (concurrently); how many answered."""
        answered = 0

        async def dial(text: str) -> None:
            nonlocal answered
            try:
                info = info_from_p2p_addr(multiaddr.Multiaddr(text))
                await self.connect(info.peer_id, list(info.addrs))
                answered += 1
            except Exception as e:  # noqa: BLE001 - one dead bootstrap peer is normal; report, go on
                logger.warning("bootstrap peer %s did not answer: %s", text, e)

        async with trio.open_nursery() as nursery:
            for text in self.options.bootstrap_peers:
                nursery.start_soon(dial, text)
        return answered

    async def connect_discovered(self, infos: trio.MemoryReceiveChannel) -> None:
        """Dial the peers mDNS finds on the LAN (each once; a failure is logged, not fatal)."""
        tried: set[ID] = set()
        async with infos:
            async for info in infos:
                if info.peer_id == self.host.get_id() or info.peer_id in tried:
                    continue
                tried.add(info.peer_id)
                try:
                    await self.connect(info.peer_id, list(info.addrs))
                    logger.info("mDNS: connected to %s on the LAN", info.peer_id)
                except Exception as e:  # noqa: BLE001
                    logger.info("mDNS: could not connect to %s: %s", info.peer_id, e)


def ip_of(addr: multiaddr.Multiaddr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    for proto in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(addr.value_for_protocol(proto))
        except Exception:  # noqa: BLE001 - not that protocol
            continue
    return None


def is_public(addr: multiaddr.Multiaddr) -> bool:
    """Whether ``addr`` is a globally routable IP (a DNS name counts as public)."""
    ip = ip_of(addr)
    return ip.is_global if ip is not None else "/dns" in str(addr)


def is_loopback(addr: multiaddr.Multiaddr) -> bool:
    ip = ip_of(addr)
    return ip is not None and ip.is_loopback


def advertised(options: Options, extra: list[multiaddr.Multiaddr]):  # noqa: ANN201 - py-libp2p's AddrsFactory
    """The addresses this host gives other peers (identify, Kademlia): ``-announceAddrs`` when set, else what it
    listens on and what peers observed it at, with ``0.0.0.0`` expanded to this machine's interface addresses
    (py-libp2p would advertise ``0.0.0.0`` itself, which another machine cannot dial), and ``extra`` (a port the
    router maps to us), read at each call. Loopback is left out when there is anything else: another machine that
    dials ``127.0.0.1:31337`` reaches itself (py-libp2p's hole punching dials every known address of a peer).

    Behind NAT (``-forceReachabilityPrivate``) the address peers observed is the router's, which nobody can dial: it
    is left out, as go-libp2p's AutoRelay leaves it out. Each dial to it would leave the dialer's router holding
    state for two minutes, and a hole-punching SYN from this peer that meets that state reaches the dialer's
    listener as a plain inbound connection, on which both ends wait for the other to start the handshake."""
    announce = [multiaddr.Multiaddr(a) for a in options.announce_addrs]

    def factory(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        if announce:
            return list(announce)
        addrs = expand_unspecified([*(without_peer_id(a) for a in candidates), *extra])
        if options.force_private:
            own = set(local_ipv4())
            addrs = [a for a in addrs if "/p2p-circuit" in str(a) or str(ip_of(a)) in own]
        return [a for a in addrs if not is_loopback(a)] or addrs

    return factory


def build_host(options: Options, key_pair: KeyPair, extra_addrs: list[multiaddr.Multiaddr] | None = None) -> IHost:
    """``extra_addrs``: advertised besides what it listens on, read at each call (``advertised``)."""
    noise = NoiseTransport(key_pair, noise_privkey=new_x25519().private_key)
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: noise},  # Noise only: py-libp2p would also offer plaintext by default
        muxer_preference="YAMUX",
        listen_addrs=[multiaddr.Multiaddr(a) for a in options.host_addrs],
        addrs_factory=advertised(options, [] if extra_addrs is None else extra_addrs),
        enable_mDNS=options.mdns,
        connection_config=ConnectionConfig(deny_list=list(UNDIALABLE)),
    )
