"""The volunteer daemon: a peer that trains only while the machine is idle. Its whole life, in order.

    p2ptrain daemon start          # detached; what a volunteer types once
    p2ptrain daemon run            # the same in the foreground (what systemd / launchd run)
    p2ptrain status | pause | resume | leave | daemon stop

1. read the config file (``config``): what to join, peer settings, the idle policy;
2. take the daemon's lock on the data dir (one daemon per data dir; the peer inside takes its own);
3. open the GPU sensor; cap the GPU's power through NVML where permitted (else the policy throttles);
   start watching the grid's carbon intensity (``carbon.IntensityWatcher``: live source or country average);
4. start the control endpoint (``control_socket``) and the watcher thread: every ``poll_s`` it reads the
   machine and the grid intensity, asks ``IdlePolicy`` for a verdict, sets the trainer's ``Gate``, and
   logs every pause and resume with its reasons (also kept for `status`);
5. run the peer (``peer.run_peer`` with the gate) until stopped; a peer that fails for a reason a
   retry may fix (network, a bad peer) is restarted after a growing back-off, from its checkpoint and
   with the same identity; a configuration error ends the daemon (a restart would fail the same way);
6. on `daemon stop`, `leave`, SIGTERM or Ctrl+C: the peer leaves in its own order (round, checkpoint,
   children), then the watcher and the endpoint stop; `leave` also forgets the swarm (and removes
   the invite from the config file), so the next start does not rejoin it. A crash or a reboot is
   the service manager's to restart (``daemon/``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from p2ptrain.energy.carbon import IntensityWatcher
from p2ptrain.energy.ledger import ledger_path, load_ledger
from p2ptrain.errors import ConfigError, LedgerInvalid, P2PTrainError
from p2ptrain.gate import Gate, Verdict
from p2ptrain.processes import descendants
from p2ptrain.settings import PeerSettings
from p2ptrain.status import HISTORIES, StatusWriter
from p2ptrain.swarm.identity import ensure_private_dir, lock_data_dir
from p2ptrain.volunteer.config import DaemonConfig, set_value
from p2ptrain.volunteer.control_socket import ControlServer
from p2ptrain.volunteer.idle_policy import IdlePolicy, Traffic
from p2ptrain.volunteer.sensors import GpuSensor, TrafficMeter, open_sensor

logger = logging.getLogger(__name__)
RETRY_S = (10.0, 30.0, 60.0, 300.0)  # back-off between restarts of a failed peer
MAX_EVENTS = 50


class VolunteerDaemon:
    def __init__(self, config: DaemonConfig, settings: PeerSettings, stop: threading.Event):
        self.config, self.settings, self.stop = config, settings, stop
        self.gate = Gate()
        self.manual: str | None = None  # why paused by hand; None when not
        self.leaving = False
        self.events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)  # pauses and resumes, newest last
        self.started_at = time.time()
        self.restarts = 0
        self.sensor: GpuSensor | None = None
        self.traffic = TrafficMeter()  # this peer's network rates (not the energy meter)
        self._deciding = threading.Lock()
        self.policy: IdlePolicy | None = None
        self.intensity: IntensityWatcher | None = None
        self.peer_status: StatusWriter | None = None  # the running peer's, read in this process

    # 1-6: the lifecycle ---------------------------------------------------------------------------

    def run(self) -> None:
        from p2ptrain.peer import JoinRequest, run_peer
        from p2ptrain.swarm.invite import decode_invite

        data_dir = ensure_private_dir(self.settings.data_dir)
        lock = lock_data_dir(data_dir, "daemon.lock", "daemon")
        idle = self.config.idle
        self.sensor = open_sensor(idle.gpu_sensor)
        power_capped = bool(idle.gpu_power_limit_w) and self.sensor.set_power_limit(idle.gpu_power_limit_w)
        policy = self.policy = IdlePolicy(idle, power_limit_applied=power_capped)
        intensity = self.intensity = IntensityWatcher(self.settings.energy)
        warn_if_carbon_mode_cannot_train(idle, intensity)
        server = ControlServer(data_dir, self.handle)
        page = self._serve_dashboard(data_dir)
        watcher = threading.Thread(target=self._watch, args=(policy,), name="idle-watcher", daemon=True)
        logger.info(
            "Daemon %d: GPU sensor %s, idle policy %s; control socket %s",
            os.getpid(),
            self.sensor.name,
            describe_policy(idle),
            server.path,
        )
        try:
            intensity.start()
            self._decide(policy)  # the first verdict is in place before the peer's first step
            watcher.start()
            invite = decode_invite(self.config.swarm.invite) if self.config.swarm.invite else None
            request = JoinRequest(self.config.swarm.model, invite)
            while not self.stop.is_set():
                try:
                    self.peer_status = StatusWriter(data_dir / "status.json")
                    run_peer(
                        self.settings,
                        request,
                        self.stop,
                        announce=logger.info,
                        gate=self.gate,
                        intensity=intensity,
                        status=self.peer_status,
                    )
                    break  # stopped, or --max-steps reached
                except ConfigError:
                    raise
                except P2PTrainError as e:
                    wait_s = RETRY_S[min(self.restarts, len(RETRY_S) - 1)]
                    self.restarts += 1
                    logger.warning("The peer stopped: %s. Restarting in %.0f s (restart %d)", e, wait_s, self.restarts)
                    self.stop.wait(wait_s)
            if self.leaving:
                (data_dir / "swarm.json").unlink(missing_ok=True)
                if self.config.swarm.invite and self.config.path is not None:
                    set_value({}, "swarm.invite", None, path=self.config.path)
                logger.info("Left the swarm: the next start will not rejoin it")
        finally:
            self.stop.set()
            if watcher.is_alive():
                watcher.join(5.0)
            intensity.stop(timeout_s=0.5)
            server.close()
            if page is not None:
                page.shutdown()
                page.server_close()
            lock.close()
            logger.info("Daemon stopped")

    def _serve_dashboard(self, data_dir: Path) -> Any:
        """This peer's page and /metrics at 127.0.0.1:``dashboard.port``, read-only; None if off or the port is taken
        (the daemon trains without it)."""
        port = self.config.dashboard.port
        if not port:
            return None
        from p2ptrain.dashboard.server import serve

        try:
            page, board = serve(data_dir, "127.0.0.1", port)
        except OSError as e:
            logger.warning("No dashboard: 127.0.0.1:%d is taken (%s); `p2ptrain config set dashboard.port`", port,
                           e.strerror)  # fmt: skip
            return None
        threading.Thread(target=board.run_sampler, args=(self.stop,), name="dashboard", daemon=True).start()
        logger.info("Dashboard: http://127.0.0.1:%d/ (Prometheus: /metrics)", port)
        return page

    # the watcher --------------------------------------------------------------------------------

    def _watch(self, policy: IdlePolicy) -> None:
        while not self.stop.wait(self.config.idle.poll_s):
            if not self.stop.is_set():
                try:
                    self._decide(policy)
                except Exception as e:  # noqa: BLE001 - a sensor hiccup must not end the daemon
                    logger.warning("Idle check failed: %r", e)

    def _decide(self, policy: IdlePolicy) -> None:
        with self._deciding:  # the watcher, and a control request that wants its effect now
            self._decide_now(policy)

    def _decide_now(self, policy: IdlePolicy) -> None:
        pids = {os.getpid(), *(p.pid for p in descendants())}  # our GPU contexts: this peer and its children
        facts = self.sensor.read()
        rates = self.traffic.rates(time.monotonic(), pids) if self._caps_bandwidth() else None
        traffic = Traffic(*rates) if rates else None
        grid = self.intensity.current() if self.intensity is not None else None
        verdict = policy.decide(
            time.monotonic(), dt.datetime.now(), facts, pids, traffic, self.manual, own_gpu_mb(), grid
        )
        before = self.gate.verdict
        self.gate.set(verdict)
        if verdict.run != before.run or (not verdict.run and _kinds(verdict) != _kinds(before)):
            what = "resume" if verdict.run else "pause"
            self.events.append({"at": time.time(), "event": what, "reasons": list(verdict.reasons)})
            if verdict.run:
                logger.info("Idle policy: resume training")
            else:
                logger.info("Idle policy: pause (%s)", "; ".join(verdict.reasons))
        if verdict.duty < 1.0 and verdict.notes != before.notes:
            logger.info("Throttled to %.0f%% duty: %s", verdict.duty * 100, "; ".join(verdict.notes))

    def _caps_bandwidth(self) -> bool:
        return bool(self.config.idle.max_upload_mbit or self.config.idle.max_download_mbit)

    # the control endpoint -----------------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["command"]
        if command in ("pause", "resume"):
            self.manual = (request.get("reason") or "p2ptrain pause") if command == "pause" else None
            if self.policy is not None:
                self._decide(self.policy)  # in effect before the reply: `status` right after shows it
        elif command in ("stop", "leave"):
            self.leaving = command == "leave"
            self.stop.set()
        return {"ok": True, **self.status()}

    def status(self) -> dict[str, Any]:
        verdict: Verdict = self.gate.verdict
        peer = asdict(self.peer_status.snapshot()) if self.peer_status is not None else {}
        return {
            "daemon_pid": os.getpid(),
            "daemon_since": self.started_at,
            "state": "stopping" if self.stop.is_set() else ("training" if verdict.run else "paused"),
            "paused_reasons": list(verdict.reasons),
            "duty": verdict.duty,
            "throttled_by": list(verdict.notes),
            "events": list(self.events),
            "restarts": self.restarts,
            "peer": {k: v for k, v in peer.items() if k not in HISTORIES},
            "ledger": ledger_summary(self.settings.data_dir, peer.get("run_id")),
            "grid": grid_summary(self.intensity),
        }


def ledger_summary(data_dir, run_id: Any) -> dict[str, Any] | None:
    """This peer's ledger totals in its current swarm, for `status` (None before its first ledger write)."""
    if not isinstance(run_id, str) or not run_id:
        return None
    try:
        ledger = load_ledger(ledger_path(data_dir, run_id))
    except LedgerInvalid as e:
        return {"error": str(e)}
    if ledger is None:
        return None
    return {
        "samples": ledger.samples,
        "tokens": ledger.tokens,
        "device": ledger.device,
        "device_s": ledger.device_s,
        "energy_kwh": ledger.energy_kwh,
        "g_co2e": ledger.g_co2e,
        "intensity_source": ledger.intensity_source,
        "meter": ledger.meter,
        "since": ledger.started_at,
    }


def grid_summary(intensity: IntensityWatcher | None) -> dict[str, Any] | None:
    if intensity is None:
        return None
    grid = intensity.current()
    return {"g_co2_per_kwh": grid.g_co2_per_kwh, "source": grid.source, "forecast_periods": len(grid.forecast)}


def warn_if_carbon_mode_cannot_train(idle: Any, intensity: IntensityWatcher) -> None:
    """A fixed yearly average above the limit would pause training for good: say so at start."""
    if idle.max_grid_g_co2_per_kwh and intensity.source is None:
        average = intensity.fallback.g_co2_per_kwh
        if average > idle.max_grid_g_co2_per_kwh:
            logger.warning(
                "Carbon-aware mode: the %s is above idle.max_grid_g_co2_per_kwh = %.0f and never changes, so "
                "training will stay paused. Use a live source (energy.intensity_source uk or electricitymaps) "
                "or raise the limit.",
                intensity.fallback.source,
                idle.max_grid_g_co2_per_kwh,
            )
    if idle.cleanest_hours and intensity.source is None:
        logger.warning(
            "Carbon-aware mode: idle.cleanest_hours needs a forecast, and the %s has none: it has no effect. "
            "Set energy.intensity_source uk (GB) or electricitymaps.",
            intensity.fallback.source,
        )


def _kinds(verdict: Verdict) -> list[str]:
    """The reasons without their numbers: a countdown ("quiet for 2 s of 3 s") is one pause, not many."""
    return [re.split(r"[\d(:]", reason)[0] for reason in verdict.reasons]


def describe_policy(idle: Any) -> str:
    parts = []
    if idle.pause_on_gpu_process:
        parts.append(f"pause for other GPU programs (quiet {idle.quiet_period_s:.0f} s)")
    if idle.schedule:
        parts.append(f"schedule {', '.join(idle.schedule)}")
    if idle.max_gpu_temperature_c:
        parts.append(f"≤ {idle.max_gpu_temperature_c:.0f} °C")
    if idle.gpu_power_limit_w:
        parts.append(f"≤ {idle.gpu_power_limit_w:.0f} W")
    if idle.max_upload_mbit or idle.max_download_mbit:
        parts.append(f"≤ {idle.max_upload_mbit:g}/{idle.max_download_mbit:g} Mbit/s up/down")
    if idle.pause_on_battery:
        parts.append("pause on battery")
    if idle.max_grid_g_co2_per_kwh:
        parts.append(f"pause above {idle.max_grid_g_co2_per_kwh:.0f} g CO2e/kWh")
    if idle.cleanest_hours:
        parts.append(f"train in the {idle.cleanest_hours:g} cleanest hours of the forecast")
    return ", ".join(parts) or "always train"


def run_daemon(config: DaemonConfig, flags: Mapping[str, Any], env: Mapping[str, str], stop: threading.Event) -> None:
    VolunteerDaemon(config, config.peer_settings(flags, env), stop).run()


def own_gpu_mb() -> float:
    """GPU memory this process holds through torch (the peer trains in this process)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return 0.0
    return sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count())) / 2**20
