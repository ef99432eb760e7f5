#!/usr/bin/env python3
"""The scale benchmark's protocol in a discrete-event simulation: hundreds to 10,000 peers, a modelled network.

The protocol is what ``seed --averaging local --group-size N`` runs (``train/level_rounds.py``): at each global step
every peer derives its groups at every level of the grid from the records it read (``Regrouping.passes``) and runs
the levels back to back, each averaging what the one before left, weighted by what each member's value stands for
times its ``Group.share``. What is real: the grouping (``p2ptrain.swarm.grouping``: the clusters and the levels
every peer derives, from near records built from the peers' positions) and the rule that peers whose group keys
are equal meet in one hivemind group (of at most the target size the leader set: its group's expected members).
``--grouping swarm`` is hivemind's one key for all (groups of ``--group-size`` of whoever answers, or one group).
What is modelled: time and bytes, with constants measured on real peers (``scripts/bench_scale.py``,
``bench/scale*.json``):

- a level's group forms ``known_join_s`` after its last member is ready when it fills its target, else after
  hivemind's ``min_matchmaking_s`` (the leader's expiration), plus a join request's round trip to its leader
  (``--grouping locality``: its members know each other, ``compat/matchmaking.py``); through the DHT
  (``locality-dht``, ``swarm``): ``join_s`` or ``min_matchmaking_s``, plus one DHT lookup (``lookup_rpcs(N)``
  RPCs, log2 N round trips);
- its all-reduce moves ``2 (g - 1) / g`` of the vector per member over the slowest member's link, in
  ``2 + g / 8`` round trips of the farthest pair, plus ``part_cpu_s`` of CPU per part per member — on the lab
  machine all N peers share ``cores`` cores (``--lab``), in the world each peer has its own;
- a level fails for a group if a member dies during the round, or if it ends after the averaging timeout (one
  timeout for the whole round, as ``LevelRounds`` has); it is not retried, and the next level gets the values
  the members hold;
- bytes sent per peer per round: ``framing`` × the all-reduces' shares + the DHT's upkeep (``upkeep_bps``) + one
  lookup per level through the DHT + the near and member records read at the round's start (``record_bytes`` per
  member);
- churn: ``--churn`` of the peers are killed at random rounds and replaced by new ones that download a live
  peer's state; a dead peer stays in the others' views until its records expire (``ttl_rounds``), a new one
  enters them one round late. ``--views`` distinct views model peers that read the DHT at different moments (a
  random few recent changes missing from each).

Each peer holds a scalar anchor (0 at the start: one model) and at each round sends a pseudo-gradient drawn from
N(0, 1); the round's result is added to its anchor (its own pseudo-gradient when no level averaged). Averaging
pseudo-gradients never joins anchors that parted, so the spread of the anchors (population standard deviation)
is the consensus distance between peers' models; with ``--sync-every K`` every K-th round averages the anchors
themselves, as ``--sync-every`` does. ``results_apart_by_round`` is the spread of what peers applied (0: one
average for all).

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
    known_join_s: float = 0.5  # the same for a group whose members know each other (no DHT): see bench/
    rpc_s: float = 0.004  # one DHT RPC's processing, on top of its round trip
    lookup_a: float = -8.0  # DHT find RPCs per lookup ~ a + b log2 N (fitted: 3, 7, 25, 20 at N = 4..32)
    lookup_b: float = 6.5
    part_cpu_s: float = 0.05  # CPU per part a member sends or aggregates (16 peers, groups of 7-8: 0.7 s a round)
    framing: float = 1.05  # protobuf, yamux, noise on top of the payload
    upkeep_bps: float = 27_000.0  # the DHT's own traffic per peer (measured: ~0.55 MB per 20 s beyond the payload)
    rpc_bytes: float = 600.0
    record_bytes: float = 300.0  # a member's near + membership records, as read at a regrouping
    read_keys: int = 17  # the round's first read: the members' key and 16 near shards, looked up at once
    read_rpc_cpu_s: float = 0.002  # the lab: CPU per lookup RPC (the reads took 0.6 / 5.4 / 14 s at 8 / 16 / 32)
    read_rtts: float = 9.0  # the world: the read in round trips of the 90th-percentile pair (1.4 s at 150 ms, 8 peers)
    timeout_s: float = 30.0  # the manifest's averaging timeout (calibration: bench_scale's, the period minus 4 s)


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
        value = self.rng.choice(alive).value if alive else 0.0  # one model at the start; a joiner downloads a state
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
    grouping_size = args.group_size if args.grouping.startswith("locality") else None
    known = args.grouping == "locality"  # its groups meet without the DHT (compat/matchmaking.py)
    target = args.group_size or None  # hivemind's target group size (0, None: unbounded)
    ttl_rounds = max(1, round(300 / args.period))
    timeout = args.timeout or model.timeout_s
    kills = {r: [] for r in range(args.rounds)}
    churned = max(1, math.ceil(args.churn * n)) if args.churn else 0
    for _ in range(churned):  # as bench_scale.py: all at once after round ``churn_after``; else spread over the run
        at = args.churn_after if args.calibrate else rng.randrange(1, args.rounds)
        kills[min(at, args.rounds - 1)].append(None)
    rows, spread, apart, formed = [], [], [], []
    level_count = 1
    for r in range(args.rounds):
        alive = swarm.alive()
        syncing = bool(getattr(args, "sync_every", 0)) and r % args.sync_every == args.sync_every - 1
        # what each peer averages this round: its pseudo-gradient, or on a parameter round its anchor itself
        sent = {p.name: p.value if syncing else rng.gauss(0.0, 1.0) for p in alive}
        values, weights = dict(sent), dict.fromkeys(sent, 1.0)
        placed: list[dict] = []  # per view, per level: peer -> Group
        if grouping_size:  # every peer derives its groups from the records it read at the round's start
            records = swarm.records()
            listed = [p.name for p in swarm.peers.values()
                      if p.born < r and (p.died is None or r - p.died < ttl_rounds)]  # fmt: skip
            recent = [p.name for p in swarm.peers.values() if r - 3 <= p.born < r]
            for v in range(args.views):
                missing = set(random.Random(r * 31 + v).sample(recent, len(recent) // 2)) if v else set()
                found = clusters(records, [p for p in listed if p not in missing], grouping_size)
                level_count = levels(len(found), grouping_size)
                placed.append([all_groups(found, grouping_size, level) for level in range(level_count)])
        else:
            level_count = 1
        dying = set()
        for _ in kills[r]:
            victim = rng.choice([p for p in alive if p.name not in dying])
            dying.add(victim.name)
        lookup = lookup_rpcs(len(alive), model)
        read_s = _read_s(swarm, alive, lookup, model) if grouping_size else 0.0
        elapsed = {p.name: read_s for p in alive}  # each peer's time into the round: it begins with the read
        failed = {p.name: False for p in alive}
        formations, payloads = [], {p.name: 0.0 for p in alive}
        for level in range(level_count):
            keys: dict[str, list[tuple[Peer, int | None, float]]] = {}  # key -> (member, expected size, its share)
            for i, peer in enumerate(alive):
                if not grouping_size:
                    keys.setdefault("swarm", []).append((peer, target, 1.0))  # None: unbounded, never "filled"
                    continue
                view = placed[i % len(placed)]
                mine = view[level].get(peer.name) if level < len(view) else None  # None: its view lacks it
                if mine is None or len(mine.members) < 2:
                    continue  # alone at this level: nothing to average
                keys.setdefault(mine.key_bits, []).append((peer, len(mine.members), mine.share))
            groups = []
            for members in keys.values():
                if grouping_size:
                    members.sort(key=lambda m: m[0].name)
                else:  # one key for all: hivemind's leaders take followers in no order p2ptrain controls
                    rng.shuffle(members)
                size = members[0][1] or len(members)  # the leader's target (``LevelRounds``: its expected members)
                groups += [members[k : k + size] for k in range(0, len(members), size)]
            busy = sum(len(g) * 2 * (len(g) - 1) for g in groups if len(g) > 1) * model.part_cpu_s  # CPU-seconds
            for g in groups:
                peers = [m[0] for m in g]
                if len(peers) < 2:
                    failed[peers[0].name] = True  # its group never formed
                    continue
                far = max(swarm.rtt(a, b) for a in peers for b in peers) / 1000
                link = world.mbit_s * 1e6 / 8
                if world.loss:  # each member talks to size - 1 others at once, each flow capped by its round trip
                    link = min(link, (len(g) - 1) * 1460 * 1.22 / (max(far, 1e-4) * math.sqrt(world.loss)))
                payload = 2 * (len(g) - 1) / len(g) * args.vector_bytes
                filled = g[0][1] is not None and len(g) >= g[0][1]
                if known:  # a join request to the lowest member and its answer; a member missing: its expiration
                    formation = (model.known_join_s if filled else model.min_matchmaking_s) + 2 * far
                else:  # hivemind's: a declaration and lookups in the DHT
                    formation = (model.join_s if filled else model.min_matchmaking_s) + math.log2(len(alive)) * (
                        far + model.rpc_s
                    )
                cpu = 2 * (len(g) - 1) * model.part_cpu_s  # this member's parts, on a core of its own
                if world.cores:  # the lab: every group's all-reduce at once on the shared cores; its CPU time T
                    cpu = max(cpu, math.sqrt(cpu * busy / world.cores))  # stretches until T * cores = busy * T / own
                start = max(elapsed[p.name] for p in peers)  # its members meet when the last one is done before
                end = start + formation + payload / link + (2 + len(g) / 8) * far + cpu
                killed = any(p.name in dying for p in peers) and end > args.period / 2  # killed mid-period
                ok = end - start <= (timeout - start) / (level_count - level) and not killed  # its share of the rest
                formations.append(formation)
                for p in peers:
                    elapsed[p.name] = min(end, timeout)
                    payloads[p.name] += payload
                    failed[p.name] |= not ok
                if ok:  # the weighted mean, each member's weight what its value stands for times its share
                    share = [m[2] for m in g]
                    total = sum(weights[p.name] * s for p, s in zip(peers, share, strict=True))
                    mean = sum(weights[p.name] * s * values[p.name] for p, s in zip(peers, share, strict=True)) / total
                    for p in peers:
                        values[p.name], weights[p.name] = mean, total
        reads = len(swarm.peers) if grouping_size else 0
        if grouping_size:
            lookups_sent = (0 if known else lookup * level_count) + model.read_keys * lookup
        else:
            lookups_sent = lookup
        for p in alive:  # the outer step: the round's result, or the peer's own update if no level averaged
            result = values[p.name]
            p.value = result if syncing else p.value + result
            rows.append({"ok": not failed[p.name] and payloads[p.name] > 0, "time_s": elapsed[p.name],
                         "bytes": _bytes(payloads[p.name], lookups_sent, reads, args, model)})  # fmt: skip
        formed += formations
        apart.append(statistics.pstdev([values[p.name] for p in alive]) if not syncing and len(alive) > 1 else 0.0)
        for name in dying:
            swarm.peers[name].died = r
            swarm.add(born=r + 1)
        spread.append(statistics.pstdev([p.value for p in swarm.alive()]))
    times = sorted(row["time_s"] for row in rows if row["ok"])
    formation = sorted(formed)
    return {
        "peers": n,
        "rounds": args.rounds,
        "churned_peers": churned,
        "success_rate": sum(row["ok"] for row in rows) / max(1, len(rows)),
        "group_formation_s_median": statistics.median(formation) if formation else None,
        "round_s_median": statistics.median(times) if times else None,
        "round_s_p90": times[int(0.9 * (len(times) - 1))] if times else None,
        "find_rpcs_per_lookup": round(lookup_rpcs(n, model), 1),
        "bytes_sent_per_peer_per_round": statistics.fmean(row["bytes"] for row in rows),
        "consensus_by_round": spread,  # the spread of the peers' anchors (0: one model)
        "results_apart_by_round": apart,  # the spread of what the peers applied in the round (0: one average)
        "levels": level_count,
    }


def _read_s(swarm: Swarm, alive: list[Peer], rpcs: float, model: Model) -> float:
    """The round's first read (the members and the near records): in the lab, every peer's lookups at once on the
    shared cores; in the world, ``read_rtts`` round trips of the 90th-percentile pair (measured at 8 peers; how it
    grows with the lookups' hops is not measured, so at scale this is a floor)."""
    if swarm.world.cores:
        return len(alive) * model.read_keys * rpcs * model.read_rpc_cpu_s / swarm.world.cores
    rng = random.Random(len(alive))
    pairs = (
        sorted(swarm.rtt(*rng.sample(alive, 2)) for _ in range(min(400, len(alive) ** 2))) if len(alive) > 1 else [0]
    )
    return model.read_rtts * pairs[int(0.9 * (len(pairs) - 1))] / 1000


def _bytes(payload: float, lookup: float, reads: int, args: argparse.Namespace, model: Model) -> float:
    return (model.framing * payload + model.upkeep_bps * args.period + lookup * model.rpc_bytes
            + reads * model.record_bytes)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--period", type=float, default=20.0)
    parser.add_argument("--group-size", type=int, default=8, help="0: unbounded (with --grouping swarm)")
    parser.add_argument(
        "--grouping",
        choices=("swarm", "locality", "locality-dht"),
        default="locality",
        help="locality: levels of nearby peers whose groups meet without the DHT (seed/join); "
        "locality-dht: the same groups meeting through the DHT; swarm: hivemind's one key",
    )
    parser.add_argument("--churn", type=float, default=0.1, help="fraction of peers killed and replaced in the run")
    parser.add_argument("--churn-after", type=int, default=2)
    parser.add_argument("--views", type=int, default=3, help="distinct views of the swarm's records per cycle")
    parser.add_argument("--vector-bytes", type=float, default=400_000)
    parser.add_argument("--timeout", type=float, default=None, help="averaging timeout (default: the manifest's 30 s)")
    parser.add_argument("--sync-every", type=int, default=0, help="every K rounds average the anchors themselves")
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
    groups of nearby peers and, where simulated, hivemind's groups of whoever answers first and the nearby groups
    meeting through the DHT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {
        "nearby peers (p2ptrain)": report.get("simulated", {}),
        "whoever answers (hivemind)": report.get("simulated_swarm", {}),
        "nearby peers, meeting through the DHT": report.get("simulated_locality-dht", {}),
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for (label, results), style in zip(runs.items(), ("-", "--", ":"), strict=True):
        for n, result in sorted(results.items(), key=lambda item: int(item[0])):
            distances = [max(d, 1e-9) for d in result["consensus_by_round"]]
            axes[0].plot(range(1, len(distances) + 1), distances, style, label=f"{n} peers, {label}")
        sizes = sorted(results, key=int)
        if sizes:
            peers = [int(n) for n in sizes]
            axes[1].plot(peers, [results[n]["round_s_median"] for n in sizes], "o" + style, label=label)
            axes[2].plot(peers, [results[n]["bytes_sent_per_peer_per_round"] / 1e6 for n in sizes], "o" + style,
                         label=label)  # fmt: skip
    axes[0].set(title="spread of the anchors (consensus distance)", xlabel="global step", yscale="log")
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
                    "grouping": report.get("grouping", "swarm"), "vector_bytes": report["vector_bytes"],
                    "timeout": report["period_s"] - 4}  # fmt: skip
            sim = simulate(real["peers"], argparse.Namespace(**{**vars(args), **same}), LAB, model)
            rows.append({"run": path.stem, "peers": real["peers"], "grouping": same["grouping"],
                         "group_size": same["group_size"], "simulated": sim, "measured": real})  # fmt: skip
    return rows


def calibration_table(rows: list[dict]) -> str:
    lines = [
        "| run | peers | groups | round success sim / real | group formation median sim / real (s) "
        "| round median sim / real (s) | MB sent per peer per round sim / real |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        sim, real = row["simulated"], row["measured"]
        lines.append(
            f"| {row['run']} | {row['peers']} | {row['grouping']}, {row['group_size'] or 'unbounded'} | "
            f"{100 * sim['success_rate']:.0f} / {100 * real['success_rate']:.0f} % | "
            f"{_f(sim['group_formation_s_median'])} / {_f(real['group_formation_s_median'])} | "
            f"{_f(sim['round_s_median'])} / {_f(real.get('round_s_median'))} | "
            f"{sim['bytes_sent_per_peer_per_round'] / 1e6:.2f} / {real['bytes_sent_per_peer_per_round'] / 1e6:.2f} |"
        )
    return "\n".join(lines) + "\n"


def projection_table(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        f"| peers | groups | levels | round success | round median / p90 (s) | MB sent per peer per round "
        f"| DHT RPCs per lookup | anchors' spread after 1 / 2 / all {args.rounds} rounds |",
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
