"""Outbound protocol negotiation (multistream-select 1.0) in one round trip, as go-libp2p does it.

py-libp2p's client writes the multistream header, waits for its echo, writes the protocol, waits for that
echo: two round trips (and two more Noise frames) before the first byte of a call. The protocol allows the
client to send the header, the protocol and its first data at once and check the two echoes afterwards
(go-libp2p's "lazy" client); listeners, Go's and py-libp2p's alike, read them in order from the stream. A
unary call is then one round trip: request out, echoes and response back.
"""

from __future__ import annotations

import trio
from libp2p.abc import INetStream, INetwork
from libp2p.peer.id import ID
from libp2p.protocol_muxer.multiselect import MULTISELECT_PROTOCOL_ID as MULTISTREAM
from libp2p.protocol_muxer.multiselect import PROTOCOL_NOT_FOUND_MSG
from libp2p.utils import encode_delim

from p2ptrain.p2pd.framing import FrameError, Reader
from p2ptrain.p2pd.streams import receiver

MAX_LINE_BYTES = 1024  # a protocol id or "na"


class ProtocolNotSupported(Exception):
    pass


def line(text: str) -> bytes:
    """A multistream message: uvarint length, the text, a newline (py-libp2p's own encoding)."""
    return encode_delim(text.encode())


async def read_line(reader: Reader) -> str:
    body = await reader.read_prefixed(MAX_LINE_BYTES)
    if not body.endswith(b"\n"):
        raise FrameError(f"multistream message without a newline: {body[:64]!r}")
    return body[:-1].decode(errors="replace")


async def open_stream(
    network: INetwork, peer: ID, protocols: list[str], first: bytes = b""
) -> tuple[INetStream, Reader]:
    """A stream on the first of ``protocols`` the remote speaks; read what follows through the returned reader.

    ``first`` (one protocol only) goes out with the proposal, before the remote's answer. Raises
    ProtocolNotSupported when the remote declines every protocol ("na"), FrameError when it answers anything
    else; the stream is reset then.
    """
    if not protocols or (first and len(protocols) > 1):
        raise ValueError("early data needs exactly one protocol")
    stream = await network.new_stream(peer)
    reader = Reader(receiver(stream))
    try:
        await stream.write(line(MULTISTREAM) + line(protocols[0]) + first)
        if (hello := await read_line(reader)) != MULTISTREAM:
            raise FrameError(f"expected {MULTISTREAM}, got {hello[:64]!r}")
        for i, proto in enumerate(protocols):
            if i:
                await stream.write(line(proto))
            answer = await read_line(reader)
            if answer == proto:
                stream.set_protocol(proto)
                return stream, reader
            if answer != PROTOCOL_NOT_FOUND_MSG:
                raise FrameError(f"proposed {proto}, the remote answered {answer[:64]!r}")
        raise ProtocolNotSupported(f"protocol not supported: {', '.join(protocols)}")
    except BaseException:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await stream.reset()
        raise
