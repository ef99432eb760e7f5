"""Length-prefixed protobuf messages (an unsigned varint, then the bytes) over any byte stream.

Both the control socket (hivemind ↔ daemon) and the libp2p streams of unary calls (daemon ↔ daemon) frame
messages this way. Every read is bounded: a length over ``limit`` is refused before anything is buffered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from google.protobuf.message import DecodeError, Message

M = TypeVar("M", bound=Message)

MAX_VARINT_BYTES = 10


class FrameError(Exception):
    """The other side sent something that is not a well-formed, bounded message."""


class EndOfStream(FrameError):
    """The stream ended (cleanly) before a whole message arrived."""


def encode_uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def frame(message: Message) -> bytes:
    body = message.SerializeToString()
    return encode_uvarint(len(body)) + body


class Reader:
    """Buffered reads on top of ``receive(max_bytes) -> bytes`` (b"" at the end of the stream)."""

    def __init__(self, receive: Callable[[int], Awaitable[bytes]], chunk: int = 1 << 16):
        self._receive = receive
        self._chunk = chunk
        self._buffer = bytearray()

    async def _fill(self) -> None:
        data = await self._receive(self._chunk)
        if not data:
            raise EndOfStream("the stream ended")
        self._buffer += data

    async def read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            await self._fill()
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def read_uvarint(self) -> int:
        value = shift = 0
        for _ in range(MAX_VARINT_BYTES):
            if not self._buffer:
                await self._fill()
            byte = self._buffer.pop(0)
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise FrameError("length prefix is not a valid varint")

    async def read_prefixed(self, limit: int) -> bytes:
        """One length-prefixed body of at most ``limit`` bytes."""
        length = await self.read_uvarint()
        if length > limit:
            raise FrameError(f"message of {length} bytes exceeds the limit of {limit} bytes")
        return await self.read_exactly(length)

    async def read_message(self, message: M, limit: int) -> M:
        body = await self.read_prefixed(limit)
        try:
            message.ParseFromString(body)
        except DecodeError as e:
            raise FrameError(f"malformed {type(message).__name__}: {e}") from e
        return message

    def take_buffered(self) -> bytes:
        """Bytes already read past the last message (they belong to whatever follows)."""
        out = bytes(self._buffer)
        self._buffer.clear()
        return out
