"""The local dashboard (``p2ptrain dashboard``): ``/metrics`` as Prometheus parses it, the page and its data from a
real server, and the command on a free port that stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from hivemind.averaging.allreduce import AllreduceException
from prometheus_client.parser import text_string_to_metric_families

from p2ptrain.dashboard.metrics import metrics_text
from p2ptrain.dashboard.server import serve
from p2ptrain.energy.ledger import Ledger, ledger_path, save_ledger
from p2ptrain.fileio import atomic_write_json
from p2ptrain.train.round_log import RoundLog, failure_reason

STATUS = {
    "run_id": "gpt2-tiny-abc123",
    "model": "gpt2-tiny",
    "peer_id": 'Qm"odd\\id',  # escaped in labels
    "state": "training",
    "epoch": 12,
    "local_steps": 40,
    "samples": 320,
    "samples_per_s": 37.5,
    "loss": 2.91,
    "val_loss": None,  # not measured yet: left out, not 0
    "peers": 4,
    "paused_reasons": [],
    "connections": {"direct": 2, "hole-punched": 1, "relayed": 0},
    "updated_at": time.time(),
}


def ledger() -> Ledger:
    return Ledger(run_id=STATUS["run_id"], peer_id="QmPeer", tokens=20480, cpu_j=3600.0, ram_j=360.0, g_co2e=0.52)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_metrics_parse_as_prometheus_does():
    found = families(metrics_text(STATUS, ledger()))
    value = lambda name, **labels: next(  # noqa: E731
        s.value for s in found[name].samples if all(s.labels.get(k) == v for k, v in labels.items())
    )
    assert value("p2ptrain_global_step") == 12 and value("p2ptrain_samples_per_second") == 37.5
    assert value("p2ptrain_samples") == 320 and found["p2ptrain_samples"].type == "counter"  # the parser's name
    assert value("p2ptrain_connections", kind="hole-punched") == 1 and value("p2ptrain_paused") == 0
    assert value("p2ptrain_energy_joules", part="cpu") == 3600 and value("p2ptrain_emissions_grams") == 0.52
    assert value("p2ptrain_info", peer_id='Qm"odd\\id', run_id="gpt2-tiny-abc123") == 1
    assert value("p2ptrain_state", state="training") == 1
    assert "p2ptrain_validation_loss" not in found  # None is no number
    paused = families(metrics_text({**STATUS, "paused_reasons": ["a game is running"]}, None))
    assert next(iter(paused["p2ptrain_paused"].samples)).value == 1 and "p2ptrain_energy_joules" not in paused


def test_rounds_are_counted_by_outcome_and_reason_into_the_metrics():
    log = RoundLog(keep=3)
    log.succeeded(1, 3, "fp16", 1000.0, 0.5)
    log.succeeded(2, 2, "powersgd", None, None)  # a payload it cannot tell is not counted as 0 bytes moved
    log.failed_with(3, AllreduceException("1,000 of 2,000 values came back from nobody: the round is incomplete"))
    log.failed_with(4, asyncio.TimeoutError())
    log.failed_with(5, "timeout: the round did not end within averaging_timeout")
    status = log.as_status()
    assert status["rounds"] == {"ok": 2, "failed": {"incomplete": 1, "timeout": 2}}
    assert [r["step"] for r in status["last_rounds"]] == [3, 4, 5] and status["bytes_sent"] == 1000.0
    assert failure_reason(AllreduceException("member Qm… is not admitted to this private swarm")) == "not admitted"
    assert failure_reason(ValueError("something else")) == "error"
    found = families(metrics_text({**STATUS, **status}, None))
    rounds = {(s.labels["outcome"], s.labels["reason"]): s.value for s in found["p2ptrain_rounds"].samples}
    assert rounds == {("ok", ""): 2, ("failed", "incomplete"): 1, ("failed", "timeout"): 2}
    moved = {s.labels["direction"]: s.value for s in found["p2ptrain_round_bytes"].samples}
    assert moved == {"sent": 1000.0, "received": 1000.0}


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            return reply.status, reply.headers["Content-Type"], reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


@pytest.fixture
def data_dir(tmp_path):
    atomic_write_json(tmp_path / "status.json", STATUS)
    save_ledger(ledger_path(tmp_path, STATUS["run_id"]), ledger())
    return tmp_path


def test_the_server_serves_the_page_its_data_and_metrics(data_dir):
    server, board = serve(data_dir, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        board.sample()
        board.sample()  # nothing new: one point
        code, kind, page = get(base + "/")
        assert code == 200 and kind.startswith("text/html") and b"/static/uPlot.iife.min.js" in page
        for asset in ("uPlot.iife.min.js", "dashboard.js", "uPlot.min.css"):
            assert get(f"{base}/static/{asset}")[0] == 200  # vendored: nothing fetched from elsewhere
        code, kind, body = get(base + "/api/status")
        data = json.loads(body)
        assert code == 200 and data["status"]["epoch"] == 12 and len(data["history"]) == 1
        assert data["energy"]["g_co2e"] == 0.52 and data["history"][0][1:3] == [12.0, 2.91]
        code, kind, body = get(base + "/metrics")
        assert code == 200 and kind.startswith("text/plain; version=0.0.4")
        assert "p2ptrain_global_step" in families(body.decode())
        assert get(base + "/static/../status.json")[0] == 404 and get(base + "/nope")[0] == 404
        request = urllib.request.Request(base + "/api/status", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError, match="501"):  # read-only: GET only
            urllib.request.urlopen(request, timeout=5)
    finally:
        server.shutdown()
        server.server_close()


def test_the_command_serves_on_loopback_and_stops_on_sigterm(data_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2ptrain", "dashboard", "--port", "0", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()  # the first line says where
        assert line.startswith("Dashboard of ") and "http://127.0.0.1:" in line, line
        url = line.split()[3]
        assert get(url + "metrics")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()
