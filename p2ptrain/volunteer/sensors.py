"""What the volunteer's machine is doing: GPU facts through one small interface, plus the battery.

The idle policy (``idle_policy.py``) decides from a ``MachineFacts`` snapshot; where the facts come
from is behind ``GpuSensor``:

- ``NvmlSensor`` — NVIDIA's management library (``nvidia-ml-py``): processes on the GPU, utilization,
  memory, power draw, temperature; it can also set the power limit (root, or a GPU that allows it);
- ``FakeSensor`` — reads the same facts from a JSON file, re-read on every poll, so tests (and anyone
  trying the daemon on a machine without a GPU) can start a "game" by writing a file:

      {"processes": [{"pid": 4242, "name": "game.exe", "used_mb": 3000}], "temperature_c": 70,
       "power_w": 180, "utilization": 95, "memory_used_mb": 3500, "memory_total_mb": 8192,
       "power_limit_settable": false, "on_battery": false}

- ``NoGpuSensor`` — no NVIDIA GPU: no GPU facts, never a foreign GPU process.

``open_sensor("auto" | "nvml" | "none" | "fake:<path>")`` picks one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from p2ptrain.errors import ConfigError

logger = logging.getLogger(__name__)
GPU_DIE = 0  # NVML_TEMPERATURE_GPU


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str = ""
    used_mb: float = 0.0


@dataclass(frozen=True)
class MachineFacts:
    gpu_processes: tuple[GpuProcess, ...] = ()  # every process with a context on the GPU(s)
    utilization: float | None = None  # percent, None when unknown
    memory_used_mb: float | None = None
    memory_total_mb: float | None = None
    power_w: float | None = None
    temperature_c: float | None = None
    on_battery: bool = False

    def foreign_processes(self, ours: Iterable[int]) -> list[GpuProcess]:
        """GPU processes that are not this peer or its children (a game, a render, someone's notebook)."""
        mine = set(ours)
        return [p for p in self.gpu_processes if p.pid not in mine]


class GpuSensor(Protocol):
    name: str

    def read(self) -> MachineFacts: ...

    def set_power_limit(self, watts: float) -> bool:
        """Ask the GPU to cap its power; False where that is not permitted (then the caller throttles)."""
        ...


class NoGpuSensor:
    name = "none"

    def read(self) -> MachineFacts:
        return MachineFacts(on_battery=on_battery())

    def set_power_limit(self, watts: float) -> bool:
        return False


class NvmlSensor:
    """All NVIDIA GPUs of the machine through NVML (``pynvml`` from ``nvidia-ml-py``)."""

    name = "nvml"

    def __init__(self) -> None:
        import pynvml  # noqa: PLC0415 - only where a GPU is expected

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]

    @property
    def gpus(self) -> int:
        return len(self._handles)

    def read(self) -> MachineFacts:
        nvml, processes = self._nvml, {}
        util = used = total = power = temperature = None
        for handle in self._handles:
            for getter in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    for p in getter(handle):
                        mb = (p.usedGpuMemory or 0) / 2**20
                        processes[p.pid] = GpuProcess(p.pid, _process_name(p.pid), mb)
                except nvml.NVMLError:
                    pass
            util = _max(util, _try(lambda h=handle: nvml.nvmlDeviceGetUtilizationRates(h).gpu))
            memory = _try(lambda h=handle: nvml.nvmlDeviceGetMemoryInfo(h))
            if memory is not None:
                used, total = (used or 0) + memory.used / 2**20, (total or 0) + memory.total / 2**20
            power = _sum(power, _try(lambda h=handle: nvml.nvmlDeviceGetPowerUsage(h) / 1000))
            temperature = _max(temperature, _try(lambda h=handle: nvml.nvmlDeviceGetTemperature(h, GPU_DIE)))
        return MachineFacts(tuple(processes.values()), util, used, total, power, temperature, on_battery())

    def set_power_limit(self, watts: float) -> bool:
        nvml = self._nvml
        try:
            for handle in self._handles:
                low, high = nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle)  # milliwatts
                nvml.nvmlDeviceSetPowerManagementLimit(handle, int(min(max(watts * 1000, low), high)))
            return True
        except nvml.NVMLError as e:  # NVML_ERROR_NO_PERMISSION without root, NOT_SUPPORTED on many GPUs
            logger.info("Cannot set the GPU power limit (%s): throttling the duty cycle instead", e)
            return False


class FakeSensor:
    """Facts from a JSON file (module docstring); a missing or unreadable file means an idle machine."""

    name = "fake"

    def __init__(self, path: Path):
        self.path = path
        self.power_limit_w: float | None = None

    def _raw(self) -> dict:
        try:
            raw = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return raw if isinstance(raw, dict) else {}

    def read(self) -> MachineFacts:
        raw = self._raw()
        processes = tuple(
            GpuProcess(int(p["pid"]), str(p.get("name", "")), float(p.get("used_mb", 0)))
            for p in raw.get("processes", [])
            if isinstance(p, dict) and isinstance(p.get("pid"), int)
        )
        number = {k: float(raw[k]) if isinstance(raw.get(k), (int, float)) else None for k in _NUMBERS}
        return MachineFacts(processes, on_battery=bool(raw.get("on_battery", False)), **number)

    def set_power_limit(self, watts: float) -> bool:
        if not self._raw().get("power_limit_settable", False):
            return False
        self.power_limit_w = watts
        return True


_NUMBERS = ("utilization", "memory_used_mb", "memory_total_mb", "power_w", "temperature_c")


def open_sensor(spec: str) -> GpuSensor:
    """``auto`` (NVML if it loads and sees a GPU, else none), ``nvml``, ``none``, or ``fake:<path>``."""
    if spec.startswith("fake:"):
        return FakeSensor(Path(spec[5:]).expanduser())
    if spec == "none":
        return NoGpuSensor()
    if spec not in ("auto", "nvml"):
        raise ConfigError(f"gpu_sensor must be auto, nvml, none or fake:<path>, got {spec!r}")
    try:
        sensor = NvmlSensor()
        if sensor.gpus:
            return sensor
        reason = "NVML sees no GPU"
    except Exception as e:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, driver errors
        reason = f"NVML unavailable: {e}"
    if spec == "nvml":
        raise ConfigError(f'gpu_sensor nvml: {reason}. Install the NVIDIA driver, or set gpu_sensor = "auto".')
    logger.info("No GPU sensor (%s): GPU-based pausing is off", reason)
    return NoGpuSensor()


def on_battery() -> bool:
    """True when a laptop runs on battery (False on desktops and wherever it cannot be told)."""
    try:
        battery = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError):
        return False
    return battery is not None and battery.power_plugged is False


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return ""


def _try(read):
    try:
        return read()
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported etc.: that fact is unknown
        return None


def _max(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def _sum(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else a + b


_SS_SOCKET = re.compile(r"^\S+\s+\S+\s+(\S+)\s+(\S+)\s+users:\((.*)\)")
_SS_PID = re.compile(r"pid=(\d+)")
_SS_BYTES = re.compile(r"\bbytes_(sent|received):(\d+)")


class TrafficMeter:
    """This peer's TCP traffic, from the kernel's per-socket byte counters (``ss -tinp``; Linux).

    Each ``rates(pids)`` call sums the bytes sent and received on the established TCP sockets owned by
    ``pids`` (the peer and its children: p2pd carries all of hivemind's traffic) since the previous
    call, and returns the average Mbit/s over the last ``window_s``. ``None`` where ``ss`` is missing.
    """

    def __init__(self, window_s: float = 30.0):
        self.window_s = window_s
        self._last: dict[tuple[str, str], tuple[int, int]] | None = None
        self._samples: list[tuple[float, int, int]] = []  # (time, sent, received) since the previous call
        self.available = shutil.which("ss") is not None and sys.platform.startswith("linux")

    def counters(self, pids: set[int]) -> dict[tuple[str, str], tuple[int, int]]:
        out = subprocess.run(
            ["ss", "-tinpH", "state", "established"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        sockets, current = {}, None
        for line in out.splitlines():
            m = _SS_SOCKET.match(line)
            if m:
                owned = {int(p) for p in _SS_PID.findall(m[3])}
                current = (m[1], m[2]) if owned & pids else None
            elif current is not None:
                found = dict(_SS_BYTES.findall(line))
                sockets[current] = (int(found.get("sent", 0)), int(found.get("received", 0)))
                current = None
        return sockets

    def rates(self, now: float, pids: set[int]) -> tuple[float, float] | None:
        """(upload, download) Mbit/s averaged over the window; None until two samples exist or without ``ss``."""
        if not self.available:
            return None
        try:
            counters = self.counters(pids)
        except (OSError, subprocess.SubprocessError):
            return None
        if self._last is None:
            self._last = counters
            self._samples.append((now, 0, 0))
            return None
        sent = received = 0
        for key, (s, r) in counters.items():
            s0, r0 = self._last.get(key, (0, 0))  # a new socket: all its bytes are new
            sent, received = sent + max(0, s - s0), received + max(0, r - r0)
        self._last = counters
        self._samples = [x for x in self._samples if now - x[0] <= self.window_s] + [(now, sent, received)]
        span = now - self._samples[0][0]
        if span <= 0:
            return None
        total_sent = sum(x[1] for x in self._samples[1:])
        total_received = sum(x[2] for x in self._samples[1:])
        return total_sent * 8 / 1e6 / span, total_received * 8 / 1e6 / span
