"""The WAN benchmark's smoke mode: shaped namespaces, one config, the three outputs, nothing left behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from bench_wan import namespaces_available  # noqa: E402
from conftest import netns  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not namespaces_available(), reason="needs root and `ip netns` to shape links"),
]
SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_wan.py"


def test_smoke_run_writes_its_figures_and_cleans_up(tmp_path):
    out = tmp_path / "wan.json"
    run = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        stdout, stderr = (text.decode(errors="replace") for text in run.communicate(timeout=600))
    finally:
        run.kill()
    assert run.returncode == 0, stdout[-3000:] + stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["shaped"] is True and report["link_mbit"] > 0
    for name in ("p2ptrain_adaptive",):
        config = report["configs"][name]
        keys = ("time_to_target_s", "compute_utilization", "final_val_loss_equal_tokens", "bytes_per_peer_per_step")
        assert all(key in config for key in keys)
        assert 0 < config["compute_utilization"] <= 1
        assert config["bytes_per_peer_per_step"] > 0  # measured on the shaped interfaces
        assert config["final_val_loss_equal_tokens"] < 5.0  # it trained (random init: 5.75)
    assert report["configs"]["p2ptrain_adaptive"]["rounds"]  # every round logged with its codec
    assert "| p2ptrain_adaptive |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    assert netns(run.pid % 100000) == set()  # every namespace it made (named after its pid) is gone
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if "p2ptrain-bench-" in " ".join(p.info["cmdline"] or [])]
    assert not leftovers
