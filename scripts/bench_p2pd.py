#!/usr/bin/env python
"""Throughput of the two libp2p daemons hivemind can run, side by side, on loopback.

    .venv/bin/python scripts/bench_p2pd.py [--mib 64] [--repeats 3] [--out bench/p2pd.md]

For each daemon (Go: hivemind's bundled p2pd; py: p2ptrain-p2pd) two peers are started through hivemind's
``P2P`` and measured the way hivemind uses them: a raw stream of --mib MiB (how averaging moves tensors),
1 MiB unary calls, and the round trip of a small unary call. Each number is the median of --repeats runs;
the daemons alternate so that machine noise hits both alike. The ratio column is py ÷ go.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from hivemind.p2p import P2P, P2PContext
from hivemind.proto import runtime_pb2, test_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from p2ptrain import p2p_stack  # noqa: E402

CHUNK = 1 << 20


async def measure(kind: str, mib: int) -> dict[str, float]:
    with p2p_stack.selected(kind):
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
        pings = 200
        start = time.perf_counter()
        for i in range(pings):
            await b.call_protobuf_handler(a.peer_id, "ping", test_pb2.TestRequest(number=i), test_pb2.TestResponse)
        rtt_s = (time.perf_counter() - start) / pings
        return {
            "stream MB/s": mib * CHUNK / stream_s / 1e6,
            "unary 1 MiB MB/s": calls * CHUNK / unary_s / 1e6,
            "small call RTT ms": rtt_s * 1e3,
        }
    finally:
        await b.shutdown()
        await a.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=64, help="size of the raw stream")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table (Markdown) here")
    parser.add_argument("--only", choices=["go", "py"], help="measure one daemon (no comparison)")
    args = parser.parse_args()

    runs: dict[str, list[dict[str, float]]] = {"go": [], "py": []}
    for repeat in range(args.repeats):
        for kind in ("go", "py") if repeat % 2 == 0 else ("py", "go"):
            if args.only and kind != args.only:
                continue
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
        "| metric | go (hivemind's p2pd) | py (p2ptrain-p2pd) | py / go |",
        "|---|---|---|---|",
    ]
    for m in metrics:
        go, py = median["go"][m], median["py"][m]
        lines.append(f"| {m} | {go:.1f} | {py:.1f} | {py / go:.2f} |")
    table = "\n".join(lines)
    print("\n" + table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
