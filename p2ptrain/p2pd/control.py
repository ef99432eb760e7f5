"""The control socket: one request per message, as hivemind's ``ControlClient`` sends them.

A connection carries requests until the client closes it, except STREAM_OPEN (the connection becomes the
stream) and PERSISTENT_CONN_UPGRADE (the connection becomes the client's persistent one).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import multiaddr
import trio
from libp2p.peer.id import ID

from p2ptrain.p2pd import p2pd_pb2 as pb
from p2ptrain.p2pd.framing import EndOfStream, FrameError, Reader, frame
from p2ptrain.p2pd.streams import splice
from p2ptrain.p2pd.unary import serve_persistent

if TYPE_CHECKING:
    from p2ptrain.p2pd.daemon import Daemon

logger = logging.getLogger("p2pd.control")

MAX_REQUEST_BYTES = 64 * 1024  # a control request carries ids, addresses and protocol names only
DEFAULT_TIMEOUT_S = 60.0  # the Go daemon's default for CONNECT and STREAM_OPEN


def ok(**fields: object) -> pb.Response:
    return pb.Response(type=pb.Response.OK, **fields)


def error(message: str) -> pb.Response:
    return pb.Response(type=pb.Response.ERROR, error=pb.ErrorResponse(msg=message))


def timeout_of(requested: int) -> float:
    return float(requested) if requested > 0 else DEFAULT_TIMEOUT_S


async def serve_connection(daemon: Daemon, sock: trio.SocketStream) -> None:
    reader = Reader(sock.receive_some)
    try:
        while True:
            try:
                request = await reader.read_message(pb.Request(), MAX_REQUEST_BYTES)
            except EndOfStream:
                return
            except FrameError as e:
                logger.info("control connection: %s", e)
                return
            kind = request.type
            if kind == pb.Request.PERSISTENT_CONN_UPGRADE:
                await serve_persistent(daemon, sock, reader)
                return
            if kind == pb.Request.STREAM_OPEN:
                await stream_open(daemon, sock, reader, request)
                return
            await sock.send_all(frame(await answer(daemon, request)))
    except trio.BrokenResourceError:
        logger.debug("control client went away")
    finally:
        await sock.aclose()


async def answer(daemon: Daemon, request: pb.Request) -> pb.Response:
    """Every request that gets one response and leaves the connection as it was."""
    try:
        if request.type == pb.Request.IDENTIFY:
            identify = pb.IdentifyResponse(
                id=daemon.node.host.get_id().to_bytes(), addrs=[a.to_bytes() for a in daemon.node.listen_addrs()]
            )
            return ok(identify=identify)
        if request.type == pb.Request.CONNECT:
            if not request.HasField("connect"):
                return error("Malformed request; missing parameters")
            peer = ID(request.connect.peer)
            addrs = [multiaddr.Multiaddr(a) for a in request.connect.addrs]
            await daemon.node.connect(peer, addrs, timeout_of(request.connect.timeout))
            return ok()
        if request.type == pb.Request.STREAM_HANDLER:
            if not request.HasField("streamHandler"):
                return error("Malformed request; missing parameters")
            handler = request.streamHandler
            problem = daemon.add_stream_handler(bytes(handler.addr), list(handler.proto), handler.balanced)
            return ok() if problem is None else error(problem)
        if request.type == pb.Request.REMOVE_STREAM_HANDLER:
            if not request.HasField("removeStreamHandler"):
                return error("Malformed request; missing parameters")
            handler = request.removeStreamHandler
            problem = daemon.remove_stream_handler(bytes(handler.addr), list(handler.proto))
            return ok() if problem is None else error(problem)
        if request.type == pb.Request.LIST_PEERS:
            return ok(peers=daemon.connected_peers())
        if request.type == pb.Request.DISCONNECT:
            if not request.HasField("disconnect"):
                return error("Malformed request; missing parameters")
            await daemon.node.host.disconnect(ID(request.disconnect.peer))
            return ok()
        return error(f"unsupported request type {pb.Request.Type.Name(request.type)} (this daemon: protocols/p2pd.md)")
    except trio.TooSlowError:
        return error("timed out")
    except Exception as e:  # noqa: BLE001 - the client gets the reason, the daemon goes on
        logger.debug("request %s failed: %s", request.type, e)
        return error(str(e) or type(e).__name__)


async def stream_open(daemon: Daemon, sock: trio.SocketStream, reader: Reader, request: pb.Request) -> None:
    if not request.HasField("streamOpen"):
        await sock.send_all(frame(error("Malformed request; missing parameters")))
        return
    try:
        with trio.fail_after(timeout_of(request.streamOpen.timeout)):
            stream, remote = await daemon.open_stream(ID(request.streamOpen.peer), list(request.streamOpen.proto))
    except Exception as e:  # noqa: BLE001 - trio.TooSlowError included
        await sock.send_all(frame(error(str(e) or type(e).__name__)))
        return
    try:
        await sock.send_all(frame(ok(streamInfo=daemon.stream_info(stream))))
    except Exception:
        await stream.reset()
        raise
    await splice(sock, stream, reader.take_buffered(), remote.take_buffered())
