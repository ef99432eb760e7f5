"""The codec benchmark end to end on a short run: its report, its table, and merging runs of the same settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import bench_codecs  # noqa: E402


def test_a_short_run_reports_each_variant_per_seed_and_runs_merge(tmp_path):
    short = ["--rounds", "1", "--local-steps", "1", "--seeds", "3"]
    bench_codecs.main([*short, "--only", "none", "int2+ef", "--out", str(tmp_path / "a.json")])
    report = json.loads((tmp_path / "a.json").read_text())
    assert set(report["results"]) == {"none", "int2+ef"} and set(report["results"]["none"]) == {"3"}
    none, int2 = report["results"]["none"]["3"], report["results"]["int2+ef"]["3"]
    assert none["average_error"] == 0 and 0.05 < int2["average_error"] < 0.8  # 2-bit rounding of the average
    assert int2["fp32_over_bytes"] == 16 and 0 < int2["final_loss"] < 10
    assert "| int2+ef | 0.250 | 16× |" in (tmp_path / "a.md").read_text()

    bench_codecs.main([*short, "--only", "int8", "--out", str(tmp_path / "b.json")])
    runs = [str(tmp_path / name) for name in ("a.json", "b.json")]
    bench_codecs.main(["--merge", *runs, "--out", str(tmp_path / "c.json")])
    assert set(json.loads((tmp_path / "c.json").read_text())["results"]) == {"none", "int2+ef", "int8"}
    (tmp_path / "d.json").write_text(json.dumps({**report, "rounds": 3}))  # a run of other settings
    with pytest.raises(SystemExit, match="differ in their settings"):
        bench_codecs.main(["--merge", runs[0], str(tmp_path / "d.json"), "--out", str(tmp_path / "e.json")])
