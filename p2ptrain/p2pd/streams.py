"""Raw streams: a libp2p stream spliced to a client's unix socket (STREAM_OPEN, STREAM_HANDLER).

Semantics as in the Go daemon: bytes are copied both ways; the client ending its side half-closes the libp2p
stream; the remote ending its side closes the client's socket; any error resets the libp2p stream.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import INetStream
from libp2p.network.stream.exceptions import StreamEOF

logger = logging.getLogger("p2pd.streams")

CHUNK = 1 << 20


def receiver(stream: INetStream) -> Callable[[int], Awaitable[bytes]]:
    """``receive(n)`` for a libp2p stream that returns b"" at the end instead of raising."""

    async def receive(n: int) -> bytes:
        try:
            return await stream.read(n)
        except StreamEOF:
            return b""

    return receive


async def splice(
    sock: trio.SocketStream, stream: INetStream, from_client: bytes = b"", from_remote: bytes = b""
) -> None:
    """Copy until both directions are done; ``from_client``/``from_remote`` were read before the splice."""
    receive = receiver(stream)

    async def to_remote(cancel: trio.CancelScope) -> None:
        try:
            if from_client:
                await stream.write(from_client)
            while data := await sock.receive_some(CHUNK):
                await stream.write(data)
            await stream.close_write()
        except Exception as e:  # noqa: BLE001 - any failure of either side ends the stream with a reset
            logger.debug("stream to %s: %s", stream.muxed_conn.peer_id, e)
            await stream.reset()
            cancel.cancel()

    async def to_client(cancel: trio.CancelScope) -> None:
        try:
            if from_remote:
                await sock.send_all(from_remote)
            while data := await receive(CHUNK):
                await sock.send_all(data)
        except Exception as e:  # noqa: BLE001
            logger.debug("stream from %s: %s", stream.muxed_conn.peer_id, e)
            await stream.reset()
        cancel.cancel()  # the remote is done (or gone): so is the client's socket

    async with trio.open_nursery() as nursery:
        nursery.start_soon(to_remote, nursery.cancel_scope)
        nursery.start_soon(to_client, nursery.cancel_scope)
    await sock.aclose()
    if not stream.is_closed:
        await stream.close()
