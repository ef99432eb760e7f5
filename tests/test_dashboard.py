"""The local dashboard (``p2ptrain dashboard``): ``/metrics`` as Prometheus parses it, the page and its data from a
real server, and the command on a free port that stops on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

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


def test_the_swarm_health_rows_come_from_each_kind_of_record():
    from hivemind.optim.progress_tracker import LocalTrainingProgress
    from hivemind.p2p import PeerID

    from p2ptrain.dashboard.swarm_health import health
    from p2ptrain.swarm.proximity import Coord, Near

    a, b, c = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmPeerB", "QmPeerC"
    now = time.time()
    progress = {
        a: LocalTrainingProgress(peer_id=PeerID.from_base58(a).to_bytes(), epoch=7, samples_accumulated=3,
                                 samples_per_second=12.5, time=now - 4, client_mode=False),
        b: LocalTrainingProgress(peer_id=b"\x00\x01b", epoch=6, samples_accumulated=0, samples_per_second=2.5,
                                 time=now - 1, client_mode=True),
        c: LocalTrainingProgress(peer_id=b"\x00\x01c", epoch=7, samples_accumulated=0,
                                 samples_per_second=float("inf"), time=float("-inf"), client_mode=True),
    }  # fmt: skip
    near = {a: Near(Coord(1.0, 2.0, 0.0, 0.5), {b: (3.5, None), c: (40.0, 10.0)})}
    losses = {a: (5, 3.5, 3.4), b: (5, 3.7, None), c: (0, 5.6, None)}
    found = health([a, b], [f"/ip4/1.2.3.4/tcp/31337/p2p/{a}"], progress, [ledger_of(a), ledger_of(c)], near, now,
                   losses)  # fmt: skip
    rows = {row["peer"]: row for row in found["peers"]}
    assert list(rows) == sorted([a, b, c])
    assert rows[a]["reachability"] == "direct (relays for others)" and rows[b]["reachability"] == "client (behind NAT)"
    full = LocalTrainingProgress(peer_id=b"\x00\x01c", epoch=7, samples_accumulated=0, samples_per_second=1.0,
                                 time=now, client_mode=False)  # fmt: skip
    assert health([], [], {c: full}, [], {}, now)["peers"][0]["reachability"] == "full peer (no public address)"
    assert rows[a]["global_step"] == 7 and round(rows[a]["seen_s_ago"]) == 4 and rows[a]["nearest_ms"] == 3.5
    assert rows[c]["tokens"] == 20480 and not rows[c]["member"]  # a ledger, no membership: it left
    assert (rows[a]["held_out_loss"], rows[a]["loss_step"], rows[b]["held_out_loss"]) == (3.5, 5, 3.7)
    assert rows[c]["samples_per_s"] is None and rows[c]["seen_s_ago"] is None  # infinities: JSON carries none
    json.loads(json.dumps(found), parse_constant=lambda c: pytest.fail(f"{c} in the page's JSON"))
    assert found["totals"] == {"members": 2, "training": 3, "reachable_directly": 1, "global_step": 7,
                               "samples_per_s": 15.0, "tokens": 40960, "device_hours": 0.0,
                               "kwh": pytest.approx(2 * ledger().energy_kwh),
                               "g_co2e": pytest.approx(1.04), "held_out_loss": 3.7}  # fmt: skip  # the median


def ledger_of(peer: str) -> Ledger:
    return Ledger(run_id="run", peer_id=peer, tokens=20480, cpu_j=3600.0, ram_j=360.0, g_co2e=0.52)


def check_swarm_page(tmp_path: Path, peers: list, viewer) -> None:
    """``dashboard --swarm`` beside a training swarm of ``peers`` (``LocalPeer``s; test_swarm's, which this check
    shares rather than start a swarm of its own), started from ``viewer``'s data directory (it finds the swarm
    there): it shows every peer, with their global steps from their signed progress records and their published
    ledgers and losses, in a real browser too (``viewer``'s page: a loss curve that grows; no console errors), and
    stops on SIGTERM leaving no process; killed, it takes its DHT node and libp2p daemon with it."""
    import psutil
    from browser import opened, screenshot

    by_id = {p.status()["peer_id"]: p for p in peers}
    ids = set(by_id)
    said = tmp_path / "dashboard.log"  # a file: a pipe nobody reads fills up with the daemon's output
    with said.open("w") as out:
        command = ["dashboard", "--swarm", "--port", "0", "--data-dir", str(viewer.data_dir)]
        proc = subprocess.Popen([sys.executable, "-m", "p2ptrain", *command], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "Swarm " not in said.read_text() and proc.poll() is None:
            time.sleep(0.5)
        line = next((x for x in said.read_text().splitlines() if x.startswith("Swarm ")), "")
        assert "http://127.0.0.1:" in line, said.read_text()[-3000:]
        url = line.split()[2]
        rows, deadline = {}, time.monotonic() + 90
        while time.monotonic() < deadline:
            data = json.loads(get(url + "api/swarm")[2])
            rows = {row["peer"]: row for row in data["peers"]}
            if ids <= set(rows) and all(rows[p]["global_step"] and rows[p]["tokens"] is not None
                                        and rows[p]["held_out_loss"] is not None for p in ids):  # fmt: skip
                break
            time.sleep(2)
        assert ids <= set(rows) and data["totals"]["members"] == len(peers), (data, said.read_text()[-3000:])
        for peer in ids:
            assert rows[peer]["global_step"] >= 2 and rows[peer]["samples_per_s"] > 0, rows[peer]
            assert rows[peer]["tokens"] is not None and rows[peer]["member"], rows[peer]
            # the loss the peer measured and published, whatever training made of it: the demo's learning rate (5×
            # the default) spikes the loss for a step or two now and then, a lone peer's too (10.5 seen here)
            measured = [loss for _, loss in by_id[peer].status()["val_history"]]
            assert any(abs(rows[peer]["held_out_loss"] - loss) < 1e-6 for loss in measured), (rows[peer], measured)
            assert rows[peer]["loss_step"] >= 0, rows[peer]
        assert data["totals"]["training"] == len(peers) and data["run_id"] == peers[0].status()["run_id"]
        status, kind, page = get(url)
        assert status == 200 and kind.startswith("text/html") and b"/static/swarm.js" in page
        assert b"/static/dashboard.js" in get(url + "index.html")[2]  # this peer's own page moved there
        with opened(url) as page:  # the swarm's page, in a browser: a row per peer
            page.wait_for_function(
                "ids => ids.every(id => document.getElementById('peers').textContent.includes(id.slice(-6)))",
                arg=sorted(ids), timeout=30_000,
            )  # fmt: skip
            page.wait_for_function("() => charts['chart-loss'] !== undefined", timeout=30_000)  # 2 readings
            screenshot(page, "dashboard-swarm.png", tmp_path)
            assert page.errors == []
        with opened(url + "index.html") as page:  # the viewer's own page: its loss curve grows while they train
            points = "charts['chart-loss'] ? charts['chart-loss'].data[0].length : 0"  # functions: the page's CSP
            page.wait_for_function(f"() => ({points}) >= 2", timeout=30_000)  # forbids eval of a bare string
            before = page.evaluate(f"() => {points}")
            page.wait_for_function(f"() => ({points}) > {before}", timeout=30_000)
            assert page.text_content("#state") == "training" and page.text_content("#peers") == str(len(peers))
            rounds = [r for r in viewer.status()["last_rounds"] if r["ok"]]  # fp16, hivemind's own all-reduce: timed
            assert rounds and all(r["seconds"] > 0 and r["codec"] == "fp16" for r in rounds), rounds
            screenshot(page, "dashboard-peer.png", tmp_path)
            assert page.errors == []
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE], children
        # killed outright, it takes its DHT node and libp2p daemon with it too
        with said.open("a") as out:
            proc = subprocess.Popen([sys.executable, "-m", "p2ptrain", *command], stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not _has_daemon(proc.pid):
            time.sleep(0.5)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert _has_daemon(proc.pid), said.read_text()[-2000:]
        proc.kill()
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not [c for c in alive if c.status() != psutil.STATUS_ZOMBIE], alive
    finally:
        proc.kill()
        proc.wait()


def _has_daemon(pid: int) -> bool:
    """Whether the process ``pid`` has a libp2p daemon among its descendants yet."""
    import psutil

    try:
        return any("p2pd" in child.name() for child in psutil.Process(pid).children(recursive=True))
    except psutil.Error:
        return False


ROUNDS = {
    "rounds": {"ok": 5, "failed": {"timeout": 2, "incomplete": 1}}, "bytes_sent": 2.5e6, "bytes_received": 2.5e6,
    "last_rounds": [{"at": 990, "step": 3, "ok": True, "peers": 3, "codec": "<b>fp16</b>", "bytes": 123456,
                     "seconds": 0.42}, {"at": 995, "step": 4, "ok": False, "reason": "timeout", "detail": "x"}],
}  # fmt: skip
ROW = {"peer": "<b>QmYEBvEmYFfk1NT7Gsr6</b>", "member": True, "reachability": "direct (relays for others)",
       "global_step": 10, "samples_per_s": 3.5, "seen_s_ago": 0.3, "tokens": 26112, "device_hours": 0.0025,
       "kwh": 3.3e-05, "g_co2e": 0.0158, "country": "", "nearest_ms": 0.72, "neighbours": 1, "held_out_loss": 3.25,
       "loss_step": 10}  # fmt: skip


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the pages' scripts")
@pytest.mark.parametrize(
    ("page", "data", "shown"),
    [
        ("dashboard.js", {"now": 1000, "status": {**STATUS, "updated_at": 999, **ROUNDS}, "history": [[990, 3, 5.0,
         None, 10, 0.1, 2], [992, 4, 4.9, 5.1, 11, 0.1, 2]]},
         {"rounds": "5 / 3", "bytes": "2.5 MB / 2.5 MB", "epoch": "12"}),
        ("swarm.js", {"now": 1000, "read_at": 995, "run_id": "r", "peers": [ROW], "totals": {"members": 2,
         "training": 1, "tokens": 34304, "held_out_loss": 3.25}, "history": [[985, 1, 3.5, 1e-5, 0.1, 3.3],
         [995, 1, 3.5, 1e-5, 0.1, 3.25]]},
         {"members": "2", "tokens": "34.3 k", "loss": "3.250"}),
    ],
)  # fmt: skip
def test_the_pages_fill_in_their_data_as_text(tmp_path, page, data, shown):
    """The page's script under node with a stubbed DOM: the numbers, the tables' rows (markup shown as text), the
    charts."""
    reply = tmp_path / "reply.json"
    reply.write_text(json.dumps(data))
    stub = Path(__file__).with_name("page_stub.js")
    out = subprocess.run(["node", str(stub), page, str(reply), *shown], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    for element, text in shown.items():
        assert f"{element} = {json.dumps(text)}" in lines, out.stdout
    rows = [line for line in lines if line.startswith(("rounds-table ", "peers "))]
    assert any("<b>" in row for row in rows) and "charts " in lines[-1] and lines[-1] != "charts 0", out.stdout


def post(url: str, token: str | None) -> tuple[int, dict]:
    headers = {} if token is None else {"X-P2PTrain-Token": token}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="POST", headers=headers), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        return e.code, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


def test_pause_and_resume_reach_the_daemon_only_with_the_token(tmp_path, capsys):
    """``--control``: the buttons' requests go to the volunteer daemon's control socket (a real one here, answering
    as the daemon does) only with the token; without a daemon the page is told why; without --control, read-only."""
    from p2ptrain.cli.app import main
    from p2ptrain.volunteer.control_socket import ControlServer

    asked = []
    daemon = ControlServer(tmp_path, lambda request: asked.append(request) or {"ok": True, "state": "paused"})
    server, _ = serve(tmp_path, "127.0.0.1", 0, control_token="s3cret")
    url = f"http://127.0.0.1:{server.server_address[1]}/api/"
    try:
        assert post(url + "pause", None)[0] == 403 and post(url + "pause", "guess")[0] == 403 and asked == []
        assert post(url + "pause", "s3cret") == (200, {"ok": True, "state": "paused"})
        assert post(url + "resume", "s3cret")[0] == 200
        assert [(r["command"], r["reason"]) for r in asked] == [
            ("pause", "from the dashboard"),
            ("resume", "from the dashboard"),
        ]
        assert post(url + "leave", "s3cret")[0] == 501  # nothing else
        daemon.close()
        code, body = post(url + "pause", "s3cret")
        assert code == 409 and "no volunteer daemon runs" in body["error"]
    finally:
        daemon.close()
        server.shutdown()
        server.server_close()
    read_only, _ = serve(tmp_path, "127.0.0.1", 0)
    try:
        assert post(f"http://127.0.0.1:{read_only.server_address[1]}/api/pause", "s3cret")[0] == 501
    finally:
        read_only.shutdown()
        read_only.server_close()
    code = main(["dashboard", "--control", "--dashboard-host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert code == 2 and "--control works on loopback only" in capsys.readouterr().err
