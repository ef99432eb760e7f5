"""Unary calls: a client's persistent connection and the daemon-to-daemon exchange behind each call.

A client (one hivemind process) upgrades a control connection to a persistent one and multiplexes, by
16-byte call id, its own calls to remote peers and the calls of remote peers to the handlers it registered.
Between daemons every call is one libp2p stream on the handler's protocol id: the caller writes
``PersistentConnectionRequest{callId, callUnary}``, the callee writes back
``PersistentConnectionRequest{callId, unaryResponse}`` (a *Request* message, as the Go daemon does) and
closes. protocols/p2pd.md spells out every rule.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from p2ptrain.p2pd import p2pd_pb2 as pb
from p2ptrain.p2pd.framing import EndOfStream, FrameError, Reader, frame
from p2ptrain.p2pd.streams import receiver

if TYPE_CHECKING:
    from p2ptrain.p2pd.daemon import Daemon

logger = logging.getLogger("p2pd.unary")

HANDLER_READ_TIMEOUT_S = 60.0  # a remote that opened a call stream must send its request within this


@dataclass(eq=False)
class PersistentConn:
    """One client's persistent connection: what it registered, what is in flight."""

    send: trio.MemorySendChannel  # messages to the client, written in order by one task
    protocols: list[str] = field(default_factory=list)  # unary handlers this client registered
    outgoing: dict[bytes, trio.CancelScope] = field(default_factory=dict)  # its calls, by call id
    incoming: dict[bytes, trio.MemorySendChannel] = field(default_factory=dict)  # calls it handles

    async def reply(self, message: pb.PersistentConnectionResponse) -> None:
        try:
            await self.send.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            logger.debug("client gone before a reply for call %s", message.callId.hex())


def ack(call_id: bytes) -> pb.PersistentConnectionResponse:
    return pb.PersistentConnectionResponse(callId=call_id)


def daemon_error(call_id: bytes, message: str) -> pb.PersistentConnectionResponse:
    return pb.PersistentConnectionResponse(callId=call_id, daemonError=pb.DaemonError(message=message))


async def serve_persistent(daemon: Daemon, sock: trio.SocketStream, reader: Reader) -> None:
    """After PERSISTENT_CONN_UPGRADE: read the client's requests until it disconnects, then clean up."""
    send, receive = trio.open_memory_channel[pb.PersistentConnectionResponse](256)
    conn = PersistentConn(send)

    async def write_replies() -> None:
        async with receive:
            async for message in receive:
                await sock.send_all(frame(message))

    daemon.client_attached()
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_replies)
            await sock.send_all(frame(pb.Response(type=pb.Response.OK)))
            try:
                while True:
                    request = await reader.read_message(pb.PersistentConnectionRequest(), daemon.options.max_msg_size)
                    await dispatch(daemon, conn, request, nursery)
            except EndOfStream:
                logger.debug("client closed its persistent connection")
            except (FrameError, trio.BrokenResourceError) as e:
                logger.warning("persistent connection dropped: %s", e)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        for proto in conn.protocols:
            daemon.remove_unary_handler(proto, conn)
        for waiting in conn.incoming.values():
            waiting.close()
        await sock.aclose()
        daemon.client_detached()


async def dispatch(
    daemon: Daemon, conn: PersistentConn, request: pb.PersistentConnectionRequest, nursery: trio.Nursery
) -> None:
    call_id = request.callId
    if len(call_id) != 16:
        logger.debug("dropping a request with a %d-byte call id", len(call_id))
        return
    kind = request.WhichOneof("message")
    if kind == "addUnaryHandler":
        proto, balanced = request.addUnaryHandler.proto, request.addUnaryHandler.balanced
        error = daemon.add_unary_handler(proto, conn, balanced)
        if error is None:
            conn.protocols.append(proto)
        await conn.reply(ack(call_id) if error is None else daemon_error(call_id, error))
    elif kind == "removeUnaryHandler":
        proto = request.removeUnaryHandler.proto
        error = daemon.remove_unary_handler(proto, conn)
        if error is None:
            conn.protocols.remove(proto)
        await conn.reply(ack(call_id) if error is None else daemon_error(call_id, error))
    elif kind == "callUnary":
        scope = trio.CancelScope()
        conn.outgoing[call_id] = scope
        nursery.start_soon(call_remote, daemon, conn, request, scope)
    elif kind == "unaryResponse":
        waiting = conn.incoming.get(call_id)
        if waiting is None:
            logger.debug("response for unknown call %s (cancelled or answered already)", call_id.hex())
            return
        try:
            waiting.send_nowait(request.unaryResponse)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            logger.debug("second response for call %s ignored", call_id.hex())
    elif kind == "cancel":
        scope = conn.outgoing.get(call_id)
        if scope is not None:
            scope.cancel()
    else:
        logger.debug("persistent request without a message, call %s", call_id.hex())


async def call_remote(
    daemon: Daemon, conn: PersistentConn, request: pb.PersistentConnectionRequest, scope: trio.CancelScope
) -> None:
    """The client's call to a remote handler: one stream, one request, one response."""
    call_id, call = request.callId, request.callUnary
    reply = pb.PersistentConnectionResponse(callId=call_id, cancel=pb.Cancel())  # what a cancelled call gets
    stream: INetStream | None = None
    try:
        with scope:
            try:
                stream, remote = await daemon.open_stream(ID(call.peer), [call.proto], first=frame(request))
            except Exception as e:  # noqa: BLE001 - no route, no handler there, bad id: the caller learns why
                reply = daemon_error(
                    call_id, f"failed to open a stream to {call.peer.hex()[:16]}…: {str(e) or type(e).__name__}"
                )
            else:
                try:
                    answer = await remote.read_message(pb.PersistentConnectionRequest(), daemon.options.max_msg_size)
                    if answer.WhichOneof("message") != "unaryResponse" or not answer.unaryResponse.WhichOneof("result"):
                        raise FrameError("the remote daemon answered without a unaryResponse")
                    # relayed as is: which of response/error is set matters even when it is empty
                    reply = pb.PersistentConnectionResponse(callId=call_id, callUnaryResponse=answer.unaryResponse)
                    await stream.close()
                    stream = None
                except Exception as e:  # noqa: BLE001
                    reply = daemon_error(call_id, f"unary call {call.proto} failed: {e}")
        if stream is not None:  # failed or cancelled half-way: the remote learns by a reset
            await stream.reset()
    finally:
        conn.outgoing.pop(call_id, None)
    await conn.reply(reply)


async def handle_incoming(daemon: Daemon, stream: INetStream) -> None:
    """A remote daemon calls a unary handler of ours: hand it to one client, send its answer back."""
    proto = str(stream.get_protocol())
    remote = stream.muxed_conn.peer_id
    conn = daemon.pick_unary_handler(proto)
    if conn is None:
        logger.debug("unary call for %s, which no client handles any more", proto)
        await stream.reset()
        return
    reader = Reader(receiver(stream))
    try:
        with trio.fail_after(HANDLER_READ_TIMEOUT_S):
            request = await reader.read_message(pb.PersistentConnectionRequest(), daemon.options.max_msg_size)
    except Exception as e:  # noqa: BLE001 - a bad peer gets a reset and a log line
        logger.info("bad unary request from %s on %s: %s", remote, proto, e)
        await stream.reset()
        return
    if request.WhichOneof("message") != "callUnary":
        logger.info("peer %s sent a unary stream without callUnary", remote)
        await stream.reset()
        return
    await daemon.node.remember(remote)

    handling = pb.CallUnaryRequest()
    handling.CopyFrom(request.callUnary)
    handling.peer = remote.to_bytes()  # the handler sees who called, never who the caller claims to be
    local_id = uuid.uuid4().bytes  # ours, not the remote's: a remote cannot collide with or answer other calls
    answer_send, answer_receive = trio.open_memory_channel[pb.CallUnaryResponse](1)
    conn.incoming[local_id] = answer_send
    try:
        await conn.reply(pb.PersistentConnectionResponse(callId=local_id, requestHandling=handling))
        answer: pb.CallUnaryResponse | None = None
        async with trio.open_nursery() as nursery:

            async def remote_gone() -> None:
                try:
                    await stream.read(1)  # the caller writes nothing more: any return means it closed or reset
                except Exception:  # noqa: BLE001
                    pass
                nursery.cancel_scope.cancel()

            nursery.start_soon(remote_gone)
            try:
                answer = await answer_receive.receive()
            except trio.EndOfChannel:
                answer = pb.CallUnaryResponse(error=b"the handler's client disconnected")
            nursery.cancel_scope.cancel()
        if answer is None:
            await conn.reply(pb.PersistentConnectionResponse(callId=local_id, cancel=pb.Cancel()))
            await stream.reset()
            return
        await stream.write(frame(pb.PersistentConnectionRequest(callId=request.callId, unaryResponse=answer)))
        await stream.close()
    except Exception as e:  # noqa: BLE001
        logger.debug("unary call from %s on %s ended: %s", remote, proto, e)
        await stream.reset()
    finally:
        conn.incoming.pop(local_id, None)
