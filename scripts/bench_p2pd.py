#!/usr/bin/env python
"""Throughput of the two libp2p daemons hivemind can run, side by side, on loopback.

    .venv/bin/python scripts/bench_p2pd.py [--mib 64] [--repeats 3] [--out bench/p2pd.md]

For each daemon two peers are started through hivemind's ``P2P`` and measured the way hivemind uses them: a
raw stream of --mib MiB (how averaging moves tensors), 1 MiB unary calls, and small unary calls (round trip,
and the CPU time both daemons spend on one). The daemons: go (hivemind's bundled p2pd), py (p2ptrain-p2pd),
py-stock (p2ptrain-p2pd without the speed-ups of p2ptrain.p2pd.libp2p_patches and with py-libp2p's own
protocol negotiation: py-libp2p as released, plus the fix for cancelled writes). Each number is the median of
--repeats runs; the daemons take turns so that machine noise hits all alike. The ratio columns are py ÷ go
and py ÷ py-stock.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import psutil
from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2, test_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from p2ptrain.swarm import p2p_stack  # noqa: E402
from p2ptrain.swarm.p2p_stack import STOCK_ENV  # noqa: E402

CHUNK = 1 << 20
KINDS = ("go", "py", "py-stock")


def daemons_cpu_s() -> float:
    return sum(sum(child.cpu_times()[:2]) for child in psutil.Process().children())


async def measure(kind: str, mib: int) -> dict[str, float]:
    os.environ[STOCK_ENV] = "1" if kind == "py-stock" else "0"  # read by the daemons started below
    with p2p_stack.selected(kind.removesuffix("-stock")):
        a = await P2P.create()
        b = await P2P.create(initial_peers=await a.get_visible_maddrs())
    try:
        done = asyncio.Event()
        received = 0

        async def sink(info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal received
            while data := await reader.read(CHUNK):
                received += len(data)
            writer.close()
            done.set()

        await a.add_binary_stream_handler("sink", sink)
        _, reader, writer = await b.call_binary_stream_handler(a.peer_id, "sink")
        block = b"\x5a" * CHUNK
        start = time.perf_counter()
        for _ in range(mib):
            writer.write(block)
            await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(done.wait(), 300)
        stream_s = time.perf_counter() - start
        writer.close()
        assert received == mib * CHUNK, (received, mib * CHUNK)

        async def echo_len(request: runtime_pb2.Tensor, context: P2PContext) -> test_pb2.TestResponse:
            return test_pb2.TestResponse(number=len(request.buffer))

        async def ping(request: test_pb2.TestRequest, context: P2PContext) -> test_pb2.TestResponse:
            return test_pb2.TestResponse(number=request.number)

        await a.add_protobuf_handler("len", echo_len, runtime_pb2.Tensor)
        await a.add_protobuf_handler("ping", ping, test_pb2.TestRequest)
        payload = runtime_pb2.Tensor(buffer=block)
        calls = 32
        start = time.perf_counter()
        for _ in range(calls):
            await b.call_protobuf_handler(a.peer_id, "len", payload, test_pb2.TestResponse)
        unary_s = time.perf_counter() - start
        pings = 300
        start, cpu_s = time.perf_counter(), daemons_cpu_s()
        for i in range(pings):
            await b.call_protobuf_handler(a.peer_id, "ping", test_pb2.TestRequest(number=i), test_pb2.TestResponse)
        rtt_s = (time.perf_counter() - start) / pings
        cpu_s = (daemons_cpu_s() - cpu_s) / pings
        return {
            "stream MB/s": mib * CHUNK / stream_s / 1e6,
            "unary 1 MiB MB/s": calls * CHUNK / unary_s / 1e6,
            "small call RTT ms": rtt_s * 1e3,
            "small call, daemons' CPU ms": cpu_s * 1e3,
        }
    finally:
        await b.shutdown()
        await a.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="size of the raw stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--only", choices=KINDS, help="measure one daemon (no comparison)")
    args = parser.parse_args()

    kinds = [args.only] if args.only else list(KINDS)
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for repeat in range(args.repeats):
        for kind in kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]:  # a different one goes first
            result = asyncio.run(measure(kind, args.mib))
            runs[kind].append(result)
            print(f"run {repeat + 1} {kind}: " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()), flush=True)

    if args.only:
        return
    metrics = list(runs["go"][0])
    median = {kind: {m: statistics.median(r[m] for r in results) for m in metrics} for kind, results in runs.items()}
    lines = [
        f"libp2p daemons on loopback, {args.mib} MiB stream, median of {args.repeats} runs",
        "",
        "| metric | go (hivemind's p2pd) | py (p2ptrain-p2pd) | py-stock (py-libp2p as released) | py / go "
        "| py / py-stock |",
        "|---|---|---|---|---|---|",
    ]
    for m in metrics:
        go, py, stock = (median[kind][m] for kind in KINDS)
        lines.append(f"| {m} | {go:.1f} | {py:.1f} | {stock:.1f} | {py / go:.2f} | {py / stock:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
