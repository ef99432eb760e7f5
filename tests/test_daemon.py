"""The volunteer daemon: its config file, its control endpoint, and a real daemon through a simulated game."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from p2ptrain.errors import ConfigError, P2PTrainError
from p2ptrain.fileio import read_json
from p2ptrain.volunteer.config import build_config, load_config, set_value
from p2ptrain.volunteer.control_socket import ControlServer, DaemonNotRunning, request

# -- the config file ---------------------------------------------------------------------------------


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"HOME": str(tmp_path), "P2PTRAIN_CONFIG": str(tmp_path / "config.toml"), **extra}


def test_no_file_means_safe_defaults(tmp_path):
    config = load_config(env_for(tmp_path))
    assert config.swarm.model == "gpt2-small" and config.idle.pause_on_gpu_process and config.idle.pause_on_battery
    assert config.idle.max_gpu_memory_fraction == 0.9 and config.idle.max_gpu_temperature_c == 83


def test_set_and_unset_round_trip_typed_values_into_a_private_file(tmp_path):
    env = env_for(tmp_path)
    set_value(env, "idle.quiet_period_s", "120")
    set_value(env, "idle.schedule", "01:00-08:00, 12:00-13:00")
    set_value(env, "idle.pause_on_battery", "no")
    set_value(env, "peer.batch_size", "4")
    config = load_config(env)
    assert config.idle.quiet_period_s == 120.0 and config.idle.schedule == ("01:00-08:00", "12:00-13:00")
    assert config.idle.pause_on_battery is False and config.peer == {"batch_size": 4}
    assert stat.S_IMODE((tmp_path / "config.toml").stat().st_mode) == 0o600
    set_value(env, "idle.schedule", None)
    assert load_config(env).idle.schedule == ()


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("idle.quiet_perod_s", "1", "unknown setting 'idle.quiet_perod_s'"),
        ("idle.quiet_period_s", "soon", "not a valid float"),
        ("idle.max_gpu_memory_fraction", "1.5", r"max_gpu_memory_fraction must be in \(0, 1\]"),
        ("idle.schedule", "1am-8am", "is not a window"),
        ("peer.batch_size", "0", "batch-size must be ≥ 1"),
    ],
)
def test_a_bad_setting_is_refused_before_anything_is_written(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        set_value(env_for(tmp_path), key, value)
    assert not (tmp_path / "config.toml").exists()


def test_a_hand_edited_file_with_a_typo_names_it(tmp_path):
    (tmp_path / "config.toml").write_text('[idle]\nquiet_period = 5\n[swarm]\nmodel = "gpt2-tiny"\n')
    with pytest.raises(ConfigError, match="unknown setting idle.quiet_period"):
        load_config(env_for(tmp_path))
    with pytest.raises(ConfigError, match="is not a float"):
        build_config({"idle": {"quiet_period_s": "5"}})


def test_peer_settings_come_from_the_file_then_the_environment_then_flags(tmp_path):
    config = build_config({"peer": {"batch_size": 4, "port": 4000}, "idle": {"cpu_threads": 2}})
    settings = config.peer_settings({"port": 5000}, {"HOME": str(tmp_path), "P2PTRAIN_BATCH_SIZE": "6"})
    assert (settings.batch_size, settings.port, settings.torch_threads) == (6, 5000, 2)
    assert settings.gpu_memory_fraction == 0.9  # the [idle] cap reaches the peer


# -- the control endpoint ----------------------------------------------------------------------------


def test_control_endpoint_round_trip_and_errors(tmp_path):
    data_dir = tmp_path / "d"
    data_dir.mkdir(mode=0o700)
    with pytest.raises(DaemonNotRunning, match="p2ptrain daemon start"):
        request(data_dir, "status")
    server = ControlServer(data_dir, lambda req: {"ok": True, "echo": req})
    try:
        assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
        assert request(data_dir, "pause", reason="seat 3 taken")["echo"] == {
            "command": "pause",
            "reason": "seat 3 taken",
        }
        with pytest.raises(P2PTrainError, match="unknown command"):
            request(data_dir, "format-disk")
        with socket.socket(socket.AF_UNIX) as raw:  # garbage, then a huge message: an error each, no crash
            raw.connect(str(server.path))
            raw.sendall(b"\xff\xfe not json\n")
            assert b"bad request" in raw.recv(1000)
        with socket.socket(socket.AF_UNIX) as raw:
            raw.connect(str(server.path))
            raw.sendall(b"[" * 70_000)
            assert b"bad request" in raw.recv(1000)
        assert request(data_dir, "status")["ok"]
    finally:
        server.close()
    assert not server.path.exists()


def _connect_as_nobody(path: Path) -> str:
    """Connect to the socket as uid 65534 in a child process; what the client saw."""
    code = f"""
import os, socket, sys
os.setgid(65534); os.setuid(65534)
s = socket.socket(socket.AF_UNIX)
try:
    s.connect({str(path)!r})
except OSError as e:
    print("connect failed:", type(e).__name__); sys.exit()
s.sendall(b'{{"command": "stop"}}\\n')
print(s.recv(1000).decode())
"""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_control_endpoint_refuses_another_user():
    base = Path(tempfile.mkdtemp(prefix="p2ptrain-ctl-", dir="/tmp"))  # pytest's tmp dirs are root-only
    data_dir = base / "d"
    data_dir.mkdir(mode=0o700)
    handled = []
    server = ControlServer(data_dir, lambda req: handled.append(req) or {"ok": True})
    try:
        os.chmod(base, 0o755)
        assert "connect failed: PermissionError" in _connect_as_nobody(server.path)  # the file modes
        os.chmod(data_dir, 0o777)  # loosen them by mistake: the daemon still checks who is calling
        os.chmod(server.path, 0o777)
        assert "refused: the daemon belongs to another user" in _connect_as_nobody(server.path)
        assert handled == []
    finally:
        server.close()
        shutil.rmtree(base, ignore_errors=True)


# -- a real daemon -------------------------------------------------------------------------------------


class DaemonUnderTest:
    def __init__(self, tmp_path: Path):
        self.tmp, self.data_dir, self.gpu = tmp_path, tmp_path / "data", tmp_path / "gpu.json"
        self.env = {**os.environ, **env_for(tmp_path)}
        self.transcript: list[str] = []
        with socket.socket() as probe:  # a free port for the daemon's dashboard
            probe.bind(("127.0.0.1", 0))
            self.dashboard_port = probe.getsockname()[1]
        (tmp_path / "config.toml").write_text(
            f"""[swarm]
model = "gpt2-tiny"

[peer]
data_dir = "{self.data_dir}"
host = "127.0.0.1"
port = 0
batch_size = 4
checkpoint_every = 1
validate_every = 0

[idle]
gpu_sensor = "fake:{self.gpu}"
quiet_period_s = 3
poll_s = 0.3
cpu_threads = 1

[dashboard]
port = {self.dashboard_port}
"""
        )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [sys.executable, "-m", "p2ptrain", *args], env=self.env, capture_output=True, text=True, timeout=180
        )
        if "--json" not in args:  # the polling is left out of the transcript
            self.transcript.append(f"$ p2ptrain {' '.join(args)}\n{done.stdout}{done.stderr}")
        if check:
            assert done.returncode == 0, done.stdout + done.stderr
        return done

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)

    def wait(self, condition, timeout_s: float, what: str) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.status()
            if condition(status):
                return status
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; last status {status}")

    def page(self) -> dict:
        """The daemon's dashboard data, as its page polls it."""
        url = f"http://127.0.0.1:{self.dashboard_port}/api/status"
        with urllib.request.urlopen(url, timeout=5) as answer:
            return json.loads(answer.read())

    def game(self, pid: int | None) -> None:
        processes = [] if pid is None else [{"pid": pid, "name": "game.exe", "used_mb": 3000}]
        self.gpu.write_text(json.dumps({"processes": processes, "temperature_c": 60}))


def _peer_samples(status: dict) -> int:
    return status["peer"].get("samples", 0) or 0


@pytest.mark.slow
def test_daemon_start_status_game_pause_resume_stop(tmp_path):
    from browser import opened

    daemon = DaemonUnderTest(tmp_path)
    started = daemon.cli("daemon", "start")
    assert "Daemon started" in started.stdout
    pid = int(started.stdout.split("pid ")[1].split(")")[0])
    try:
        assert "already running" in daemon.cli("daemon", "start").stdout
        daemon.wait(lambda s: s["state"] == "training" and _peer_samples(s) > 0, 150, "training")
        shown = daemon.cli("status").stdout
        assert "Daemon" in shown and "Reachability: " in shown and "Network: " in shown  # the running peer's status

        assert daemon.page()["status"]["state"] == "training"  # its dashboard, on the configured port
        listening = {c.laddr for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        assert [a for a in listening if a.port == daemon.dashboard_port] == [("127.0.0.1", daemon.dashboard_port)]

        with opened(f"http://127.0.0.1:{daemon.dashboard_port}/") as page:  # the daemon's page, in a browser
            page.wait_for_function("() => document.getElementById('state').textContent === 'training'")
            daemon.game(os.getpid())  # a "game" appears on the GPU (any pid that is not the daemon's)
            t0 = time.monotonic()
            paused = daemon.wait(lambda s: s["peer"].get("state") == "paused", 10, "the peer to pause")
            paused_after = time.monotonic() - t0
            page.wait_for_function("() => document.getElementById('paused').textContent.includes('game.exe')",
                                   timeout=2_000)  # the page shows the pause within 2 s  # fmt: skip
            assert page.text_content("#state") == "paused" and page.errors == []
        assert "game.exe" in paused["paused_reasons"][0] and paused_after < 5
        frozen = _peer_samples(daemon.status())
        time.sleep(1.5)
        assert _peer_samples(daemon.status()) == frozen  # no step while paused
        assert "game.exe" in daemon.cli("status").stdout
        daemon.transcript.append(f"(the fake GPU sensor shows game.exe; paused after {paused_after:.1f} s)")

        daemon.game(None)  # the game exits: resume after the 3 s quiet period, not before
        t0 = time.monotonic()
        resumed = daemon.wait(lambda s: s["peer"].get("state") == "training", 15, "the peer to resume")
        assert time.monotonic() - t0 >= 2.5
        daemon.transcript.append(f"(game.exe gone; resumed after {time.monotonic() - t0:.1f} s, quiet period 3 s)")
        daemon.cli("status")
        assert [e["event"] for e in resumed["events"]][-2:] == ["pause", "resume"]
        daemon.wait(lambda s: _peer_samples(s) > frozen, 30, "training to go on")

        assert "paused by hand (seat 12 taken)" in daemon.cli("pause", "--reason", "seat 12 taken").stdout
        daemon.wait(lambda s: s["peer"].get("state") == "paused", 10, "the manual pause")
        daemon.cli("resume")
        daemon.wait(lambda s: s["peer"].get("state") == "training", 10, "the manual resume")

        stopped = daemon.cli("daemon", "stop")
        assert "Stopped in" in stopped.stdout
        assert not psutil.pid_exists(pid)
        assert daemon.cli("status", check=False).returncode != 0  # nobody answers any more
        log = (daemon.data_dir / "p2ptrain.log").read_text()
        assert "Idle policy: pause (another program uses the GPU: game.exe" in log and "Resumed after" in log
        print("\n".join(daemon.transcript))
    finally:
        _kill_tree(pid)


@pytest.mark.slow(alone=False)  # one peer, and no deadline tighter than minutes
def test_a_killed_daemon_restarts_from_its_checkpoint_with_the_same_identity(tmp_path):
    daemon = DaemonUnderTest(tmp_path)
    pid = int(daemon.cli("daemon", "start").stdout.split("pid ")[1].split(")")[0])
    try:
        first = daemon.wait(lambda s: (s["peer"].get("checkpoint_epoch") or 0) >= 1, 180, "a checkpoint")
        children = psutil.Process(pid).children(recursive=True)
        os.kill(pid, signal.SIGKILL)  # a crash: no shutdown code runs at all
        psutil.wait_procs([psutil.Process(pid), *children], timeout=15)
        assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)
        pid = int(daemon.cli("daemon", "start").stdout.split("pid ")[1].split(")")[0])  # stale socket/pid: fine
        again = daemon.wait(lambda s: s["peer"].get("resumed_from_epoch") is not None, 180, "the resume")
        assert again["peer"]["peer_id"] == first["peer"]["peer_id"]
        status = read_json(daemon.data_dir / "status.json")
        assert status["resumed_from_epoch"] >= 1
        daemon.cli("leave")
        assert not (daemon.data_dir / "swarm.json").exists()  # left for good: not rejoined at the next start
    finally:
        _kill_tree(pid)


def _kill_tree(pid: int) -> None:
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    procs = [proc, *proc.children(recursive=True)]
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)
