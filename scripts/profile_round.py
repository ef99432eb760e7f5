#!/usr/bin/env python3
"""Where an averaging round's time goes: 4 real peers, p2ptrain's local-mode averager, a shaped link, no training.

Every peer runs in its own network namespace on one bridge (``bench_wan.Namespaces``, tbf at ``--link-mbit`` both
ways), as its own process with its own DHT node, libp2p daemon and p2ptrain's ``PseudoGradientAverager`` (the
averager of ``--mode local``: signed parts, robust aggregation, the codec of ``--codec``) on a vector of
``--values`` float32 values (gpt2-tiny's size by default). All peers start a round at the same wall-clock times,
with nothing else running, so the figures are the round's own: the all-reduce's wall time against payload ÷ link
rate, and inside each peer's averager process its CPU time and the time in the all-reduce's phases (encoding and
decoding parts with the codec, aggregating the parts it reduces, signing its parts and checking the others'). A CPU
time close to the wall time means the round waits for the processor, not the link.

By default it runs twice, side by side: with hivemind's fixed 512 kB parts, and with p2ptrain's
(``codecs.part_size``: a quarter of each member's share). ``--beside training`` runs one CPU-bound process next to
each peer (one torch thread, as each ``bench_wan`` peer trains): what the same rounds cost when the peers' training
shares the processor, as in ``bench_wan`` on this machine (4 peers on 2 cores); ``both``: without, then with.

    sudo .venv/bin/python scripts/profile_round.py --link-mbit 13.6 --codec int8     # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_wan import Namespaces, namespaces_available, sh  # noqa: E402

PORT = 31900
PHASES = ("allreduce", "encode", "decode", "aggregate", "sign", "verify")


# -- a peer (run in its namespace) ------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One peer: a DHT node and the averager; one round at each shared start time; one JSON line per round."""
    import hivemind
    import torch
    from hivemind.averaging.control import AveragingStage

    from p2ptrain.swarm.identity import ensure_identity, identity_key
    from p2ptrain.train import averaging, codecs, robust, signed_parts
    from p2ptrain.train.averaging import PseudoGradientAverager
    from p2ptrain.train.group_rounds import GroupRounds

    spent = dict.fromkeys(PHASES, 0.0)  # seconds in each phase, in the averager's process (forked after the patches)

    def timed(owner, name: str, phase: str) -> None:  # noqa: ANN001
        original = getattr(owner, name)
        if asyncio_function(original):

            async def wrapper(*a, **kw):  # noqa: ANN002, ANN003
                started = time.perf_counter()
                try:
                    return await original(*a, **kw)
                finally:
                    spent[phase] += time.perf_counter() - started

        else:

            def wrapper(*a, **kw):  # noqa: ANN002, ANN003
                started = time.perf_counter()
                try:
                    return original(*a, **kw)
                finally:
                    spent[phase] += time.perf_counter() - started

        setattr(owner, name, wrapper)

    for codec in {type(make()) for make in codecs.DENSE.values()}:
        timed(codec, "compress", "encode")
        timed(codec, "extract", "decode")
    timed(GroupRounds, "run_allreduce_inplace", "allreduce")
    timed(robust.RobustPartReducer, "_reduce", "aggregate")
    timed(signed_parts.PartSigner, "stamp_part", "sign")
    timed(signed_parts, "verify", "verify")

    events: list[tuple[float, str]] = []  # (time, what) in the round: parts in, reduced, averages back
    accumulate = robust.RobustPartReducer.accumulate_part

    async def accumulate_part(self, sender_index, part_index, tensor_part, weight=1.0):  # noqa: ANN001
        events.append((time.perf_counter(), f"in s{sender_index}p{part_index}"))
        result = await accumulate(self, sender_index, part_index, tensor_part, weight)
        events.append((time.perf_counter(), f"reduced p{part_index}"))
        return result

    robust.RobustPartReducer.accumulate_part = accumulate_part  # type: ignore[method-assign]
    from hivemind.averaging.partition import TensorPartContainer

    processed = TensorPartContainer.register_processed_part

    def register_processed_part(self, peer_index, part_index, part):  # noqa: ANN001
        events.append((time.perf_counter(), f"back a{peer_index}p{part_index}"))
        return processed(self, peer_index, part_index, part)

    TensorPartContainer.register_processed_part = register_processed_part  # type: ignore[method-assign]

    balance, shares = averaging.load_balance_peers, []

    def load_balance_peers(vector_size, bandwidths, min_size=0):  # noqa: ANN001
        shares.append((list(bandwidths), balance(vector_size, bandwidths, min_size)))
        return shares[-1][1]

    averaging.load_balance_peers = load_balance_peers

    rows = open(args.results, "a", buffering=1)  # noqa: SIM115 - one line per round, flushed
    aggregate = averaging.CompressedAllReduce.aggregate_with_group

    async def measured(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        for phase in PHASES:
            spent[phase] = 0.0
        events.clear()
        shares.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = await aggregate(self, *a, **kw)
        row = {"peer": args.index, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
               "round_s": outcome.round_s, "bytes_sent": outcome.bytes_sent, "group": outcome.group_size,
               "codec": outcome.codec, **{f"{p}_s": spent[p] for p in PHASES},
               "events": [(round(t - wall, 3), what) for t, what in events], "shares": shares}  # fmt: skip
        rows.write(json.dumps(row) + "\n")
        return outcome

    averaging.CompressedAllReduce.aggregate_with_group = measured  # type: ignore[method-assign]
    if args.parts == "hivemind":  # its fixed 512 kB parts, as before p2ptrain sized them
        averaging.part_size = lambda vector_bytes, group_size: codecs.MAX_PART_BYTES

    home = Path(args.home)
    home.mkdir(parents=True, exist_ok=True)
    ensure_identity(home)
    initial = Path(args.bootstrap).read_text().split() if args.bootstrap else []
    dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{args.host}/tcp/{PORT}"], initial_peers=initial,
                       identity_path=str(home / "identity.key"), wait_timeout=30)  # fmt: skip
    if args.announce:
        Path(args.announce).write_text("\n".join(str(a) for a in dht.get_visible_maddrs()))
    torch.manual_seed(args.index)
    vector = torch.randn(args.values) * 1e-3  # a pseudo-gradient's scale
    level = codecs.Level(args.codec)
    averager = PseudoGradientAverager(
        [vector], level=level, budget=1.0, dht=dht, prefix="profile_outer", min_matchmaking_time=args.matchmaking,
        request_timeout=1.0, allreduce_timeout=60.0, aggregation=args.aggregation,
        signer=signed_parts.PartSigner(identity_key(home)), start=True,
    )  # fmt: skip
    for r in range(args.rounds):
        start = args.t0 + r * args.period
        time.sleep(max(0.0, start - time.time()))
        control = averager.step(wait=False, timeout=args.period - 2, allow_retries=False)
        deadline = start + args.period - 1
        while not control.done() and time.time() < deadline:
            time.sleep(0.05)
        if not control.done() or control.stage != AveragingStage.FINISHED:
            control.cancel()
        elif args.shares == "measured" and control.result().uplink:  # as the optimizers do after each round
            averager.bandwidth = control.result().uplink
    rows.close()
    os._exit(0)


def asyncio_function(function) -> bool:  # noqa: ANN001
    import inspect

    return inspect.iscoroutinefunction(function)


def training() -> None:
    """A peer's training as the processor sees it: one torch thread computing without pause, until killed."""
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256) / 16
    while True:
        a = torch.tanh(a @ a)


# -- the driver -------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    net = Namespaces(args.peers)
    net.shape(args.link_mbit)
    if args.slow_mbit:  # peer 0's link, both ways, slower than the others'
        tbf = ("tbf", "rate", f"{args.slow_mbit:.3f}mbit", "burst", "32768", "latency", "400ms")
        sh("ip", "netns", "exec", net.names[0], "tc", "qdisc", "change", "dev", "eth0", "root", *tbf)
        sh("tc", "qdisc", "change", "dev", net.host_ends[0], "root", *tbf)
    results, bootstrap = work / "rounds.jsonl", work / "bootstrap.txt"
    t0 = time.time() + 15 + 3.0 * args.peers  # every peer has started and joined the DHT by then
    procs, loads = [], []
    try:
        for i in range(args.peers):
            command = [*net.prefix(i), sys.executable, __file__, "--worker", "--index", str(i), "--host", net.host(i),
                       "--t0", str(t0), "--period", str(args.period), "--rounds", str(args.rounds), "--results",
                       str(results), "--matchmaking", str(args.matchmaking), "--values", str(args.values), "--codec",
                       args.codec, "--aggregation", args.aggregation, "--home", str(work / f"peer{i}"), "--parts",
                       args.parts, "--shares", args.shares]  # fmt: skip
            command += ["--announce", str(bootstrap)] if i == 0 else ["--bootstrap", str(bootstrap)]
            log = open(work / f"peer{i}.log", "ab")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            if args.beside == "training":
                load = [sys.executable, __file__, "--training"]
                loads.append(subprocess.Popen(load, stderr=log, start_new_session=True))
            if i == 0:
                deadline = time.time() + 60
                while not bootstrap.exists() and time.time() < deadline:
                    time.sleep(0.2)
        for proc in procs:
            proc.wait(timeout=t0 - time.time() + args.rounds * args.period + 60)
    finally:
        for proc in procs + loads:  # the whole session: a peer's averager, DHT and daemon outlive its os._exit
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        net.remove()
    return [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def table(results: dict[str, list[dict]], args: argparse.Namespace) -> str:
    link = args.link_mbit * 1e6 / 8
    lines = [
        f"{args.peers} peers, {args.values:,} values, codec {args.codec}, aggregation {args.aggregation}, link "
        f"{args.link_mbit} Mbit/s"
        + (f" (peer 0: {args.slow_mbit} Mbit/s)" if args.slow_mbit else "")
        + f"; medians over the peer-rounds with all {args.peers} peers",
        "",
        "| parts, shares, beside | peer-rounds | payload ÷ link (s) | all-reduce (s) | ratio | smallest share | "
        + "CPU in the averager (s) | "
        + " | ".join(f"{p} (s)" for p in PHASES[1:])
        + " |",
        "|---" * (7 + len(PHASES) - 1) + "|",
    ]
    for parts, rows in results.items():
        full = [r for r in rows if r["group"] == args.peers]
        if not full:
            lines.append(f"| {parts} | 0 of {len(rows)} |" + " |" * (5 + len(PHASES)))
            continue
        fractions = [min(r["shares"][-1][1]) / sum(r["shares"][-1][1]) for r in full if r.get("shares")]
        share = f"{statistics.median(fractions):.2f}" if fractions else "—"
        ideal = statistics.median(r["bytes_sent"] for r in full) / link
        med = {
            key: statistics.median(r[key] for r in full) for key in ("round_s", "cpu_s", *(f"{p}_s" for p in PHASES))
        }
        lines.append(
            f"| {parts} | {len(full)} | {ideal:.2f} | {med['round_s']:.2f} | {med['round_s'] / ideal:.2f}x | {share} | "
            f"{med['cpu_s']:.2f} | " + " | ".join(f"{med[f'{p}_s']:.2f}" for p in PHASES[1:]) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--values", type=int, default=470_528, help="the vector's size (gpt2-tiny's parameters)")
    parser.add_argument("--codec", default="int8", choices=("none", "fp16", "int8", "int4", "int2"))
    parser.add_argument("--aggregation", default="centered_clip", help="the manifest's averaging.aggregation")
    parser.add_argument("--link-mbit", type=float, default=13.6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--period", type=float, default=12.0, help="seconds between rounds")
    parser.add_argument("--matchmaking", type=float, default=2.0)
    parser.add_argument("--parts", choices=("hivemind", "p2ptrain", "both"), default="both",
                        help="hivemind's fixed 512 kB parts, p2ptrain's (codecs.part_size), or both")  # fmt: skip
    parser.add_argument("--slow-mbit", type=float, default=0.0, help="peer 0's link (0: as the others')")
    parser.add_argument(
        "--shares", choices=("equal", "measured", "both"), default="equal",
        help="shares of the vector: equal (no bandwidth reported), by measured uplinks, or both",
    )  # fmt: skip
    parser.add_argument(
        "--beside",
        choices=("nothing", "training", "both"),
        default="nothing",
        help="a CPU-bound process beside each peer, as its training (both: without, then with)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the peers' logs (printed where)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--training", action="store_true", help=argparse.SUPPRESS)
    for flag, kind in (("--index", int), ("--host", str), ("--t0", float), ("--results", str), ("--home", str),
                       ("--announce", str), ("--bootstrap", str)):  # fmt: skip
        parser.add_argument(flag, type=kind, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.training:
        training()
    if not namespaces_available():
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    results = {}
    both = lambda value, pair: pair if value == "both" else (value,)  # noqa: E731
    for parts, shares, beside in itertools.product(
        both(args.parts, ("hivemind", "p2ptrain")), both(args.shares, ("equal", "measured")),
        both(args.beside, ("nothing", "training")),
    ):  # fmt: skip
        label = f"{parts}, {shares} shares, {beside}"
        work = Path(tempfile.mkdtemp(prefix="p2pt-profile-"))
        try:
            results[label] = run(argparse.Namespace(**{**vars(args), "parts": parts, "shares": shares,
                                                        "beside": beside}), work)  # fmt: skip
        finally:
            if args.keep:
                print(f"peers' logs ({label}): {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    print(table(results, args))
    if args.out:
        args.out.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "out"}, "rounds": results},
                                       default=str, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
