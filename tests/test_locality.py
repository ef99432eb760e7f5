"""Groups of nearby peers, in a lab with distance: two regions 150 ms apart, peers 5 ms apart inside each.

Real peers (``scripts/bench_regions.py``'s run of ``scripts/bench_scale.py``'s worker: a hivemind DHT node,
p2ptrain's averager on a 400 kB vector whose values are the peer's index, and the prober of ``swarm/proximity.py``)
run in the network namespaces of ``scripts/netlab.py``; the distance is real (``scripts/wire.py`` holds every
frame), and the peers learn it only by probing each other. With a group size of 2 among 4 peers, the grid has two
levels: at even rounds each peer must average with the other peer of its own region, at odd rounds with one peer of
the other region, and after one round of each every peer must hold the exact mean of all four values.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pytest
from conftest import netns

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import bench_regions  # noqa: E402
from netlab import missing_tools  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs {', '.join(missing_tools())} for a network lab"),
]
ROUNDS, PERIOD = 3, 7.0


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
        assert len(peers) == 4 and all(row["level"] == r % 2 for row in peers), peers
        for row in peers:  # the groups every peer derived: inside its region first, across at the next level
            regions = [region[p] for p in row["expected"]]
            assert len(row["expected"]) == 2 and len(set(regions)) == (1 if r % 2 == 0 else 2), (r, row)
    done = [r for r in range(ROUNDS) if all(row["ok"] for row in by_round[r])]
    for r in done:  # the groups that formed are the ones derived
        assert all(row["members"] == row["expected"] for row in by_round[r]), by_round[r]
    pairs = [r for r in range(1, ROUNDS) if r - 1 in done and r in done]
    assert pairs, f"no two consecutive rounds completed on all peers: {rows}"
    mean = statistics.fmean(range(4))
    for r in pairs:  # one round inside regions and one across: everybody at the mean
        assert all(abs(row["value"] - mean) < 1e-4 for row in by_round[r]), by_round[r]
    assert netns() == before
