"""Changes to py-libp2p 0.8.1, installed in the daemon process before its host starts: every touch of py-libp2p's
private names is here (``tests/test_layout.py`` checks), and ``install`` refuses any other py-libp2p version.

Fixes, always installed: ``atomic_frame_writes``, ``circuit_addrs_advertised``, ``envelope_key_type_sent``,
``mdns_advertises_interface_addrs``, ``dials_leave_from_the_listening_port`` (with ``dial_from``), and those of
py-libp2p's hole punching (``hole_punching``).
Three speed-ups (``install(speedups=False)`` leaves them out: the ``py-stock`` column of scripts/bench_p2pd.py):
``buffer_tcp_reads``, ``window_updates_like_go``, ``wait_for_credit_without_polling``.
What goes over the network stays valid TCP/Noise/yamux.
"""

from __future__ import annotations

import importlib.metadata
import struct

import trio

from p2ptrain.p2pd import hole_punching

SUPPORTED = "0.8.1"  # pyproject.toml pins it; the patches below are written against its source

READ_AHEAD = 256 * 1024
DIAL_SOURCE: list[tuple[str, int]] = []  # (ip, port) outbound TCP connections leave from: set by ``dial_from``


def buffer_tcp_reads() -> None:
    """Read TCP in 256 KiB gulps instead of py-libp2p's exact-size reads.

    py-libp2p asks the socket for each Noise frame's 2-byte length and then for its body: two or more
    ``recv`` calls (each a trio scheduling round) per 64 KiB frame. Serving those reads from a read-ahead
    buffer took the stream throughput between two daemons from 85 to 115 MB/s here (scripts/bench_p2pd.py).
    """
    from libp2p.io.trio import TrioTCPStream

    if getattr(TrioTCPStream, "_p2ptrain_buffered", False):
        return
    unbuffered = TrioTCPStream.read

    async def read(self: TrioTCPStream, n: int | None = None) -> bytes:
        # one reader at a time, from the check of the buffer to the refill: a second reader waiting on the
        # socket while the first fills the buffer would get newer bytes first (Noise then fails to decrypt)
        lock = self.__dict__.get("_read_ahead_lock")
        if lock is None:
            lock = self.__dict__["_read_ahead_lock"] = trio.Lock()
        async with lock:
            pending = self.__dict__.get("_read_ahead")
            if pending:
                take = len(pending) if n is None else min(n, len(pending))
                out = bytes(pending[:take])
                del pending[:take]
                return out
            if n is None or n == 0:
                return await unbuffered(self, n)
            data = await unbuffered(self, max(n, READ_AHEAD))
            if len(data) <= n:
                return data
            self.__dict__["_read_ahead"] = bytearray(data[n:])
            return data[:n]

    TrioTCPStream.read = read
    TrioTCPStream._p2ptrain_buffered = True


def window_updates_like_go() -> None:
    """Send a yamux WINDOW_UPDATE only once half the receive window is consumed, as go-yamux does.

    py-libp2p 0.8 also credits every read back at once ("partial slack"), so each read of a small message
    costs a frame, a Noise encryption and a send on this side and a decryption on the other: 8 of the 16
    frames of a small unary call between two daemons. With go-yamux's rule the sender still never waits
    while the reader keeps reading (it always has at least half a window of credit).
    """
    from libp2p.stream_muxer.yamux.yamux import YamuxStream

    if getattr(YamuxStream, "_p2ptrain_go_windows", False):
        return

    async def update(self: YamuxStream, *, bytes_read: int = 0) -> None:
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            if self.target_recv_window - (self.recv_window + buffered) < self._grow_threshold():
                return
            increment = self._grow_to_delta(buffered) + self._apply_autotune_epoch(buffered)
            self._pending_recv_release = 0
        if increment > 0:
            await self.send_window_update(increment, skip_lock=True)

    YamuxStream._auto_tune_and_send_window_update = update
    YamuxStream._p2ptrain_go_windows = True


def wait_for_credit_without_polling() -> None:
    """A yamux writer out of send window waits for the WINDOW_UPDATE itself, with no 5 s limit.

    py-libp2p 0.8 polls every 10 ms (so each time the window runs out a write loses up to 10 ms: 1 MiB unary
    calls ran at 22 instead of 60 MiB/s after the change above), and gives up after 5 s, failing the stream
    when a reader is slow, e.g. a peer whose CPU is busy training. go-yamux waits until the window opens,
    the stream closes, or the caller's deadline: so does this. ``send_window`` and ``closed`` become
    properties that wake the waiting writer.
    """
    from libp2p.stream_muxer.exceptions import MuxedStreamError
    from libp2p.stream_muxer.yamux import yamux

    stream_class = yamux.YamuxStream
    if getattr(stream_class, "_p2ptrain_credit_events", False):
        return

    def waking(name: str) -> property:
        def get(self: yamux.YamuxStream):
            return self.__dict__[name]

        def set_(self: yamux.YamuxStream, value) -> None:
            self.__dict__[name] = value
            waiting = self.__dict__.pop("_p2ptrain_credit", None)
            if waiting is not None:
                waiting.set()

        return property(get, set_)

    async def write(self: yamux.YamuxStream, data: bytes) -> None:
        sent, total = 0, len(data)
        while sent < total:
            frame = b""
            async with self.rw_lock.write_lock():
                if self.send_closed:
                    raise MuxedStreamError("Stream is closed for sending")
                async with self.window_lock:
                    if self.closed:
                        raise MuxedStreamError("Stream is closed")
                    size = min(self.send_window, yamux.MAX_MESSAGE_SIZE - yamux.HEADER_SIZE, total - sent)
                    if size > 0:
                        self.send_window -= size
                        header = struct.pack(yamux.YAMUX_HEADER_FORMAT, 0, yamux.TYPE_DATA, 0, self.stream_id, size)
                        frame = header + data[sent : sent + size]
                    else:
                        credit = self.__dict__.get("_p2ptrain_credit") or trio.Event()
                        self.__dict__["_p2ptrain_credit"] = credit
            if not frame:
                await credit.wait()  # set by the next change of send_window or closed
                continue
            await self.conn._write_frame(frame)
            sent += size

    stream_class.send_window = waking("_send_window")
    stream_class.closed = waking("_closed")
    stream_class.write = write
    stream_class._p2ptrain_credit_events = True


FRAME_WRITE_TIMEOUT_S = 10.0  # go-yamux's ConnectionWriteTimeout: a connection that cannot take a frame is dead


def atomic_frame_writes() -> None:
    """A yamux frame is encrypted and sent whole, even when the task writing it is cancelled.

    py-libp2p encrypts a frame (using up a Noise nonce) and then sends it; a cancellation in between (a
    hivemind call timing out, a splice ending) drops the frame or sends part of it, and the remote's next
    decryption fails ("Failed authentication of message"): the connection, and every stream on it, dies.
    With four Python daemons averaging, this broke a connection in 6 of 25 all-reduce runs and hung one of
    them. Here the send is shielded from cancellation; a send that takes over 10 s closes the connection,
    as go-yamux does.
    """
    from libp2p.io.exceptions import IOException
    from libp2p.stream_muxer.yamux.yamux import Yamux

    if getattr(Yamux, "_p2ptrain_atomic_writes", False):
        return

    async def write_frame(self: Yamux, data: bytes) -> None:
        async with self._write_lock:  # waiting for the lock can be cancelled: nothing is sent yet
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FRAME_WRITE_TIMEOUT_S) as late:
                    await self.secured_conn.write(data)
                if late.cancelled_caught:
                    self.event_shutting_down.set()
                    with trio.move_on_after(1):
                        await self.secured_conn.close()
        if late.cancelled_caught:
            raise IOException(f"yamux: no frame went out to {self.peer_id} in {FRAME_WRITE_TIMEOUT_S:.0f} s")
        await trio.lowlevel.checkpoint()

    Yamux._write_frame = write_frame
    Yamux._p2ptrain_atomic_writes = True


def circuit_addrs_advertised() -> None:
    """The host advertises ``<relay>/p2p/<relay id>/p2p-circuit`` addresses whole.

    py-libp2p's ``BasicHost.get_addrs`` strips the first ``/p2p/`` component of each address its addrs factory
    gives, to append its own: a circuit address loses everything from its relay's id on and becomes the relay's
    plain address (peers would dial the relay and find the wrong peer there). Here circuit addresses bypass
    that step and get our id appended after ``/p2p-circuit``, as go-libp2p advertises them.
    """
    import multiaddr
    from libp2p.host.basic_host import BasicHost

    if getattr(BasicHost, "_p2ptrain_circuits", False):
        return
    stripping = BasicHost.get_addrs

    def get_addrs(self: BasicHost) -> list[multiaddr.Multiaddr]:
        factory = self._addrs_factory
        if factory is None:
            return stripping(self)
        circuits: list[multiaddr.Multiaddr] = []

        def without_circuits(candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
            addrs = list(factory(candidates))
            circuits.extend(a for a in addrs if "/p2p-circuit" in str(a))
            return [a for a in addrs if "/p2p-circuit" not in str(a)]

        self._addrs_factory = without_circuits  # trio: nothing else runs until we put it back
        try:
            plain = stripping(self)
        finally:
            self._addrs_factory = factory
        own = multiaddr.Multiaddr(f"/p2p/{self.get_id()!s}")
        return plain + [c.encapsulate(own) for c in circuits]

    BasicHost.get_addrs = get_addrs
    BasicHost._p2ptrain_circuits = True


def envelope_key_type_sent() -> None:
    """Signed envelopes (the peer record in every identify) carry their public key's type, also for RSA.

    py-libp2p writes the envelope's key with a proto3 message, which leaves out a field at its zero value; RSA's
    key type is 0, so an RSA key (hivemind's identities) goes out without the type, which crypto.proto (proto2)
    requires: go-libp2p refuses the record and logs an ERROR at every identify of a Python peer. Here the key is
    written with py-libp2p's proto2 message (``libp2p.crypto.pb``), which writes the type always; the other fields,
    and so the signed bytes, are unchanged.
    """
    from libp2p.crypto.pb import crypto_pb2
    from libp2p.peer.envelope import Envelope
    from libp2p.peer.pb import envelope_pb2
    from libp2p.utils.varint import encode_varint_prefixed

    if getattr(Envelope, "_p2ptrain_key_type", False):
        return

    def marshal_envelope(self: Envelope) -> bytes:
        key = crypto_pb2.PublicKey(key_type=self.public_key.get_type().value, data=self.public_key.to_bytes())
        rest = envelope_pb2.Envelope(payload_type=self.payload_type, payload=self.raw_payload, signature=self.signature)
        field_1 = b"\x0a" + encode_varint_prefixed(key.SerializeToString())  # public_key, length-delimited
        return field_1 + rest.SerializeToString()

    Envelope.marshal_envelope = marshal_envelope
    Envelope._p2ptrain_key_type = True


class UnsupportedVersion(RuntimeError):
    pass


def check_version(installed: str | None = None) -> None:
    installed = installed or importlib.metadata.version("libp2p")
    if installed != SUPPORTED:
        raise UnsupportedVersion(
            f"py-libp2p {installed} is installed; p2ptrain-p2pd supports py-libp2p {SUPPORTED} only (it patches its "
            "internals: p2ptrain/p2pd/libp2p_patches.py). Reinstall p2ptrain: ./scripts/setup.sh"
        )


def mdns_advertises_interface_addrs() -> None:
    """mDNS tells the LAN this machine's interface addresses, not the ``0.0.0.0`` the host listens on.

    py-libp2p's mDNS broadcaster advertises the transport's listen addresses as they are: a peer listening on
    every interface (the default) would tell its neighbours to dial ``0.0.0.0``, i.e. their own machine. Here it
    advertises what ``host.expand_unspecified`` makes of them, loopback left out (a neighbour cannot reach it).
    """
    from libp2p.discovery.mdns.broadcaster import PeerBroadcaster

    from p2ptrain.p2pd.host import expand_unspecified, is_loopback

    if getattr(PeerBroadcaster, "_p2ptrain_expanded", False):
        return
    raw = PeerBroadcaster._resolve_host_addrs

    def resolve_host_addrs(self: PeerBroadcaster) -> list[str]:
        import multiaddr

        addrs = expand_unspecified([multiaddr.Multiaddr(a) for a in raw(self)])
        return [str(a) for a in addrs if not is_loopback(a)] or [str(a) for a in addrs]

    PeerBroadcaster._resolve_host_addrs = resolve_host_addrs
    PeerBroadcaster._p2ptrain_expanded = True


def dial_from(addrs: list) -> None:  # noqa: ANN001 - py-libp2p's transport addresses (multiaddrs)
    """Where outbound TCP connections leave from: the first IPv4 TCP address of ``addrs``, what the host listens on
    (``/ip4/0.0.0.0/tcp/31337`` → ``("0.0.0.0", 31337)``)."""
    DIAL_SOURCE.clear()
    for addr in addrs:
        try:
            DIAL_SOURCE.append((addr.value_for_protocol("ip4"), int(addr.value_for_protocol("tcp"))))
            return
        except Exception:  # noqa: BLE001, S112 - not an IPv4 TCP address: the next one
            continue


def dials_leave_from_the_listening_port() -> None:
    """Outbound TCP connections leave from the port the host listens on (``dial_from``), as go-libp2p's reuseport
    transport dials.

    py-libp2p dials from a fresh port each time, so a NAT maps each of its connections to another external port:
    its peers saw a NAT that changes ports, and no hole could be punched to it. Leaving from the listening port
    (SO_REUSEPORT, which py-libp2p's listener sets too), a NAT that keeps ports maps every connection to the same
    external port, the one peers then dial. A dial that fails from it is tried again from a fresh port, as before:
    the address may be taken or unable to reach the destination (127.0.0.1 to the LAN), and a peer that still holds
    the last connection between the same two ports (TIME_WAIT) refuses a new one (seen: connection refused by a
    peer that was listening).
    """
    from libp2p.transport.exceptions import OpenConnectionError
    from libp2p.transport.tcp.tcp import TCP

    if getattr(TCP, "_p2ptrain_from_listen_port", False):
        return
    dial_resolved = TCP._dial_resolved

    async def _dial_resolved(self: TCP, maddr, source: tuple[str, int] | None = None):  # noqa: ANN001, ANN202
        if source is not None or not DIAL_SOURCE:
            return await dial_resolved(self, maddr, source=source)
        try:
            return await dial_resolved(self, maddr, source=DIAL_SOURCE[0])
        except OpenConnectionError:
            return await dial_resolved(self, maddr)

    TCP._dial_resolved = _dial_resolved
    TCP._p2ptrain_from_listen_port = True


def install(speedups: bool = True) -> None:
    check_version()
    atomic_frame_writes()
    circuit_addrs_advertised()
    envelope_key_type_sent()
    mdns_advertises_interface_addrs()
    dials_leave_from_the_listening_port()
    hole_punching.install()
    if speedups:
        buffer_tcp_reads()
        window_updates_like_go()
        wait_for_credit_without_polling()
