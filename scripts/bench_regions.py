#!/usr/bin/env python3
"""Groups of nearby peers against one group for all, across two regions 150 ms apart (the lab of netlab.py).

N real peers (``bench_scale.py``'s worker: a hivemind DHT node, p2ptrain's averager on a 400 kB vector, and, for
``locality``, the prober), half in region "eu" and half in "asia": 5 ms between two peers of a region, 150 ms
between the regions (``scripts/wire.py`` holds the frames), every peer's link shaped to ``--mbit``. Side by side in
one run:

- ``swarm``: hivemind's default, every peer on one matchmaking key (today's p2ptrain);
- ``locality``: what ``seed --group-size N`` runs: in each round, level 0 in a group of at most ``--group-size``
  nearby peers (``swarm/grouping.py``), then level 1 with one peer per region (``train/level_rounds.py``); the
  members of each group know each other and meet without the DHT (``compat/matchmaking.py``);
- ``locality-dht``: the same groups, meeting through the DHT as hivemind's matchmaking does (the baseline).

Per configuration: round success (with levels: every level averaged), the round's time (start to averaged values),
the all-reduce's time by level (inside a region / across), bytes sent per peer per round, bytes that crossed between
the regions per round (the long cable's counters), and the spread of the peers' values after each round (0: all
agree). JSON + Markdown.

    .venv/bin/python scripts/bench_regions.py --out bench/regions.json     # ~4 min, as root
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_scale  # noqa: E402
from netlab import NatLab, missing_tools, sh  # noqa: E402

BENCH = Path(__file__).with_name("bench_scale.py")


def counter(ns: str, dev: str, kind: str) -> int:
    out = sh("ip", "netns", "exec", ns, "cat", f"/sys/class/net/{dev}/statistics/{kind}_bytes", check=False)
    return int(out.stdout.strip() or 0)


def run(grouping: str, args: argparse.Namespace, work: Path) -> dict:
    """One configuration in a fresh lab (removed after): the summary, with every peer's rows (``rows``: one per
    round, as ``bench_scale.py``'s worker writes them) and exit codes (``exit_codes``)."""
    lab = NatLab()
    procs: list[subprocess.Popen] = []
    results, bootstrap = work / f"rounds-{grouping}.jsonl", work / f"bootstrap-{grouping}.txt"
    try:
        eu = lab.region("eu", rtt_ms=args.between_ms / 2, inside_ms=args.inside_ms)
        asia = lab.region("asia", rtt_ms=args.between_ms / 2, inside_ms=args.inside_ms)
        hosts = [(eu if i % 2 == 0 else asia).host(f"h{i}") for i in range(args.peers)]
        if args.mbit:
            lab.shape(args.mbit)
        t0 = time.time() + 20 + 3 * args.peers

        def start(i: int) -> None:
            command = [*hosts[i].prefix, sys.executable, str(BENCH), "--worker", "--index", str(i), "--host",
                       hosts[i].ip, "--t0", str(t0), "--period", str(args.period), "--rounds", str(args.rounds),
                       "--first-round", "0", "--results", str(results), "--matchmaking", str(args.matchmaking),
                       "--grouping", grouping, "--probe-every", "2"]  # fmt: skip
            if grouping.startswith("locality"):
                command += ["--group-size", str(args.group_size)]
            command += ["--announce", str(bootstrap)] if i == 0 else ["--bootstrap", str(bootstrap)]
            log = open(work / f"peer-{grouping}-{i}.log", "ab")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        start(0)
        deadline = time.monotonic() + 60
        while not bootstrap.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        for i in range(1, args.peers):
            start(i)
        time.sleep(max(0.0, t0 - time.time() - 1))
        sent0 = [counter(h.ns, "eth0", "tx") for h in hosts]
        cross0 = counter(eu.ns, "core", "tx") + counter(eu.ns, "core", "rx")
        for proc in procs:
            proc.wait(timeout=max(1.0, t0 - time.time()) + args.rounds * args.period + 60)
        sent = [counter(h.ns, "eth0", "tx") - s for h, s in zip(hosts, sent0, strict=True)]
        cross = counter(eu.ns, "core", "tx") + counter(eu.ns, "core", "rx") - cross0
    finally:
        for proc in procs:  # the whole session: a worker's averager and DHT processes may outlive it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        lab.remove()
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    by_level: dict[str, list[float]] = {}  # locality: each level's all-reduce (without its matchmaking)
    for row in rows:
        for level, _, seconds in row.get("done") or []:
            by_level.setdefault(str(level), []).append(seconds)
    spread = []
    for r in range(args.rounds):
        values = [row["value"] for row in rows if row["round"] == r]
        spread.append(statistics.pstdev(values) if len(values) > 1 else None)
    region = {row["me"]: row["peer"] % 2 for row in rows}
    local = [len({region.get(p) for p in [row["me"], *others]}) == 1
             for row in rows for level, others, _ in row.get("done") or [] if level == 0]  # fmt: skip
    return {
        "grouping": grouping,
        "peer_rounds": len(rows),
        "success_rate": sum(r["ok"] for r in rows) / max(1, len(rows)),
        "allreduce_s_median_by_level": {k: statistics.median(v) for k, v in sorted(by_level.items())},
        "round_s_median": statistics.median(done) if (done := [r["end_s"] for r in rows if r["ok"]]) else None,
        "level0_groups_inside_a_region": sum(local) / len(local) if local else None,
        "read_s_median": bench_scale.read_median(rows),
        "bytes_sent_per_peer_per_round": statistics.fmean(sent) / args.rounds,
        "bytes_between_regions_per_round": cross / args.rounds,
        "spread_by_round": spread,
        "exit_codes": [proc.returncode for proc in procs],
        "rows": rows,
    }


def table(report: dict) -> str:
    a = report["args"]
    lines = [
        f"# Two regions {a['between_ms']:.0f} ms apart, {a['peers']} peers ({a['inside_ms']:.0f} ms inside a region), "
        f"{a['mbit'] or 'unshaped'} Mbit/s links, 400 kB vector, {a['rounds']} rounds",
        "",
        f"Command: `{report['command']}`",
        "",
        "| groups | success | round, median (s) | all-reduce inside a region / across (s) | MB sent per peer per round "
        "| MB between the regions per round | spread after the last round |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["runs"]:
        levels = r["allreduce_s_median_by_level"]
        split = f"{levels['0']:.2f} / {levels['1']:.2f}" if "0" in levels and "1" in levels else "—"
        spread = [s for s in r["spread_by_round"] if s is not None]
        last = f"{spread[-1]:.3g}" if spread else "—"
        lines.append(
            f"| {r['grouping']} | {100 * r['success_rate']:.0f} % | {_f(r['round_s_median'])} | {split} | "
            f"{r['bytes_sent_per_peer_per_round'] / 1e6:.2f} | {r['bytes_between_regions_per_round'] / 1e6:.2f} | "
            f"{last} |"
        )
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--period", type=float, default=14.0, help="seconds between rounds (levels: all in one)")
    parser.add_argument("--matchmaking", type=float, default=3.0)
    parser.add_argument("--between-ms", type=float, default=150.0)
    parser.add_argument("--inside-ms", type=float, default=5.0)
    parser.add_argument("--mbit", type=float, default=50.0, help="every peer's link, each way (0: unshaped)")
    parser.add_argument("--groupings", default="swarm,locality-dht,locality", help="the configurations, in order")
    parser.add_argument("--out", type=Path, default=Path("bench/regions.json"))
    args = parser.parse_args(argv)
    if missing_tools():
        print(f"bench_regions needs {', '.join(missing_tools())}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="p2ptrain-regions-"))
    print(f"Peer logs and rounds: {work}", flush=True)
    report = {"command": " ".join(["scripts/bench_regions.py", *(argv if argv is not None else sys.argv[1:])]),
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "runs": []}  # fmt: skip
    for grouping in args.groupings.split(","):
        report["runs"].append({k: v for k, v in run(grouping, args, work).items() if k != "rows"})
        print(json.dumps(report["runs"][-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(report))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
