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
            "views": 1, "vector_bytes": 400_000, "timeout": None, "calibrate": False, "sync_every": 0}  # fmt: skip
    return argparse.Namespace(**{**base, **changes})


def test_a_full_grid_gives_every_peer_the_same_average_at_every_step():
    """64 peers in groups of 4: 16 clusters fill a grid of two digits, so the three levels of each step leave every
    peer with the swarm's mean: the anchors never part."""
    result = sim.simulate(64, options(), sim.EARTH, sim.Model())
    assert result["levels"] == 3 and result["success_rate"] == 1.0
    assert max(result["results_apart_by_round"]) < 1e-9 and max(result["consensus_by_round"]) < 1e-9


def test_churn_and_stale_views_part_the_anchors_and_parameter_rounds_join_them():
    apart = sim.simulate(60, options(churn=0.2, views=3, rounds=20), sim.EARTH, sim.Model())
    assert apart["churned_peers"] == 12
    assert 0.5 < apart["success_rate"] < 1.0  # peers that joined late are alone for a round
    assert apart["consensus_by_round"][-1] > 0.05  # averaging pseudo-gradients never joins anchors again
    synced = sim.simulate(60, options(churn=0.2, views=3, rounds=20, sync_every=5), sim.EARTH, sim.Model())
    assert synced["consensus_by_round"][4] < 0.5 * apart["consensus_by_round"][4]  # the parameter round
    assert synced["consensus_by_round"][-1] < apart["consensus_by_round"][-1]


def test_one_group_for_all_fails_where_the_lab_did():
    unbounded = options(grouping="swarm", group_size=0, rounds=3, churn=0.0, timeout=16.0)  # the bench's timeout
    assert sim.simulate(32, unbounded, sim.LAB, sim.Model())["success_rate"] == 0.0  # measured: 11 %
    assert sim.simulate(16, unbounded, sim.LAB, sim.Model())["success_rate"] == 1.0  # measured: 100 %


def test_random_groups_of_a_bounded_size_part_the_anchors():
    """hivemind's groups of whoever answers: each group applies its own average, so in local mode the anchors part
    at every step, even with no failure."""
    result = sim.simulate(64, options(grouping="swarm", rounds=5), sim.EARTH, sim.Model())
    assert result["success_rate"] == 1.0 and result["consensus_by_round"][-1] > 0.1


def test_a_run_merges_into_the_report_and_draws_its_figure(tmp_path):
    out = tmp_path / "scale.json"
    assert sim.main(["--sizes", "24", "--rounds", "3", "--group-size", "4", "--out", str(out)]) == 0
    figure = tmp_path / "scale-simulated.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure.unlink()
    assert sim.main(["--out", str(out), "--plot-only"]) == 0 and figure.exists()
    with pytest.raises(SystemExit):  # nothing simulated to draw
        sim.main(["--out", str(tmp_path / "empty.json"), "--plot-only"])


def test_groups_whose_members_know_each_other_meet_sooner_than_through_the_dht():
    """The same levels across the earth: a group that meets without the DHT skips a lookup across the swarm at every
    level, so its rounds end sooner and send fewer bytes."""
    known = sim.simulate(128, options(rounds=4), sim.EARTH, sim.Model())
    dht = sim.simulate(128, options(rounds=4, grouping="locality-dht"), sim.EARTH, sim.Model())
    assert known["levels"] == dht["levels"] == 4
    assert known["group_formation_s_median"] < dht["group_formation_s_median"] - 1.0
    assert known["round_s_median"] < dht["round_s_median"]
    assert known["bytes_sent_per_peer_per_round"] < dht["bytes_sent_per_peer_per_round"]
