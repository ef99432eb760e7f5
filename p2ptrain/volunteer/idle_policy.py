"""When a volunteer's machine may train, and how hard: the idle policy, a pure function of the facts.

Every few seconds the daemon reads the machine (``sensors.MachineFacts``), measures this
peer's traffic, and asks ``IdlePolicy.decide`` for a ``Verdict``: run or pause (with every reason),
and a duty cycle (the fraction of wall time the trainer may compute). Reasons, each on by default
where the machine can tell:

- another process uses the GPU (a game): pause at once; resume only after ``quiet_period_s`` with
  no such process. Desktop compositors and processes holding less than ``foreign_min_mb`` of GPU
  memory (a browser tab) do not count;
- outside the ``schedule`` windows (local time, ``"01:00-08:00"``, windows may wrap midnight);
- hotter than ``max_gpu_temperature_c``: pause until ``TEMPERATURE_HYSTERESIS_C`` below it;
- on battery (``pause_on_battery``);
- carbon-aware mode: the grid's carbon intensity (``carbon.GridIntensity``, from the daemon's
  ``IntensityWatcher``) is above ``max_grid_g_co2_per_kwh``, or, where the source gives a forecast,
  the current period is not among the ``cleanest_hours`` cleanest hours of the next 24 h (rolling);
- paused by hand (``p2ptrain pause``, or a PC café's seat software calling it).

Caps that throttle rather than pause: a GPU power cap the driver would not set, and upload/download
caps, lower the duty cycle multiplicatively while exceeded and let it recover slowly (AIMD), so the
average stays under the cap. Times are passed in, so tests run scenarios on a virtual clock.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass

from p2ptrain.energy.carbon import GridIntensity, cleanest_cutoff, current_period
from p2ptrain.errors import ConfigError
from p2ptrain.gate import Verdict
from p2ptrain.volunteer.sensors import MachineFacts

TEMPERATURE_HYSTERESIS_C = 5.0
MIN_DUTY = 0.05  # never throttle below this: a peer that computes nothing only costs its swarm
DUTY_RECOVERY = 1.1  # per decision while under every cap
# GPU contexts every desktop has; they never mean "someone is playing"
DESKTOP_PROCESSES = ("Xorg", "Xwayland", "gnome-shell", "kwin_x11", "kwin_wayland", "sway", "dwm.exe", "explorer.exe")
_WINDOW = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)$")


@dataclass(frozen=True)
class IdleSettings:
    pause_on_gpu_process: bool = True  # pause while another program uses the GPU
    quiet_period_s: float = 300.0  # ...and resume this long after the last one left
    foreign_min_mb: float = 256.0  # GPU processes holding less memory than this are ignored (browsers)
    ignore_processes: tuple[str, ...] = DESKTOP_PROCESSES  # process names that never count as foreign
    # > 0: also pause while other programs hold more GPU memory than this. For WSL2, where NVML lists
    # no Windows processes: set it above what the Windows desktop holds (e.g. 1500)
    foreign_memory_mb: float = 0.0
    schedule: tuple[str, ...] = ()  # local-time windows to train in, e.g. ("01:00-08:00",); empty = always
    max_gpu_temperature_c: float = 83.0  # 0 = no limit
    gpu_power_limit_w: float = 0.0  # 0 = no cap; set through NVML where permitted, else duty-cycle throttling
    max_gpu_memory_fraction: float = 0.9  # of the GPU's memory this peer may allocate
    cpu_threads: int = 0  # torch CPU threads; 0 = torch's default
    max_upload_mbit: float = 0.0  # average upload cap, 0 = none
    max_download_mbit: float = 0.0  # average download cap, 0 = none
    pause_on_battery: bool = True
    poll_s: float = 2.0  # how often the daemon reads the machine
    # carbon-aware mode (the intensity comes from [energy]: a live source, else the country's average)
    max_grid_g_co2_per_kwh: float = 0.0  # pause while the grid emits more than this per kWh; 0 = off
    cleanest_hours: float = 0.0  # train only while now is among the N cleanest hours of the next 24 h of forecast
    #   (a rolling window: once those hours pass, the cleanest of what remains qualify); needs a forecast; 0 = off
    gpu_sensor: str = "auto"  # where GPU facts come from: auto (NVML if present), nvml, none, fake:<json file>

    def __post_init__(self) -> None:
        checks = [
            (self.quiet_period_s >= 0, "quiet_period_s must be ≥ 0"),
            (self.foreign_min_mb >= 0 and self.foreign_memory_mb >= 0, "foreign_min_mb/foreign_memory_mb must be ≥ 0"),
            (0 <= self.max_gpu_temperature_c <= 120, "max_gpu_temperature_c must be in [0, 120]"),
            (self.gpu_power_limit_w >= 0, "gpu_power_limit_w must be ≥ 0"),
            (0 < self.max_gpu_memory_fraction <= 1, "max_gpu_memory_fraction must be in (0, 1]"),
            (self.cpu_threads >= 0, "cpu_threads must be ≥ 0"),
            (self.max_upload_mbit >= 0 and self.max_download_mbit >= 0, "bandwidth caps must be ≥ 0"),
            (0.1 <= self.poll_s <= 60, "poll_s must be in [0.1, 60]"),
            (0 <= self.max_grid_g_co2_per_kwh <= 3000, "max_grid_g_co2_per_kwh must be in [0, 3000]"),
            (0 <= self.cleanest_hours <= 24, "cleanest_hours must be in [0, 24]"),
            (
                self.gpu_sensor in ("auto", "nvml", "none") or self.gpu_sensor.startswith("fake:"),
                "gpu_sensor must be auto, nvml, none or fake:<path>",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"[idle] {message}")
        for window in self.schedule:
            if not _WINDOW.match(window):
                raise ConfigError(f'[idle] schedule: {window!r} is not a window like "01:00-08:00"')


@dataclass(frozen=True)
class Traffic:
    """This peer's measured network rates, Mbit/s (averaged by the meter)."""

    upload_mbit: float
    download_mbit: float


class IdlePolicy:
    def __init__(self, settings: IdleSettings, power_limit_applied: bool = False):
        self.settings = settings
        self.power_limit_applied = power_limit_applied  # NVML took the cap: no throttling needed for it
        self._foreign_seen_at: float | None = None
        self._hot = False
        self._duty = 1.0

    def decide(
        self,
        now: float,
        local_time: dt.datetime,
        facts: MachineFacts,
        ours: Iterable[int],
        traffic: Traffic | None = None,
        manual: str | None = None,
        own_gpu_mb: float = 0.0,
        grid: GridIntensity | None = None,
    ) -> Verdict:
        """``now``: a monotonic clock (s); ``local_time``: for the schedule (and the forecast: its ``timestamp()``);
        ``manual``: why paused by hand; ``own_gpu_mb``: GPU memory this peer holds (torch's reserved memory);
        ``grid``: the grid's carbon intensity now, for carbon-aware mode."""
        s, reasons = self.settings, []
        if manual:
            reasons.append(f"paused by hand ({manual})")
        if s.pause_on_gpu_process:
            foreign = [
                p
                for p in facts.foreign_processes(ours)
                if p.name not in s.ignore_processes and p.used_mb >= s.foreign_min_mb
            ]
            others_mb = (facts.memory_used_mb or 0.0) - own_gpu_mb
            if foreign:
                self._foreign_seen_at = now
                names = ", ".join(sorted({f"{p.name or '?'} (pid {p.pid})" for p in foreign}))
                reasons.append(f"another program uses the GPU: {names}")
            elif s.foreign_memory_mb and others_mb > s.foreign_memory_mb:
                self._foreign_seen_at = now
                reasons.append(f"other programs hold {others_mb:.0f} MB of GPU memory")
            elif self._foreign_seen_at is not None:
                quiet_for = now - self._foreign_seen_at
                if quiet_for < s.quiet_period_s:
                    reasons.append(f"GPU quiet for {quiet_for:.0f} s of {s.quiet_period_s:.0f} s")
                else:
                    self._foreign_seen_at = None
        if s.schedule and not in_schedule(local_time, s.schedule):
            reasons.append(f"outside the schedule {', '.join(s.schedule)}")
        if s.max_gpu_temperature_c and facts.temperature_c is not None:
            limit = s.max_gpu_temperature_c
            t = facts.temperature_c
            self._hot = t > limit - TEMPERATURE_HYSTERESIS_C if self._hot else t >= limit
            if self._hot:
                reasons.append(f"GPU at {facts.temperature_c:.0f} °C (limit {limit:.0f} °C)")
        if s.pause_on_battery and facts.on_battery:
            reasons.append("on battery")
        if grid is not None:
            reasons += carbon_reasons(s, grid, local_time.timestamp())
        if reasons:
            return Verdict(False, tuple(reasons), self._duty)
        return Verdict(True, (), *self._throttle(facts, traffic))

    def _throttle(self, facts: MachineFacts, traffic: Traffic | None) -> tuple[float, tuple[str, ...]]:
        s, over = self.settings, []
        if s.gpu_power_limit_w and not self.power_limit_applied and facts.power_w is not None:
            if facts.power_w > s.gpu_power_limit_w:
                over.append((s.gpu_power_limit_w / facts.power_w, f"GPU power {facts.power_w:.0f} W"))
        if traffic is not None:
            for cap, rate, what in (
                (s.max_upload_mbit, traffic.upload_mbit, "upload"),
                (s.max_download_mbit, traffic.download_mbit, "download"),
            ):
                if cap and rate > cap:
                    over.append((cap / rate, f"{what} {rate:.1f} Mbit/s > cap {cap:g}"))
        if over:
            self._duty = max(MIN_DUTY, self._duty * min(ratio for ratio, _ in over))
        else:
            self._duty = min(1.0, self._duty * DUTY_RECOVERY)
        notes = tuple(what for _, what in over)
        if self._duty < 1.0 and not notes:
            notes = ("recovering from a cap",)
        return self._duty, notes


def carbon_reasons(s: IdleSettings, grid: GridIntensity, now_unix: float) -> list[str]:
    """Why carbon-aware mode pauses now (empty: it does not)."""
    reasons = []
    g, limit = grid.g_co2_per_kwh, s.max_grid_g_co2_per_kwh
    if limit and g > limit:
        reasons.append(f"grid at {g:.0f} g CO2e/kWh, above {limit:.0f} ({grid.source})")
    if s.cleanest_hours:
        cutoff = cleanest_cutoff(grid.forecast, now_unix, s.cleanest_hours)
        period = current_period(grid.forecast, now_unix)
        if cutoff is not None and period is not None and period.g_co2_per_kwh > cutoff:
            reasons.append(
                f"not among the {s.cleanest_hours:g} cleanest hours of the forecast: "
                f"{period.g_co2_per_kwh:.0f} g CO2e/kWh now, those hours ≤ {cutoff:.0f} ({grid.source})"
            )
    return reasons


def in_schedule(local_time: dt.datetime, windows: Iterable[str]) -> bool:
    """True when ``local_time`` falls in one of the ``HH:MM-HH:MM`` windows (end exclusive; may wrap midnight)."""
    minute = local_time.hour * 60 + local_time.minute
    for window in windows:
        m = _WINDOW.match(window)
        if m is None:
            raise ConfigError(f"schedule window {window!r} is not like 01:00-08:00")
        start, end = int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])
        if (start <= minute < end) if start <= end else (minute >= start or minute < end):
            return True
    return False
