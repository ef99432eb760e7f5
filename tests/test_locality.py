"""Groups of nearby peers, in a lab with distance: two regions 150 ms apart, peers 5 ms apart inside each.

Real peers (``scripts/bench_regions.py``'s run of ``scripts/bench_scale.py``'s worker: a hivemind DHT node,
p2ptrain's local-mode averager on a 400 kB vector whose values are 100 + the peer's index, and the prober of
``swarm/proximity.py``) run in the network namespaces of ``scripts/netlab.py``; the distance is real
(``scripts/wire.py`` holds every frame), and the peers learn it only by probing each other. With a group size of 2
among 4 peers, the grid has two levels, both run in each round (``level_rounds``): first each peer averages with the
other peer of its own region, then with one peer of the other region, and after the round every peer must hold the
exact mean of all four values.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

import pytest
from conftest import netns

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import bench_regions  # noqa: E402
from netlab import NatLab, missing_tools  # noqa: E402

from p2ptrain.local_swarm import LocalSwarm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs {', '.join(missing_tools())} for a network lab"),
]
ROUNDS, PERIOD = 2, 12.0
STEPS = 16


def test_groups_form_inside_regions_first_and_the_swarm_reaches_one_mean(tmp_path):
    before = netns()
    options = argparse.Namespace(peers=4, group_size=2, rounds=ROUNDS, period=PERIOD, matchmaking=2.0,
                                 between_ms=150.0, inside_ms=5.0, mbit=0)  # fmt: skip
    result = bench_regions.run("locality", options, tmp_path)
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in sorted(tmp_path.glob("peer-*.log")))
    assert result["exit_codes"] == [0, 0, 0, 0], logs
    rows = result["rows"]
    region = {row["me"]: "eu" if row["peer"] % 2 == 0 else "asia" for row in rows}
    assert len(region) == 4
    by_round = {r: [row for row in rows if row["round"] == r] for r in range(ROUNDS)}
    for r, peers in by_round.items():
        assert len(peers) == 4 and all(row["levels"] == 2 for row in peers), peers
        for row in peers:  # the groups every peer derived: inside its region first, across at the next level
            inside, across = ([region[p] for p in members] for members in row["expected"])
            assert len(inside) == len(across) == 2 and len(set(inside)) == 1 and len(set(across)) == 2, (r, row)
            for level, others, _ in row["done"]:  # the groups that formed are the ones derived
                assert sorted([row["me"], *others]) == row["expected"][level], (r, row)
    done = [r for r in range(ROUNDS) if all(row["ok"] for row in by_round[r])]
    assert done, f"no round completed every level on all peers: {rows}"
    mean = 100 + statistics.fmean(range(4))  # the peers' values are 100 + their index
    for r in done:  # one level inside regions and one across: everybody at one value, the mean
        values = {row["peer"]: row["value"] for row in by_round[r]}
        assert max(values.values()) - min(values.values()) < 1e-4, (r, values, rows)
        if all(row["ok"] for row in rows if row["round"] < r):  # (an earlier round that failed on some members
            assert abs(values[0] - mean) < 1e-4, (r, values, rows)  # only may have moved the sum)
    assert netns() == before


@pytest.mark.extended  # 2-2.5 min: the peers must probe each other (every 30 s) before their groups settle
def test_a_grouped_swarm_of_real_peers_averages_inside_its_regions_first(tmp_path):
    """``seed --group-size 2`` and three joins (the default host, a random port), two in each region: once the peers
    have measured each other, every global step's first level pairs the two peers of a region and its second level
    crosses, and the swarm trains with rounds that cover all four."""
    before = netns()
    lab = NatLab()
    try:
        eu = lab.region("eu", rtt_ms=75.0, inside_ms=5.0)
        asia = lab.region("asia", rtt_ms=75.0, inside_ms=5.0)
        hosts = [(eu if i % 2 == 0 else asia).host(f"h{i}") for i in range(4)]
        swarm_flags = (
            *("--target-batch-size", "64", "--matchmaking-time", "3", "--averaging-timeout", "30"),
            *("--averaging", "local", "--compression", "fp16", "--group-size", "2"),
        )
        peer_flags = ("--threads", "1", "--batch-size", "8", "--validate-every", "0", "--max-steps", str(STEPS))
        with LocalSwarm(tmp_path, swarm_flags=swarm_flags, peer_flags=peer_flags) as swarm:
            seeder = swarm.seed("p0", "--wait-for-peers", "4", prefix=hosts[0].prefix)
            invite = swarm.invite(seeder)
            peers = [seeder, *(swarm.join(f"p{i}", "--invite", invite, prefix=hosts[i].prefix) for i in (1, 2, 3))]
            for peer in peers:
                peer.proc.wait(420)
            logs = {peer.name: peer.log() for peer in peers}
            assert [peer.proc.returncode for peer in peers] == [0, 0, 0, 0], {n: t[-2000:] for n, t in logs.items()}
    finally:
        lab.remove()
    region = {re.search(r"Peer (\w+), data in", text)[1]: int(name[1:]) % 2 for name, text in logs.items()}
    for name, text in logs.items():
        levels = [
            (int(step), int(level), members.split())
            for step, level, members in re.findall(
                r"Global step (\d+): level (\d) of 2 averaged in a group of 2 \(([\w ]+)\)", text
            )
        ]
        late = [(level, members) for step, level, members in levels if step >= STEPS // 2]  # probes have settled
        assert late, (name, levels)
        for level, members in late:
            assert len({region[p] for p in members}) == (1 if level == 0 else 2), (name, level, members)
        rounds = [int(n) for n in re.findall(r"Round \d+: (\d) peers", text)]
        assert sum(n == 4 for n in rounds) >= len(rounds) // 2, (name, rounds)
    assert netns() == before
