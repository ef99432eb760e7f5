"""What a NAT costs a swarm: time per global step and compute utilization, side by side, on tbf-shaped links.

    sudo .venv/bin/python scripts/bench_nat.py --link-mbit 20 --out bench/nat-20mbit.json   # ~20 min on 2 cores; root

One seeder S on the lab's internet (scripts/netlab.py) and three volunteers, with three public DHT bootstrap
nodes (they are also the four peers go-libp2p needs to see an address before it hole-punches). Configurations:

- ``flat``: the volunteers are public too;
- ``nat_hole_punched``: each behind its own port-keeping NAT (cone): relayed first, then direct connections;
- ``nat_relayed``: each behind its own symmetric NAT (a new port per connection): hole punching cannot work, so
  the volunteers aggregate nothing (``nat.aggregates``) and send everything to S, and S sends the averages back;
- ``nat_upnp``: each behind its own NAT whose router runs miniupnpd: the port is mapped, the volunteers are
  reachable directly.

Every link to the internet is shaped to ``--link-mbit`` in each direction. Each configuration trains gpt2-tiny
(fp16 gradients) for ``--measure-s`` seconds once every peer has taken a few global steps (with hole punching: once
the volunteers hold direct connections to each other); the table gives the
seconds per global step and the compute utilization (forward/backward time ÷ wall time, mean over the peers), the
bytes each volunteer's router forwarded, and the share of those to other homes (direct, hole-punched traffic).
Writes JSON and a Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from netlab import DhtNode, NatLab, missing_tools  # noqa: E402

from p2ptrain.local_swarm import DEMO_SWARM_FLAGS, LocalPeer, LocalSwarm  # noqa: E402

CONFIGS = ("flat", "nat_hole_punched", "nat_relayed", "nat_upnp")
VOLUNTEERS = 3
KINDS = ("direct", "hole-punched", "relayed")  # of connections, as a peer's status counts them
PUNCH_WAIT_S = 420  # the first try, p2ptrain's after 20 s, then every 150 s (watch.PunchSchedule)
PEER_FLAGS = ("--threads", "1", "--batch-size", "8", "--validate-every", "0", "--checkpoint-every", "1000")


@dataclass
class Result:
    config: str
    s_per_global_step: float
    compute_utilization: float
    global_steps: int
    router_mb: float  # what each volunteer's router forwarded, mean (0 when flat)
    between_homes_share: float  # of it, to or from other homes' routers
    reachability: list[str]
    connections: list[dict[str, int]]  # each volunteer's, at the end (watch.connection_kinds)


def punched(peer: LocalPeer) -> int:
    return int(peer.status().get("connections", {}).get("hole-punched", 0))


def epoch(peer: LocalPeer) -> int:
    return int(peer.status().get("epoch", 0))


def wait(condition, timeout_s: float, what: str, peers: list[LocalPeer]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        dead = [p.name for p in peers if not p.alive()]
        if dead:
            raise RuntimeError(f"{dead} exited before {what}:\n" + "\n".join(p.log()[-2000:] for p in peers))
        time.sleep(1.0)
    raise TimeoutError(f"no {what} within {timeout_s:.0f} s")


def run(config: str, mbit: float, measure_s: float, work: Path) -> Result:
    lab = NatLab()
    try:
        nodes_hosts = [lab.public(f"n{i}") for i in range(3)]
        s = lab.public("s")
        if config == "flat":
            homes, hosts = [], [lab.public(f"v{i}") for i in range(VOLUNTEERS)]
        else:
            kind = "symmetric" if config == "nat_relayed" else "cone"
            homes = [lab.home(f"h{i}", kind=kind, upnp=config == "nat_upnp") for i in range(VOLUNTEERS)]
            hosts = [home.host(f"v{i}") for i, home in enumerate(homes)]
        lab.shape(mbit)
        first = DhtNode(nodes_hosts[0], work, [])
        time.sleep(2.0)
        nodes = [first, *(DhtNode(h, work, [first.maddr]) for h in nodes_hosts[1:])]
        boot = [flag for node in nodes for flag in ("--initial-peers", node.maddr)]
        base = work / config
        with LocalSwarm(base, swarm_flags=DEMO_SWARM_FLAGS, peer_flags=PEER_FLAGS) as swarm:
            seeder = swarm.seed("S", *boot, "--wait-for-peers", str(VOLUNTEERS + 1), prefix=s.prefix)
            invite = swarm.invite(seeder)
            volunteers = [
                swarm.join(f"V{i}", "--invite", invite, *boot, prefix=host.prefix) for i, host in enumerate(hosts)
            ]
            peers = [seeder, *volunteers]
            wait(lambda: all(epoch(p) >= 4 for p in peers), 420, "four global steps on every peer", peers)
            if config == "nat_hole_punched":  # measure once the holes are punched (p2ptrain retries 150 s apart)
                wait(lambda: all(punched(p) >= VOLUNTEERS - 1 for p in volunteers), PUNCH_WAIT_S, "holes", peers)
            start = {p.name: (epoch(p), p.status().get("compute_s", 0.0)) for p in peers}
            counters = [lab.counters(home) for home in homes]
            started = time.monotonic()
            time.sleep(measure_s)
            wall = time.monotonic() - started
            end = {p.name: (epoch(p), p.status().get("compute_s", 0.0)) for p in peers}
            after = [lab.counters(home) for home in homes]
            reach = [p.status().get("reachability", "") for p in volunteers]
            connections = [p.status().get("connections", {}) for p in volunteers]
        steps = min(end[n][0] - start[n][0] for n in end)
        utilization = sum((end[n][1] - start[n][1]) / wall for n in end) / len(end)
        forwarded, between = [], []
        for home, a, b in zip(homes, counters, after, strict=True):
            delta = {ip: b.get(ip, 0) - a.get(ip, 0) for ip in b}
            others = {h.router.ip for h in homes if h is not home}
            forwarded.append(sum(delta.values()))
            between.append(sum(v for ip, v in delta.items() if ip in others))
        total = sum(forwarded)
        return Result(
            config,
            s_per_global_step=wall / steps if steps else float("inf"),
            compute_utilization=utilization,
            global_steps=steps,
            router_mb=total / len(forwarded) / 1e6 if forwarded else 0.0,
            between_homes_share=sum(between) / total if total else 0.0,
            reachability=reach,
            connections=connections,
        )
    finally:
        lab.remove()


def table(report: dict) -> str:
    lines = [
        f"NAT benchmark: S + {VOLUNTEERS} volunteers, gpt2-tiny, fp16 gradients, links {report['link_mbit']} Mbit/s "
        f"each way (tbf), {report['measure_s']:.0f} s measured per configuration",
        "",
        "| configuration | s / global step | vs flat | compute utilization | global steps | router MB per volunteer "
        "| of it between homes |",
        "|---|---|---|---|---|---|---|",
    ]
    flat = report["results"].get("flat", {}).get("s_per_global_step")
    for name, r in report["results"].items():
        ratio = f"{r['s_per_global_step'] / flat:.2f}×" if flat else "—"
        lines.append(
            f"| {name} | {r['s_per_global_step']:.2f} | {ratio} | {r['compute_utilization']:.0%} | "
            f"{r['global_steps']} | {r['router_mb']:.1f} | {r['between_homes_share']:.0%} |"
        )
    lines += ["", "What the volunteers found (their status):", ""]
    for name, r in report["results"].items():
        found = "; ".join(f"{n}× {kind}" for kind, n in sorted(kinds(r["reachability"]).items()))
        held = ", ".join("/".join(str(c.get(k, 0)) for k in KINDS) for c in r["connections"])
        lines.append(f"- {name}: {found}; connections direct/hole-punched/relayed at the end: {held}")
    return "\n".join(lines) + "\n"


def kinds(reachability: list[str]) -> dict[str, int]:
    """The volunteers' status lines, by kind (reachability.Reach.describe's wording)."""
    out: dict[str, int] = {}
    for text in reachability:
        kind = (
            "mapped" if "port mapped" in text else "direct" if text.startswith("reachable directly")
            else "symmetric-nat" if "changes ports" in text else "nat" if text.startswith("behind NAT")
            else text or "unknown"
        )  # fmt: skip
        out[kind] = out.get(kind, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--link-mbit", type=float, default=20.0)
    parser.add_argument("--measure-s", type=float, default=90.0)
    parser.add_argument("--only", nargs="*", choices=CONFIGS)
    parser.add_argument("--out", type=Path, default=Path("bench_nat.json"))
    parser.add_argument("--keep", action="store_true", help="keep the peers' data directories and logs")
    args = parser.parse_args(argv)
    missing = missing_tools(upnp="nat_upnp" in (args.only or CONFIGS))
    if missing:
        print(f"bench_nat: needs {', '.join(missing)} (run scripts/setup-system.sh as root)", file=sys.stderr)
        return 2
    report = {"link_mbit": args.link_mbit, "measure_s": args.measure_s, "results": {}}
    work = tempfile.mkdtemp(prefix="p2ptrain-bench-nat-")
    if args.keep:
        print(f"the peers' data and logs stay in {work}", flush=True)
    try:
        for config in args.only or CONFIGS:
            print(f"[{config}] …", flush=True)
            result = run(config, args.link_mbit, args.measure_s, Path(work))
            report["results"][config] = asdict(result)
            print(
                f"  {result.s_per_global_step:.2f} s/step, utilization {result.compute_utilization:.0%}, "
                f"{result.global_steps} steps, {result.between_homes_share:.0%} between homes",
                flush=True,
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(report))
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
