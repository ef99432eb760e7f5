"""Dishonest swarm members against robust aggregation: the attack harness (scripts/bench_attacks.py) on real
averagers, shortened. The full table (six attacks, robust and plain mean side by side) is ``-m extended`` and
``bench/attacks.md``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from bench_attacks import ATTACKS, BAR, BASELINE, main, train  # noqa: E402

pytestmark = pytest.mark.slow


def run_harness(tmp_path: Path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "attacks.json"
    code = main([*args, "--out", str(out)])
    return code, json.loads(out.read_text())


def check_report(report: dict, attacks: list[str], rules: list[str]) -> None:
    honest = report["honest_final_loss"]
    assert 0 < honest < 4.0  # it trained: a fresh gpt2-tiny is at ln(320) ≈ 5.8
    assert set(report["attacks"]) == set(attacks)
    for name, result in report["attacks"].items():
        if "centered_clip" in rules:
            assert result["robust_final_loss"] <= honest * (1 + BAR), name
        if BASELINE in rules:  # hivemind's plain mean: a loss, or null where its parameters became NaN
            assert result["mean_final_loss"] is None or result["mean_final_loss"] > 0


def test_one_liar_in_four_is_contained_by_the_default_rule(tmp_path):
    """The attack that passes every check, a small consistent shift, is bounded by CenteredClip. (The scaled one,
    refused by the norm check, is the next test's, with two liars.)"""
    attacks = ["little_is_enough"]
    code, report = run_harness(
        tmp_path,
        "--steps",
        "25",
        "--attacks",
        ",".join(attacks),
        "--rules",
        "centered_clip",
        "--honest-rules",
        "hivemind",
    )
    assert code == 0
    check_report(report, attacks, ["centered_clip"])
    assert (tmp_path / "attacks.md").read_text().startswith("# Attack harness: 4 peers, 1 Byzantine, 25 global steps")
    assert report["reducer_cost"]["ms_per_part"]["centered_clip"] > 0


def test_two_colluding_liars_in_five_do_not_stop_training():
    """Both send the same ×1000 vector. A fresh model is at 5.8; 4 honest peers reach about 3.2 in 25 steps."""
    attacked = train(5, 2, "scaled", "centered_clip", 25)
    assert attacked["final_loss"] is not None and attacked["final_loss"] < 3.5, attacked


@pytest.mark.extended
def test_every_attack_side_by_side(tmp_path):
    code, report = run_harness(tmp_path)
    check_report(report, list(ATTACKS), ["centered_clip", "mean", BASELINE])
    assert report["attacks"]["nan"]["mean_final_loss"] is None  # the damage the issue asks the table to show
    assert code == 0
