"""The swarm simulation (scripts/simulate_swarm.py) runs the real grouping code: small runs, checked by their
invariants (bounded groups, the mean kept, consensus reached), not by numbers copied from a run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import simulate_swarm as sim  # noqa: E402


def options(**changes) -> argparse.Namespace:
    base = {"rounds": 9, "period": 20.0, "group_size": 4, "grouping": "locality", "churn": 0.0, "churn_after": 2,
            "views": 1, "vector_bytes": 400_000, "timeout": None, "calibrate": False}  # fmt: skip
    return argparse.Namespace(**{**base, **changes})


def test_groups_of_nearby_peers_reach_consensus_without_churn():
    result = sim.simulate(60, options(), sim.EARTH, sim.Model())
    assert result["levels"] == 3  # 60 peers, groups of 4: 15 clusters, two digits in base 4
    assert result["success_rate"] == 1.0 and max(result["group_sizes"]) <= 4
    assert result["consensus_by_round"][0] < 0.6  # the first level averages inside clusters only
    assert result["consensus_by_round"][-1] < 1e-3  # three passes: one model


def test_churn_and_stale_views_cost_rounds_but_not_consensus():
    result = sim.simulate(60, options(churn=0.2, views=3), sim.EARTH, sim.Model())
    assert result["churned_peers"] == 12
    assert 0.5 < result["success_rate"] < 1.0  # peers that joined late are alone for a pass
    assert result["consensus_by_round"][-1] < 0.05


def test_one_group_for_all_fails_where_the_lab_did():
    unbounded = options(grouping="swarm", group_size=0, rounds=3, churn=0.0)
    assert sim.simulate(32, unbounded, sim.LAB, sim.Model())["success_rate"] == 0.0  # measured: 11 %
    assert sim.simulate(16, unbounded, sim.LAB, sim.Model())["success_rate"] == 1.0  # measured: 100 %


def test_a_run_merges_into_the_report_and_draws_its_figure(tmp_path):
    out = tmp_path / "scale.json"
    assert sim.main(["--sizes", "24", "--rounds", "3", "--group-size", "4", "--out", str(out)]) == 0
    figure = tmp_path / "scale-simulated.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure.unlink()
    assert sim.main(["--out", str(out), "--plot-only"]) == 0 and figure.exists()
    with pytest.raises(SystemExit):  # nothing simulated to draw
        sim.main(["--out", str(tmp_path / "empty.json"), "--plot-only"])
