"""``p2ptrain-p2pd``: a libp2p daemon on py-libp2p that hivemind drives as it drives its bundled Go ``p2pd``.

Lifecycle, in order: parse the Go-style flags → load the identity → start the host (TCP + Noise + yamux) and
Kademlia → dial the bootstrap peers → open the control socket → print the lines hivemind waits for → serve
clients until SIGTERM, until the last client's persistent connection closes, or (``-idleTimeout``) until no
client came in time. SIGINT is ignored, as the Go daemon does: Ctrl+C reaches the whole process group, and
hivemind stops its daemon itself. protocols/p2pd.md is the specification.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import multiaddr
import trio
from libp2p.abc import INetStream
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.tools.anyio_service import background_trio_service

from p2ptrain.p2pd import libp2p_patches, negotiate
from p2ptrain.p2pd import p2pd_pb2 as pb
from p2ptrain.p2pd.control import serve_connection
from p2ptrain.p2pd.flags import FlagError, Options, parse
from p2ptrain.p2pd.framing import Reader, frame
from p2ptrain.p2pd.host import Node, build_host, load_identity
from p2ptrain.p2pd.relay import Relays
from p2ptrain.p2pd.streams import receiver, splice
from p2ptrain.p2pd.unary import PersistentConn, handle_incoming

logger = logging.getLogger("p2pd")

EXIT_GRACE_S = 2.0  # after SIGTERM or the last client leaving: then the process exits regardless
MDNS_ENV = "P2PTRAIN_P2PD_MDNS"  # set by p2ptrain.swarm.p2p_stack for --p2p py --mdns
STOCK_ENV = "P2PTRAIN_P2PD_STOCK"  # set by scripts/bench_p2pd.py: "1" runs py-libp2p as released
FLAGS_ENV = "P2PTRAIN_P2PD_FLAGS"  # set by p2ptrain.swarm.p2p_stack: flags hivemind has no parameter for


class RoundRobin:
    """Handlers of one protocol; ``next()`` takes turns among them."""

    def __init__(self) -> None:
        self.items: list = []
        self._turn = 0

    def next(self):  # noqa: ANN201 - items are addresses or connections
        item = self.items[self._turn % len(self.items)]
        self._turn += 1
        return item


class Daemon:
    """What the daemon holds between requests: the node, the handlers clients registered, its clients."""

    def __init__(self, options: Options, node: Node, stop: trio.Event, stock: bool = False):
        self.options = options
        self.node = node
        self.stop = stop
        self.stream_handlers: dict[str, RoundRobin] = {}  # protocol → client listen addresses (bytes)
        self.unary_handlers: dict[str, RoundRobin] = {}  # protocol → persistent connections
        self.clients = 0
        self.had_client = False
        self.stock = stock  # py-libp2p as released (its own negotiation): the benchmark's baseline

    # -- clients (the idle rule) ---------------------------------------------------------------------------------
    def client_attached(self) -> None:
        self.clients += 1
        self.had_client = True

    def client_detached(self) -> None:
        self.clients -= 1
        if self.clients == 0:
            logger.info("the last client disconnected: exiting")
            self.stop.set()

    async def exit_if_no_client(self, timeout_s: float) -> None:
        await trio.sleep(timeout_s)
        if not self.had_client:
            logger.warning("no client connected within %.0f s (-idleTimeout): exiting", timeout_s)
            self.stop.set()

    # -- streams ---------------------------------------------------------------------------------------------------
    async def open_stream(self, peer: ID, protocols: list[str], first: bytes = b"") -> tuple[INetStream, Reader]:
        """A negotiated stream (``first`` sent with the proposal) and the reader of what the remote sends."""
        await self.node.ensure_connected(peer)
        if self.stock:  # py-libp2p's own negotiation: two round trips before ``first``
            stream = await self.node.host.new_stream(peer, protocols)
            await stream.write(first)
            return stream, Reader(receiver(stream))
        return await negotiate.open_stream(self.node.host.get_network(), peer, protocols, first)

    def stream_info(self, stream: INetStream) -> pb.StreamInfo:
        remote = stream.get_remote_address()
        addr = multiaddr.Multiaddr(f"/ip4/{remote[0]}/tcp/{remote[1]}" if remote else "/ip4/0.0.0.0/tcp/0")
        return pb.StreamInfo(
            peer=stream.muxed_conn.peer_id.to_bytes(), addr=addr.to_bytes(), proto=str(stream.get_protocol())
        )

    def add_stream_handler(self, addr: bytes, protocols: list[str], balanced: bool) -> str | None:
        path = unix_path(addr)
        if path is None:
            return "stream handlers must listen on a unix socket (/unix/PATH)"
        for proto in protocols:
            if problem := self._register(self.stream_handlers, proto, path, balanced, self.handle_stream):
                return problem
        return None

    def remove_stream_handler(self, addr: bytes, protocols: list[str]) -> str | None:
        path = unix_path(addr)
        if path is None:
            return "stream handlers must listen on a unix socket (/unix/PATH)"
        for proto in protocols:
            problem = self._unregister(self.stream_handlers, proto, path, f"with maddr /unix/{path} does not exist")
            if problem:
                return problem
        return None

    async def handle_stream(self, stream: INetStream) -> None:
        proto = str(stream.get_protocol())
        await self.node.remember(stream.muxed_conn.peer_id)
        while (handlers := self.stream_handlers.get(proto)) is not None:
            path = handlers.next()
            try:
                sock = await trio.open_unix_socket(path)
            except OSError as e:  # the client that registered it is gone: forget it, try the next one
                logger.info("stream handler %s at %s is gone (%s): removed", proto, path, e)
                if path in handlers.items:
                    handlers.items.remove(path)
                if not handlers.items:
                    self._drop_protocol(proto, self.stream_handlers)
                continue
            try:
                await sock.send_all(frame(self.stream_info(stream)))
            except Exception:  # noqa: BLE001
                await sock.aclose()
                await stream.reset()
                return
            await splice(sock, stream)
            return
        await stream.reset()

    # -- unary handlers --------------------------------------------------------------------------------------------
    def add_unary_handler(self, proto: str, conn: PersistentConn, balanced: bool) -> str | None:
        async def incoming(stream: INetStream) -> None:
            await handle_incoming(self, stream)

        return self._register(self.unary_handlers, proto, conn, balanced, incoming)

    def remove_unary_handler(self, proto: str, conn: PersistentConn) -> str | None:
        return self._unregister(self.unary_handlers, proto, conn, "was not created in this persistent connection")

    def _register(self, registry: dict[str, RoundRobin], proto: str, item, balanced: bool, handler) -> str | None:  # noqa: ANN001
        """The Go daemon's rule for both kinds: the first registration sets the libp2p handler; a later one
        for the same protocol joins the round robin if ``balanced``, else it is refused."""
        handlers = registry.get(proto)
        if handlers is None:
            registry[proto] = handlers = RoundRobin()
            self.node.host.set_stream_handler(proto, handler)
        elif not balanced:
            return f"handler for protocol {proto} already set"
        handlers.items.append(item)
        return None

    def _unregister(self, registry: dict[str, RoundRobin], proto: str, item, not_ours: str) -> str | None:  # noqa: ANN001
        handlers = registry.get(proto)
        if handlers is None:
            return f"handler for protocol {proto} does not exist"
        if item not in handlers.items:
            return f"handler for protocol {proto} {not_ours}"
        handlers.items.remove(item)
        if not handlers.items:
            self._drop_protocol(proto, registry)
        return None

    def pick_unary_handler(self, proto: str) -> PersistentConn | None:
        handlers = self.unary_handlers.get(proto)
        return handlers.next() if handlers else None

    def _drop_protocol(self, proto: str, registry: dict[str, RoundRobin]) -> None:
        del registry[proto]
        self.node.host.remove_stream_handler(proto)

    def connected_peers(self) -> list[pb.PeerInfo]:
        """One entry per connection, with the remote address; a relayed connection as ``<relay>/p2p-circuit``
        (py-libp2p gives it the address of the connection to the relay it goes through, so that is how it shows)."""
        conns = [
            (peer_id, conn.muxed_conn.get_remote_address())
            for peer_id, peer_conns in self.node.host.get_network().get_connections_map().items()
            for conn in peer_conns
        ]
        at: dict[tuple, set[ID]] = {}
        for peer_id, remote in conns:
            at.setdefault(remote, set()).add(peer_id)
        peers = []
        for peer_id, remote in conns:
            addrs = []
            if remote:
                text = f"/ip4/{remote[0]}/tcp/{remote[1]}"
                relay = sorted(at[remote] - {peer_id}, key=str)
                text += f"/p2p/{relay[0]}/p2p-circuit" if relay else ""
                addrs = [multiaddr.Multiaddr(text).to_bytes()]
            peers.append(pb.PeerInfo(id=peer_id.to_bytes(), addrs=addrs))
        return peers


def unix_path(addr: bytes) -> str | None:
    try:
        return multiaddr.Multiaddr(addr).value_for_protocol("unix")
    except Exception:  # noqa: BLE001 - not a multiaddr, or not a unix one
        return None


class GologFormatter(logging.Formatter):
    """JSON lines in go-log's shape, so that hivemind files them under the right level (it parses these)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        ts += f".{int(record.msecs):03d}" + time.strftime("%z", time.localtime(record.created))
        level = {"WARNING": "warn", "CRITICAL": "fatal"}.get(record.levelname, record.levelname.lower())
        return json.dumps(
            {
                "level": level,
                "ts": ts,
                "logger": record.name,
                "caller": f"{record.module}.py:{record.lineno}",
                "msg": record.getMessage(),
            }
        )


LOG_DIR_ENV = "P2PTRAIN_P2PD_LOG_DIR"  # as for the Go daemon (p2ptrain.swarm.go_p2pd): each daemon writes its log there


def configure_logging() -> None:
    level = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}.get(
        os.environ.get("GOLOG_LOG_LEVEL", "warn").lower(), logging.WARNING
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(GologFormatter())
    handler.setLevel(level)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)  # py-libp2p's own loggers are chatty at INFO
    logging.getLogger("p2pd").setLevel(level)
    log_dir = os.environ.get(LOG_DIR_ENV)
    if log_dir:  # for bug reports: this daemon's and py-libp2p's relay and hole punching at DEBUG, in a file
        to_file = logging.FileHandler(Path(log_dir) / f"p2ptrain-p2pd-{os.getpid()}.log")
        to_file.setFormatter(GologFormatter())
        root.addHandler(to_file)
        logging.getLogger("libp2p").propagate = True  # py-libp2p cuts its loggers off unless LIBP2P_DEBUG is set
        for name in ("p2pd", "libp2p.relay", "libp2p.transport.tcp"):
            logging.getLogger(name).setLevel(logging.DEBUG)


async def run(options: Options) -> None:
    stock = os.environ.get(STOCK_ENV) == "1"
    libp2p_patches.install(speedups=not stock)
    key_pair = load_identity(options.identity)
    extra_addrs: list[multiaddr.Multiaddr] = []
    host = build_host(options, key_pair, extra_addrs)
    control_path = options.control.removeprefix("/unix")
    listen = [] if options.no_listen else [multiaddr.Multiaddr(a) for a in options.host_addrs]
    stop = trio.Event()
    discovered_send, discovered_receive = trio.open_memory_channel(64)

    async with host.run(listen), trio.open_nursery() as nursery:
        libp2p_patches.dial_from(host.get_transport_addrs())
        dht = KadDHT(host, DHTMode.SERVER if options.dht_server else DHTMode.CLIENT)
        async with background_trio_service(dht):
            node = Node(options, host, dht, extra_addrs)
            daemon = Daemon(options, node, stop, stock)
            if options.mdns:
                watch_mdns(discovered_send)
                nursery.start_soon(node.connect_discovered, discovered_receive)
            if options.relay or (options.auto_relay and options.trusted_relays):
                trusted = options.trusted_relays if options.auto_relay else ()
                node.relays = Relays(host, extra_addrs, serve=options.relay and not options.force_private,
                                     trusted=trusted)  # fmt: skip
                await nursery.start(node.relays.run, node)
                if trusted:  # behind NAT: turn relayed connections into direct ones (DCUtR), and answer others' tries
                    await nursery.start(node.relays.punch_holes)
            upnp = None
            if options.nat_port_map and not options.no_listen:
                from libp2p.discovery.upnp.upnp import UpnpManager

                upnp = UpnpManager()
                nursery.start_soon(node.map_port, upnp)
            if options.bootstrap and options.bootstrap_peers:
                answered = await node.bootstrap()
                logger.info("bootstrap: %d of %d peers answered", answered, len(options.bootstrap_peers))
                if not answered:  # as the Go daemon: no "Peer ID" line, exit 1 (hivemind reports the reason)
                    raise ConnectionError("failed to connect to bootstrap peers")

            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            await sock.bind(control_path)
            sock.listen(128)
            listener = trio.SocketListener(sock)
            try:
                nursery.start_soon(trio.serve_listeners, lambda s: serve_connection(daemon, s), [listener])
                if options.idle_timeout_s > 0:
                    nursery.start_soon(daemon.exit_if_no_client, options.idle_timeout_s)
                nursery.start_soon(exit_on_sigterm, stop)
                if not options.quiet:
                    print(f"Control socket: {options.control}")
                print(f"Peer ID: {host.get_id()}", flush=not options.quiet)
                if not options.quiet:
                    print("Peer Addrs:")
                    for addr in node.listen_addrs():
                        print(addr)
                    sys.stdout.flush()
                await stop.wait()
                # nothing here outlives the process, so closing every connection politely gets 2 s at most:
                # hivemind and p2ptrain wait for their daemon when they stop
                watchdog = threading.Timer(EXIT_GRACE_S, os._exit, args=(0,))
                watchdog.daemon = True
                watchdog.start()
            finally:
                with trio.CancelScope(shield=True):
                    await listener.aclose()
                    if upnp is not None and node.mapped_port:
                        with trio.move_on_after(1.0):  # the mapping would outlive us; the router expires it otherwise
                            await upnp.remove_port_mapping(node.mapped_port, "TCP")
                Path(control_path).unlink(missing_ok=True)
                nursery.cancel_scope.cancel()


def watch_mdns(send: trio.MemorySendChannel) -> None:
    """mDNS reports peers from zeroconf's thread; hand them to trio."""
    from libp2p.discovery.events.peerDiscovery import peerDiscovery

    token = trio.lowlevel.current_trio_token()

    def found(info) -> None:  # noqa: ANN001 - libp2p's PeerInfo
        def deliver() -> None:
            try:
                send.send_nowait(info)
            except (trio.WouldBlock, trio.ClosedResourceError):
                logger.debug("mDNS: %s dropped (too many at once)", info.peer_id)

        try:
            token.run_sync_soon(deliver)
        except trio.RunFinishedError:
            pass

    peerDiscovery.register_peer_discovered_handler(found)


async def exit_on_sigterm(stop: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            logger.info("SIGTERM: exiting")
            stop.set()
            return


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse([*(sys.argv[1:] if argv is None else argv), *os.environ.get(FLAGS_ENV, "").split()])
    except FlagError as e:
        print(f"p2ptrain-p2pd: {e}", file=sys.stderr)
        return 2
    if os.environ.get(MDNS_ENV) == "1":  # hivemind passes its environment through, not our flags
        options = dataclasses.replace(options, mdns=True)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging()
    try:
        trio.run(run, options)
    except Exception as e:  # noqa: BLE001 - one line for hivemind's "Daemon failed to start: …"
        while len(getattr(e, "exceptions", ())) == 1:  # trio's nurseries wrap errors in exception groups
            e = e.exceptions[0]
        logger.debug("daemon failed", exc_info=e)
        print(f"p2ptrain-p2pd: {e}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
