#!/usr/bin/env python3
"""A long cable in user space: Ethernet frames that arrive on one interface leave on another after a delay.

The lab's links need distance (a few ms inside a region, ~150 ms between continents), and the kernel's delay
qdisc (netem) is not available here. This process stands in for it: for each pair of interfaces it is given
(in the namespace it runs in, interfaces with no address), it reads every frame from one with a raw packet
socket, holds it for the pair's one-way delay and sends it out of the other, in both directions, in arrival order.

    ip netns exec NS python3 scripts/wire.py --pair core:down:75 --pair h1:h1b:2.5

GSO: frames are read and written with a virtio-net header (``PACKET_VNET_HDR``), so a 64 kB TCP segment that
veth hands over whole is cut into MTU-sized frames by the kernel on the way out, not refused. A frame this
process sent itself shows up again on that interface as outgoing and is skipped. Frames wait in a queue bounded
by ``--queue-mb`` (the rest are dropped, as a full router queue drops them); bandwidth is shaped elsewhere (tbf).
Stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import heapq
import selectors
import signal
import socket
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
MAX_FRAME = 65536 + 64


def open_raw(interface: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind((interface, 0))
    sock.setblocking(False)
    return sock


def run(pairs: list[tuple[str, str, float]], queue_bytes: int) -> None:
    selector = selectors.DefaultSelector()
    for a, b, delay_ms in pairs:
        sa, sb = open_raw(a), open_raw(b)
        selector.register(sa, selectors.EVENT_READ, (sb, delay_ms / 1000))
        selector.register(sb, selectors.EVENT_READ, (sa, delay_ms / 1000))
    pending: list[tuple[float, int, socket.socket, bytes]] = []  # (due, sequence, out, frame)
    queued, sequence, stop = 0, 0, False

    def halt(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, halt)
    signal.signal(signal.SIGINT, halt)
    while not stop:
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, out, frame = heapq.heappop(pending)
            queued -= len(frame)
            try:
                out.send(frame)
            except OSError:  # the interface went away or its queue is full: the frame is lost, as on a wire
                pass
        timeout = max(0.0, pending[0][0] - now) if pending else 0.5
        for key, _ in selector.select(min(timeout, 0.5)):
            sock, (out, delay_s) = key.fileobj, key.data
            for _ in range(256):  # drain, bounded, so the other direction gets its turn
                try:
                    frame, address = sock.recvfrom(MAX_FRAME)
                except BlockingIOError:
                    break
                if address[2] == PACKET_OUTGOING or queued + len(frame) > queue_bytes:
                    continue
                queued += len(frame)
                sequence += 1
                heapq.heappush(pending, (time.monotonic() + delay_s, sequence, out, frame))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", action="append", required=True, help="IF_A:IF_B:ONE_WAY_DELAY_MS")
    parser.add_argument("--queue-mb", type=float, default=16.0, help="frames held at most (default 16 MB)")
    args = parser.parse_args()
    pairs = []
    for text in args.pair:
        a, b, delay = text.split(":")
        pairs.append((a, b, float(delay)))
    run(pairs, int(args.queue_mb * 1e6))


if __name__ == "__main__":
    main()
