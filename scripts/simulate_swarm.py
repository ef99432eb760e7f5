#!/usr/bin/env python3
"""The scale benchmark's protocol in a discrete-event simulation: hundreds to 10,000 peers, a modelled network.

What is real: the grouping (``p2ptrain.swarm.grouping``: the clusters and the Moshpit levels every peer derives,
from near records built from the peers' positions) and the rule that peers whose group keys are equal meet in one
hivemind group (of at most the target size: hivemind's leader stops accepting followers there). What is modelled:
time and bytes, with constants measured on real peers (``scripts/bench_scale.py``, ``bench/scale*.json``):

- a group forms ``join_s`` after the round starts when it fills up to its target size, else after hivemind's
  ``min_matchmaking_s``; plus one DHT lookup (``lookup_rpcs(N)`` RPCs, ``hops(N)`` round trips);
- its all-reduce moves ``2 (g - 1) / g`` of the vector per member over the slowest member's link, in
  ``2 + g / 8`` round trips of the farthest pair, plus ``part_cpu_s`` of CPU per part per member — on the lab
  machine all N peers share ``cores`` cores (``--lab``), in the world each peer has its own;
- a round fails for a group if a member dies during it, or if it exceeds the averaging timeout;
- bytes sent per peer per round: ``framing`` × the all-reduce's share + the DHT's upkeep (``upkeep_bps``) + the
  lookups' RPCs + the near and member records read at each regrouping (``record_bytes`` per member);
- churn: ``--churn`` of the peers are killed at random rounds and replaced by new ones with their own value;
  a dead peer stays in the others' views until its records expire (``ttl_rounds``), a new one enters them one
  round late. Every peer reads the records at each cycle's start; ``--views`` distinct views model peers that
  read the DHT at different moments (a random few recent changes missing from each).

Each peer holds a scalar (drawn from N(0, 1) at the start; a joiner copies a live peer's, as a late joiner downloads
the swarm's state); a successful group sets its members' scalars to their mean, so the spread of the scalars
(population standard deviation, 1 at the start) is the consensus distance between peers' models.

    .venv/bin/python scripts/simulate_swarm.py --calibrate        # simulated vs measured at N = 4..32 (the lab)
    .venv/bin/python scripts/simulate_swarm.py --sizes 100,1000,10000 --out bench/scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from p2ptrain.swarm.grouping import all_groups, clusters, levels  # noqa: E402
from p2ptrain.swarm.proximity import Coord, Near  # noqa: E402


@dataclass
class Model:
    """Constants measured on real peers (bench_scale.py, this repository's bench/), see the module docstring."""

    min_matchmaking_s: float = 5.0  # hivemind's, the manifest's default; unbounded groups formed at 5.1-5.5 s
    join_s: float = 2.2  # a group that fills its target: 2.1-2.6 s after the round's start (16 peers, size 8)
    rpc_s: float = 0.004  # one DHT RPC's processing, on top of its round trip
    lookup_a: float = -8.0  # DHT find RPCs per lookup ~ a + b log2 N (fitted: 3, 7, 25, 20 at N = 4..32)
    lookup_b: float = 6.5
    part_cpu_s: float = 0.05  # CPU per part a member sends or aggregates (16 peers, groups of 7-8: 0.7 s a round)
    framing: float = 1.05  # protobuf, yamux, noise on top of the payload
    upkeep_bps: float = 27_000.0  # the DHT's own traffic per peer (measured: ~0.55 MB per 20 s beyond the payload)
    rpc_bytes: float = 600.0
    record_bytes: float = 300.0  # a member's near + membership records, as read at a regrouping
    timeout_s: float = 16.0  # bench_scale's averaging timeout: the period minus 4 s


@dataclass
class World:
    regions: list[tuple[str, float, float]]  # name, x, y (ms): distances between centres are round trips
    inside_ms: float  # spread of peers around their region's centre
    mbit_s: float  # every peer's link, each way
    cores: int | None  # the lab: all peers share this many cores; None: a machine each
    loss: float = 0.0  # packet loss on long paths: a TCP flow gets at most Mathis' MSS * 1.22 / (RTT * sqrt(loss))


LAB = World([("lab", 0.0, 0.0)], inside_ms=0.1, mbit_s=1000.0, cores=2)
EARTH = World(  # centres placed so that distances approximate public inter-continental round trips
    [
        ("eu", 0, 0),
        ("us-east", 80, 0),
        ("us-west", 140, 20),
        ("south-america", 110, -100),
        ("asia", -140, 60),
        ("oceania", -160, -90),
    ],  # fmt: skip
    inside_ms=8.0,
    mbit_s=100.0,
    cores=None,
    loss=1e-4,  # an assumption (no measurement here): 0.01 % on any path, so long paths carry less per flow
)


@dataclass
class Peer:
    name: str
    x: float
    y: float
    height: float
    value: float
    born: int  # the round it joined
    died: int | None = None


class Swarm:
    def __init__(self, n: int, world: World, seed: int):
        self.world, self.rng, self.count = world, random.Random(seed), 0
        self.peers: dict[str, Peer] = {}
        for _ in range(n):
            self.add(born=-10)

    def add(self, born: int) -> Peer:
        name = f"p{self.count:06d}"
        region = self.world.regions[self.count % len(self.world.regions)]
        spread = self.world.inside_ms
        alive = self.alive() if born >= 0 else []
        value = self.rng.choice(alive).value if alive else self.rng.gauss(0, 1)  # a joiner downloads a peer's state
        peer = Peer(name, region[1] + self.rng.gauss(0, spread), region[2] + self.rng.gauss(0, spread),
                    self.rng.uniform(0.5, 5.0) * min(1.0, spread), value, born)  # fmt: skip
        self.peers[name] = peer
        self.count += 1
        return peer

    def rtt(self, a: Peer, b: Peer) -> float:
        return math.hypot(a.x - b.x, a.y - b.y) + a.height + b.height

    def alive(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.died is None]

    def records(self) -> dict[str, Near]:
        """Near records as settled Vivaldi coordinates give them: the true position, a 10 % error."""
        rng = random.Random(self.count)
        return {
            p.name: Near(Coord(p.x * rng.uniform(0.9, 1.1), p.y * rng.uniform(0.9, 1.1), p.height, 0.1), {})
            for p in self.peers.values()
        }


def lookup_rpcs(n: int, model: Model) -> float:
    return max(1.0, model.lookup_a + model.lookup_b * math.log2(max(n, 2)))


def simulate(n: int, args: argparse.Namespace, world: World, model: Model) -> dict:
    swarm = Swarm(n, world, seed=n)
    rng = random.Random(n + 1)
    grouping_size = args.group_size if args.grouping == "locality" else None
    target = args.group_size or None  # hivemind's target group size (0, None: unbounded)
    ttl_rounds = max(1, round(300 / args.period))
    kills = {r: [] for r in range(args.rounds)}
    churned = max(1, math.ceil(args.churn * n)) if args.churn else 0
    for _ in range(churned):  # as bench_scale.py: all at once after round ``churn_after``; else spread over the run
        at = args.churn_after if args.calibrate else rng.randrange(1, args.rounds)
        kills[min(at, args.rounds - 1)].append(None)
    rows, spread = [], []
    views: list[tuple[list[list[str]], int]] = []  # (clusters, cycle start) per view
    cycle_length = 1
    for r in range(args.rounds):
        alive = swarm.alive()
        # the views of the swarm: at each cycle's start, read from the records (dead ones linger, new ones lag)
        if grouping_size and (not views or r % cycle_length == 0):  # as Regrouping does
            records = swarm.records()
            listed = [p.name for p in swarm.peers.values()
                      if p.born < r and (p.died is None or r - p.died < ttl_rounds)]  # fmt: skip
            recent = [p.name for p in swarm.peers.values() if r - 3 <= p.born < r]
            views = []
            for v in range(args.views):
                missing = set(random.Random(r * 31 + v).sample(recent, len(recent) // 2)) if v else set()
                views.append((clusters(records, [p for p in listed if p not in missing], grouping_size), r))
            cycle_length = levels(len(views[0][0]), grouping_size)
        # every alive peer's key this round
        keys: dict[str, list[Peer]] = {}
        placed = [all_groups(found, grouping_size, r) for found, _ in views] if grouping_size else []
        for i, peer in enumerate(alive):
            if not grouping_size:
                keys.setdefault("swarm", []).append(peer)
                continue
            mine = placed[i % len(placed)].get(peer.name)  # None: its own view lacks it (it joined just now)
            alone = mine is None or len(mine.members) < 2
            keys.setdefault(f"alone-{peer.name}" if alone else mine.key_bits, []).append(peer)
        dying = set()
        for _ in kills[r]:
            victim = rng.choice([p for p in alive if p.name not in dying])
            dying.add(victim.name)
        groups = []
        for members in keys.values():
            if grouping_size:
                members.sort(key=lambda p: p.name)
            else:  # one key for all: hivemind's leaders take followers in no order p2ptrain controls
                rng.shuffle(members)
            size = target or len(members)
            groups += [members[k : k + size] for k in range(0, len(members), size)]
        busy = sum(len(g) * 2 * (len(g) - 1) for g in groups if len(g) > 1) * model.part_cpu_s  # CPU-seconds
        lookup = lookup_rpcs(len(alive), model)
        for g in groups:
            size = len(g)
            if size < 2:
                rows.append({"ok": False, "group": 1, "time_s": None, "bytes": _bytes(0, lookup, 0, args, model)})
                continue
            far = max(swarm.rtt(a, b) for a in g for b in g) / 1000
            link = world.mbit_s * 1e6 / 8
            if world.loss:  # each member talks to size - 1 others at once, each flow capped by its round trip
                link = min(link, (size - 1) * 1460 * 1.22 / (max(far, 1e-4) * math.sqrt(world.loss)))
            payload = 2 * (size - 1) / size * args.vector_bytes
            filled = target is not None and size >= target
            formation = (model.join_s if filled else model.min_matchmaking_s) + math.log2(len(alive)) * (
                far + model.rpc_s
            )
            cpu = 2 * (size - 1) * model.part_cpu_s  # this member's parts, on a core of its own
            if world.cores:  # the lab: every group's all-reduce at once on the shared cores; the CPU time T stretches
                cpu = max(cpu, math.sqrt(cpu * busy / world.cores))  # until T * cores = busy * T / (its own work)
            allreduce = payload / link + (2 + size / 8) * far + cpu
            total = formation + allreduce
            killed = any(p.name in dying for p in g) and total > args.period / 2  # peers are killed mid-period
            ok = total < (args.timeout or model.timeout_s) and not killed
            reads = len(swarm.peers) if grouping_size and views and views[0][1] == r else 0
            row = {"ok": ok, "group": size, "formation_s": formation, "time_s": total,
                   "bytes": _bytes(payload, lookup, reads, args, model)}  # fmt: skip
            rows += [row] * size
            if ok:
                mean = statistics.fmean(p.value for p in g)
                for p in g:
                    p.value = mean
        for name in dying:
            swarm.peers[name].died = r
            swarm.add(born=r + 1)
        values = [p.value for p in swarm.alive()]
        spread.append(statistics.pstdev(values))
    times = sorted(row["time_s"] for row in rows if row["ok"])
    formation = sorted(row["formation_s"] for row in rows if row.get("formation_s") is not None)
    return {
        "peers": n,
        "rounds": args.rounds,
        "churned_peers": churned,
        "success_rate": sum(row["ok"] for row in rows) / max(1, len(rows)),
        "group_formation_s_median": statistics.median(formation) if formation else None,
        "round_s_median": statistics.median(times) if times else None,
        "round_s_p90": times[int(0.9 * (len(times) - 1))] if times else None,
        "group_sizes": sorted({row["group"] for row in rows if row["ok"]}),
        "find_rpcs_per_lookup": round(lookup_rpcs(n, model), 1),
        "bytes_sent_per_peer_per_round": statistics.fmean(row["bytes"] for row in rows),
        "consensus_by_round": spread,
        "levels": cycle_length,
    }


def _bytes(payload: float, lookup: float, reads: int, args: argparse.Namespace, model: Model) -> float:
    return (model.framing * payload + model.upkeep_bps * args.period + lookup * model.rpc_bytes
            + reads * model.record_bytes)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--period", type=float, default=20.0)
    parser.add_argument("--group-size", type=int, default=8, help="0: unbounded (with --grouping swarm)")
    parser.add_argument("--grouping", choices=("swarm", "locality"), default="locality")
    parser.add_argument("--churn", type=float, default=0.1, help="fraction of peers killed and replaced in the run")
    parser.add_argument("--churn-after", type=int, default=2)
    parser.add_argument("--views", type=int, default=3, help="distinct views of the swarm's records per cycle")
    parser.add_argument("--vector-bytes", type=float, default=400_000)
    parser.add_argument("--timeout", type=float, default=None, help="averaging timeout (default: the bench's 16 s)")
    parser.add_argument("--lab", action="store_true", help="the lab's network and 2 shared cores (calibration)")
    parser.add_argument("--calibrate", action="store_true", help="N = 4..32 in the lab, next to bench/scale*.json")
    parser.add_argument("--out", type=Path, default=None, help="merge the results into this JSON (as 'simulated')")
    parser.add_argument("--plot-only", action="store_true", help="only draw --out's simulated results (a PNG beside)")
    args = parser.parse_args(argv)
    model = Model()
    report = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    figure = args.out.with_name(f"{args.out.stem}-simulated.png") if args.out else None
    if args.plot_only:
        if not report.get("simulated"):
            parser.error("--plot-only needs --out with simulated results (run the simulation first)")
        print(f"wrote {plot(report, figure)}")
        return 0
    if args.calibrate:
        rows = calibrate(args, model)
        print(calibration_table(rows))
        report["simulation_calibration"] = rows
    else:
        world = LAB if args.lab else EARTH
        results = {}
        for n in (int(x) for x in args.sizes.split(",")):
            results[str(n)] = simulate(n, args, world, model)
            print(json.dumps({k: v for k, v in results[str(n)].items() if k != "consensus_by_round"}), flush=True)
        print(projection_table(results, args))
        key = "simulated" if args.grouping == "locality" else f"simulated_{args.grouping}"  # the name first
        report.setdefault(key, {}).update(results)
        report["simulation"] = {"model": asdict(model), "world": asdict(world), "args": vars(args) | {"out": None}}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        if report.get("simulated"):
            plot(report, figure)
    return 0


def plot(report: dict, path: Path) -> Path:
    """Convergence (consensus distance by round) and the cost of a round against the swarm's size, for p2ptrain's
    groups of nearby peers and, where simulated, hivemind's groups of whoever answers first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {
        "nearby peers (p2ptrain)": report.get("simulated", {}),
        "whoever answers (hivemind)": report.get("simulated_swarm", {}),
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (label, results), style in zip(runs.items(), ("-", "--"), strict=True):
        for n, result in sorted(results.items(), key=lambda item: int(item[0])):
            distances = [max(d, 1e-9) for d in result["consensus_by_round"]]
            axes[0].plot(range(1, len(distances) + 1), distances, style, label=f"{n} peers, {label}")
        sizes = sorted(results, key=int)
        if sizes:
            peers = [int(n) for n in sizes]
            axes[1].plot(peers, [results[n]["round_s_median"] for n in sizes], "o" + style, label=label)
            axes[2].plot(peers, [results[n]["bytes_sent_per_peer_per_round"] / 1e6 for n in sizes], "o" + style,
                         label=label)  # fmt: skip
    axes[0].set(title="consensus distance", xlabel="round", yscale="log")
    axes[1].set(title="median round (s)", xlabel="peers", xscale="log")
    axes[2].set(title="MB sent per peer per round", xlabel="peers", xscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def calibrate(args: argparse.Namespace, model: Model) -> list[dict]:
    """Simulated next to measured, for every real run in bench/ (same N, grouping, group size, rounds, churn)."""
    rows = []
    for path in sorted(Path(__file__).parents[1].glob("bench/scale*.json")):
        report = json.loads(path.read_text())
        for real in report.get("sizes", []):
            same = {"calibrate": True, "rounds": report["rounds"], "period": report["period_s"], "churn": 0.1,
                    "group_size": report.get("group_size"), "churn_after": report["churn_after"],
                    "grouping": report.get("grouping", "swarm"), "vector_bytes": report["vector_bytes"]}  # fmt: skip
            sim = simulate(real["peers"], argparse.Namespace(**{**vars(args), **same}), LAB, model)
            rows.append({"run": path.stem, "peers": real["peers"], "grouping": same["grouping"],
                         "group_size": same["group_size"], "simulated": sim, "measured": real})  # fmt: skip
    return rows


def calibration_table(rows: list[dict]) -> str:
    lines = [
        "| run | peers | groups | round success sim / real | group formation median sim / real (s) "
        "| MB sent per peer per round sim / real |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        sim, real = row["simulated"], row["measured"]
        lines.append(
            f"| {row['run']} | {row['peers']} | {row['grouping']}, {row['group_size'] or 'unbounded'} | "
            f"{100 * sim['success_rate']:.0f} / {100 * real['success_rate']:.0f} % | "
            f"{_f(sim['group_formation_s_median'])} / {_f(real['group_formation_s_median'])} | "
            f"{sim['bytes_sent_per_peer_per_round'] / 1e6:.2f} / {real['bytes_sent_per_peer_per_round'] / 1e6:.2f} |"
        )
    return "\n".join(lines) + "\n"


def projection_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"| peers | groups | levels | round success | round median / p90 (s) | MB sent per peer per round "
        f"| DHT RPCs per lookup | spread after 1 / 2 / all {args.rounds} rounds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n, r in results.items():
        spread = r["consensus_by_round"]
        pick = " / ".join(f"{spread[i]:.3f}" for i in (0, 1, len(spread) - 1) if i < len(spread))
        lines.append(
            f"| {n} | {args.grouping}, {args.group_size or 'unbounded'} | "
            f"{r['levels']} | {100 * r['success_rate']:.0f} % | {_f(r['round_s_median'])} / {_f(r['round_s_p90'])} | "
            f"{r['bytes_sent_per_peer_per_round'] / 1e6:.2f} | {r['find_rpcs_per_lookup']:.0f} | {pick} |"
        )
    return "\n".join(lines) + "\n"


def _f(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
