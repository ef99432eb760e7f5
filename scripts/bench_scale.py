#!/usr/bin/env python3
"""Scale benchmark: real hivemind peers (DHT + p2ptrain's averager on a small vector, no model) at N = 4 … 32.

Every peer runs in its own network namespace on one bridge (``bench_wan.Namespaces``), as its own process with its
own DHT node and libp2p daemon, so the bytes it sends are counted on its own link. All peers start averaging rounds
at the same wall-clock times (one every ``--period`` seconds). ``--grouping swarm``: hivemind's one key for all, with
p2ptrain's ``GroupRounds`` averager (the default: unbounded, every peer tries to join one group; ``--group-size``
bounds it). ``--grouping locality``: what ``seed --group-size N`` runs (local mode's ``PseudoGradientAverager``,
uncompressed here so that the values are exact): each peer probes the others (``proximity.Prober``), derives the
clusters and its groups at every level from the members and records it reads at the round's start (``Prober.read``,
``Regrouping.passes``, as ``seed``/``join`` do), and runs the levels back to back in the round
(``level_rounds.LevelRounds``), each group's members meeting without the DHT (``compat/matchmaking.py``);
``--grouping locality-dht``: the same, the groups meeting through the DHT as hivemind's do. After
``--churn-after`` rounds, 10 % of the peers (at least one) are killed
(SIGKILL) and replaced by fresh ones.

Per N it reports: peers that formed a group and the time it took (from the round's start to the all-reduce; with
levels, the round's time less its all-reduces', per level), the round success rate (a round counts for a peer when
its step returned averaged values; with levels, when every level did), the time a round took (its last level's end),
the group sizes (with levels: how many peers' values a peer's result holds), DHT find
RPCs per lookup (one ``get`` of an absent key per peer per round, the longest kind of lookup; hivemind asks several
nodes per hop, so this counts RPCs, not hops), the lookup's latency, and bytes sent per peer per round (its link's
tx counter). JSON + Markdown + a PNG plot.

    .venv/bin/python scripts/bench_scale.py --out bench/scale.json          # ~15 min on 2 cores, as root
    .venv/bin/python scripts/bench_scale.py --sizes 4 --rounds 3 --out /tmp/scale.json   # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_wan import Namespaces, namespaces_available  # noqa: E402

VECTOR = 100_000  # float32 values per peer: 400 kB, a small model's worth of a part
PORT = 31800


# -- a peer (run in its namespace) ------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One peer: a DHT node and an averager; rounds at the shared start times; one JSON line per round."""
    import hivemind
    import torch
    from hivemind.averaging import DecentralizedAverager
    from hivemind.averaging.control import AveragingStage
    from hivemind.dht.protocol import DHTProtocol
    from hivemind.utils import get_dht_time

    from p2ptrain.compat.hivemind import hold_dht_tasks
    from p2ptrain.swarm.discovery import members_key
    from p2ptrain.swarm.grouping import Regrouping
    from p2ptrain.swarm.proximity import Prober
    from p2ptrain.train.averaging import PseudoGradientAverager
    from p2ptrain.train.codecs import Level
    from p2ptrain.train.group_rounds import GroupRounds
    from p2ptrain.train.level_rounds import LevelRounds

    class Rounds(GroupRounds, DecentralizedAverager):
        pass

    call_find = DHTProtocol.call_find

    async def counted(self, *a, **kw):  # the lookups' RPCs, counted in the DHT process (forked after this patch)
        FINDS[0] += 1
        return await call_find(self, *a, **kw)

    DHTProtocol.call_find = counted
    initial = [line for line in Path(args.bootstrap).read_text().split()] if args.bootstrap else []
    dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{args.host}/tcp/{PORT}"], initial_peers=initial, wait_timeout=30)
    dht.run_coroutine(hold_dht_tasks)  # as a peer's DHT does (swarm/network.py)
    if args.announce:
        Path(args.announce).write_text("\n".join(str(a) for a in dht.get_visible_maddrs()))
    me = dht.peer_id.to_base58()
    vector = torch.full((VECTOR,), 100.0 + args.index)  # its own value, the mean known; norms alike, as real data
    # allreduce_timeout: what seed/join give their averagers (the averaging timeout); without it an all-reduce whose
    # member was killed mid-round waits for good, and every later round of that peer waits behind it
    common = dict(dht=dht, prefix="scale", min_matchmaking_time=args.matchmaking, request_timeout=1.0,
                  target_group_size=args.group_size, allreduce_timeout=args.period - 4, start=True)  # fmt: skip
    if args.grouping.startswith("locality"):
        averager = PseudoGradientAverager([vector], level=Level("none"), budget=0.0, dense=True, **common)
    else:
        averager = Rounds([vector], **common)
    prober = None
    if args.grouping.startswith("locality"):
        prober = Prober(dht, RUN, every_s=args.probe_every, read_every_s=args.period)
        dht.store(members_key(RUN), b"member", get_dht_time() + 3600, subkey=me)
        prober.start()
        regrouping = Regrouping(me, args.group_size)

    out = open(args.results, "a", buffering=1)  # noqa: SIM115 - one line per round, flushed
    for r in range(args.first_round, args.rounds):
        start = args.t0 + r * args.period
        time.sleep(max(0.0, start - time.time()))
        levels, expected = None, None
        seen, read_s = None, None
        if prober is not None:  # the peer's groups this round, from the members and records read now (as peers do)
            records, members = prober.read()
            read_s = time.time() - start
            groups = regrouping.passes(records, members)
            seen = [len(members) + 1, len(records)]
            expected = [list(g.members) for g in groups]  # each level's group, as this peer derived it
            if all(len(g.members) < 2 for g in groups):
                out.write(json.dumps({"round": r, "peer": args.index, "me": me, "ok": False, "alone": True,
                                      "group": 1, "grouped_s": None, "end_s": 0.0, "find_rpcs": 0,
                                      "lookup_s": 0.0, "value": _value(vector)}) + "\n")  # fmt: skip
                continue
            control = LevelRounds(averager, groups, gather={}, weight=1.0, timeout=args.period - 4, max_weight=1e6,
                                  epoch=r, through_dht=args.grouping == "locality-dht")  # fmt: skip
            levels = len(groups)
        else:
            control = averager.step(wait=False, timeout=args.period - 4, allow_retries=False)
        grouped_at, ok, size, members, done = None, False, 0, [], []
        while not control.done() and time.time() < start + args.period - 2:
            stage = getattr(control, "stage", None)
            if grouped_at is None and stage in (AveragingStage.RUNNING_ALLREDUCE, AveragingStage.FINISHED):
                grouped_at = time.time() - start
            time.sleep(0.05)
        end_s = time.time() - start
        if not control.done():  # the next round must not meet this one's last level still running
            control.cancel()
        try:
            gathered = control.result(timeout=1)
            size, ok, members = len(gathered), True, sorted(p.to_base58() for p in gathered)
            if levels is not None:  # every level averaged, and the result holds that many peers' values
                done, size = list(gathered.levels), gathered.group_size
                ok = len(done) == sum(len(g.members) > 1 for g in groups)
                grouped_at = (end_s - sum(seconds for _, _, seconds in done)) / max(1, len(done))
        except Exception:  # noqa: BLE001 - a failed round is a data point
            pass
        rpcs, lookup_s = dht.run_coroutine(probe)
        row = {"round": r, "peer": args.index, "me": me, "ok": ok, "group": size, "members": members,
               "levels": levels, "done": done, "expected": expected, "grouped_s": grouped_at, "end_s": end_s,
               "find_rpcs": rpcs, "lookup_s": lookup_s, "value": _value(vector), "seen": seen,
               "read_s": read_s}  # fmt: skip
        out.write(json.dumps(row) + "\n")
    out.close()

    def shut_down() -> None:
        if prober is not None:
            prober.stop()
        averager.shutdown()
        dht.shutdown()

    stopping = threading.Thread(target=shut_down, daemon=True)
    stopping.start()
    stopping.join(15)  # the results are written: a shutdown that hangs must not hold the benchmark
    os._exit(0)


def _value(vector) -> float:  # noqa: ANN001
    """The peer's value now: the mean of its vector (all its entries are equal). Read without the averager's lock
    (a round that has not given up yet holds it): hivemind averages in place, in this tensor's shared memory."""
    return float(vector.mean())


RUN = "scale"  # the run id the workers' membership and near records use
FINDS = [0]  # find RPCs this peer's DHT node has sent (in its DHT process)


async def probe(_dht, node) -> tuple[int, float]:
    """One lookup of an absent key in the DHT process: the find RPCs it took, and its time."""
    before, started = FINDS[0], time.perf_counter()
    await node.get("scale_probe_key", latest=True)
    return FINDS[0] - before, time.perf_counter() - started


# -- the driver -------------------------------------------------------------------------------------------------


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict:
    net = Namespaces(n)
    procs: dict[int, subprocess.Popen] = {}
    results = work / f"rounds-{n}.jsonl"
    bootstrap = work / f"bootstrap-{n}.txt"
    t0 = time.time() + 20 + 3.0 * n  # every peer has started and joined the DHT by then (imports: ~3 s of CPU each)

    def start(i: int, first_round: int) -> None:
        command = [*net.prefix(i), sys.executable, __file__, "--worker", "--index", str(i), "--host", net.host(i),
                   "--t0", str(t0), "--period", str(args.period), "--rounds", str(args.rounds), "--first-round",
                   str(first_round), "--results", str(results), "--matchmaking", str(args.matchmaking)]  # fmt: skip
        if args.group_size:
            command += ["--group-size", str(args.group_size)]
        command += ["--grouping", args.grouping, "--probe-every", str(args.probe_every)]
        command += ["--announce", str(bootstrap)] if i == 0 and first_round == 0 else ["--bootstrap", str(bootstrap)]
        log = open(work / f"peer-{n}-{i}.log", "ab")  # noqa: SIM115 - closed with the process
        procs[i] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    try:
        start(0, 0)
        deadline = time.time() + 60
        while not bootstrap.exists() and time.time() < deadline:
            time.sleep(0.2)
        for i in range(1, n):
            start(i, 0)
        tx0 = [net.tx_bytes(i) for i in range(n)]
        churned = max(1, math.ceil(0.1 * n))
        churn_at = t0 + args.churn_after * args.period + args.period / 2
        time.sleep(max(0.0, churn_at - time.time()))
        for i in range(n - churned, n):  # killed mid-round, replaced at once (a new identity, the same address)
            os.killpg(procs[i].pid, signal.SIGKILL)
            procs[i].wait(10)
            start(i, args.churn_after + 2)
        for proc in procs.values():
            proc.wait(timeout=args.rounds * args.period + 120)
        sent = [net.tx_bytes(i) - tx0[i] for i in range(n)]
    finally:
        for proc in procs.values():  # the whole session: a worker's averager and DHT processes may outlive it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        net.remove()
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return summarize(n, rows, sent, args, churned)


def summarize(n: int, rows: list[dict], sent: list[int], args: argparse.Namespace, churned: int) -> dict:
    grouped = [r["grouped_s"] for r in rows if r["grouped_s"] is not None]
    rpcs = [r["find_rpcs"] for r in rows]
    rounds = sorted(r["end_s"] for r in rows if r["ok"])
    return {
        "peers": n,
        "rounds": args.rounds,
        "churned_peers": churned,
        "peer_rounds": len(rows),
        "success_rate": sum(r["ok"] for r in rows) / max(1, len(rows)),  # of the rounds peers lived to report
        "missing_peer_rounds": n * args.rounds - len(rows),  # killed mid-round, or not yet replaced
        "group_formation_s_median": statistics.median(grouped) if grouped else None,
        "group_formation_s_p90": sorted(grouped)[int(0.9 * (len(grouped) - 1))] if grouped else None,
        "round_s_median": statistics.median(rounds) if rounds else None,
        "round_s_p90": rounds[int(0.9 * (len(rounds) - 1))] if rounds else None,
        "levels": sorted({r["levels"] for r in rows if r.get("levels")}),  # locality: levels per round
        "group_sizes": sorted({r["group"] for r in rows if r["ok"]}),
        "find_rpcs_per_lookup_median": statistics.median(rpcs) if rpcs else None,
        "find_rpcs_per_lookup_max": max(rpcs) if rpcs else None,
        "lookup_s_median": statistics.median(r["lookup_s"] for r in rows) if rows else None,
        "read_s_median": read_median(rows),
        "bytes_sent_per_peer_per_round": statistics.mean(sent) / args.rounds if sent else None,
        "alone_peer_rounds": sum(bool(r.get("alone")) for r in rows),  # locality: no other peer in its group
        "agreeing_views": agreeing_views(rows),
        "seen_min_median": _seen(rows),  # locality: [members, near records] a peer read at a round's start
        "consensus_by_round": consensus(rows, args.rounds),
        "vector_bytes": VECTOR * 4,
    }


def read_median(rows: list[dict]) -> float | None:
    """Locality: the median time of the round's first read (the members and their near records), None without."""
    read = [r["read_s"] for r in rows if r.get("read_s") is not None]
    return statistics.median(read) if read else None


def agreeing_views(rows: list[dict]) -> float | None:
    """Locality: the share of peer-rounds whose groups, at every level, are the groups that each of their members
    (among the peers that reported that round) derived too. A peer whose partners derived other groups waits for
    members that are not coming; None without levels."""
    views: dict[int, dict[str, list]] = {}
    for row in rows:
        if row.get("expected"):
            views.setdefault(row["round"], {})[row["me"]] = row["expected"]
    checked = [
        all(len(seen[q]) > i and seen[q][i] == group for i, group in enumerate(groups) for q in group if q in seen)
        for seen in views.values()
        for groups in seen.values()
    ]
    return sum(checked) / len(checked) if checked else None


def _seen(rows: list[dict]) -> list | None:
    seen = [r["seen"] for r in rows if r.get("seen")]
    if not seen:
        return None
    return [[min(s[i] for s in seen), statistics.median(s[i] for s in seen)] for i in (0, 1)]


def consensus(rows: list[dict], rounds: int) -> list[float | None]:
    """After each round, the spread (population standard deviation) of the peers' values: 0 when all agree. Peers
    start at 100 + their index, so it begins at ~N/3.5; churn brings new peers in at their own value again (a robust
    aggregator's bound refuses averages 10× a member's own norm: values of 0..N would make the low ones refuse)."""
    spread = []
    for r in range(rounds):
        values = [row["value"] for row in rows if row["round"] == r]
        spread.append(statistics.pstdev(values) if len(values) > 1 else None)
    return spread


def table(report: dict) -> str:
    lines = [
        f"# Scale benchmark: real peers, {report['rounds']} rounds each, one every {report['period_s']:.0f} s, "
        f"{report['vector_bytes'] // 1000} kB vector, 10 % churn after round {report['churn_after']}, groups: "
        f"{report.get('grouping', 'swarm')}, group size {report['group_size'] or 'unbounded'}",
        "",
        f"Command: `{report['command']}`",
        "",
        "| peers | levels | success | group formation median / p90 (s) | round median / p90 (s) | group sizes "
        "| find RPCs per lookup (median / max) | lookup (s) | records read at the round's start (s) "
        "| bytes sent per peer per round | spread of values after the last round | same groups as their partners |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["sizes"]:
        formation = (f"{s['group_formation_s_median']:.1f} / {s['group_formation_s_p90']:.1f}"
                     if s["group_formation_s_median"] is not None else "—")  # fmt: skip
        rounds = (f"{s['round_s_median']:.1f} / {s['round_s_p90']:.1f}"
                  if s.get("round_s_median") is not None else "—")  # fmt: skip
        lines.append(
            f"| {s['peers']} | {s.get('levels') or [1]} | {100 * s['success_rate']:.0f} % | {formation} | {rounds} | "
            f"{s['group_sizes']} | "
            f"{s['find_rpcs_per_lookup_median']} / {s['find_rpcs_per_lookup_max']} | {s['lookup_s_median']:.2f} | "
            f"{_seconds(s.get('read_s_median'))} | {s['bytes_sent_per_peer_per_round'] / 1e6:.2f} MB | "
            f"{_spread(s)} | {_share(s.get('agreeing_views'))} |"
        )
    return "\n".join(lines) + "\n"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _share(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.0f} %"


def _spread(size: dict) -> str:
    last = [v for v in size.get("consensus_by_round", []) if v is not None]
    return f"{last[-1]:.3g}" if last else "—"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["sizes"]
    peers = [s["peers"] for s in sizes]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    axes[0].plot(peers, [100 * s["success_rate"] for s in sizes], "o-")
    axes[0].set(title="round success (%)", xlabel="peers", ylim=(0, 105))
    axes[1].plot(peers, [s["group_formation_s_median"] or 0 for s in sizes], "o-", label="median")
    axes[1].plot(peers, [s["group_formation_s_p90"] or 0 for s in sizes], "s--", label="p90")
    axes[1].set(title="group formation (s)", xlabel="peers")
    axes[1].legend()
    axes[2].plot(peers, [s["bytes_sent_per_peer_per_round"] / 1e6 for s in sizes], "o-")
    axes[2].set(title="MB sent per peer per round", xlabel="peers")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(peers, [str(p) for p in peers])
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="4,8,16,32")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--period", type=float, default=20.0, help="seconds between rounds")
    parser.add_argument("--churn-after", type=int, default=2, help="kill and replace 10%% of peers after this round")
    parser.add_argument("--matchmaking", type=float, default=5.0, help="min matchmaking time (the manifest default)")
    parser.add_argument("--group-size", type=int, default=None, help="target group size (default: unbounded)")
    parser.add_argument("--grouping", choices=("swarm", "locality", "locality-dht"), default="swarm",
                        help="swarm: hivemind's one key for all; locality: p2ptrain's groups of nearby peers "
                             "(swarm/grouping.py; needs --group-size); locality-dht: the same groups, meeting "
                             "through the DHT as hivemind's do (the baseline of compat/matchmaking.py)")  # fmt: skip
    parser.add_argument("--probe-every", type=float, default=5.0, help="locality: seconds between probe cycles")
    parser.add_argument("--out", type=Path, default=Path("bench/scale.json"))
    # the worker's own flags
    for flag in ("--worker",):
        parser.add_argument(flag, action="store_true", help=argparse.SUPPRESS)
    for flag, kind in (("--index", int), ("--host", str), ("--t0", float), ("--first-round", int),
                       ("--results", str), ("--bootstrap", str), ("--announce", str)):  # fmt: skip
        parser.add_argument(flag, type=kind, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.grouping.startswith("locality") and not args.group_size:
        parser.error("--grouping locality needs --group-size")
    if args.worker:
        worker(args)
        return 0
    if not namespaces_available():
        print("bench_scale needs root and `ip netns` (each peer in its own namespace)", file=sys.stderr)
        return 2
    report = {
        "command": " ".join(["scripts/bench_scale.py", *(argv if argv is not None else sys.argv[1:])]),
        "rounds": args.rounds, "period_s": args.period, "churn_after": args.churn_after,
        "vector_bytes": VECTOR * 4, "group_size": args.group_size, "grouping": args.grouping, "sizes": [],
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="p2ptrain-scale-"))
    print(f"Peer logs and rounds: {work}", flush=True)
    for n in (int(x) for x in args.sizes.split(",")):
        print(f"N = {n} …", flush=True)
        report["sizes"].append(run_size(n, args, work))
        print(json.dumps(report["sizes"][-1]), flush=True)
    report["real"] = {str(size["peers"]): size for size in report["sizes"]}  # simulate_swarm.py adds "simulated"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.exists():  # keep what the simulation wrote there
        report = {**{k: v for k, v in json.loads(args.out.read_text()).items() if k.startswith("simulat")}, **report}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(report))
    plot(report, args.out.with_suffix(".png"))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
