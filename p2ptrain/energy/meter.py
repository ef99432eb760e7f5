"""What this peer's hardware spends, in joules: one small interface over codecarbon, plus fakes for tests.

``open_meter(energy.meter)`` picks one:

- ``CodecarbonMeter`` (``auto``): codecarbon's hardware layer, which chooses per part
  - GPU: NVML's total-energy counter (Volta and newer), or 1 s power samples where the counter is missing;
  - CPU: RAPL energy counters where readable (``/sys/class/powercap``), else an estimate TDP × load
    (the CPU's TDP from codecarbon's table, a generic 85 W when the model is unknown);
  - RAM: an estimate from the memory size (codecarbon's model: ~5 W per DIMM-sized slice).
  ``MeterInfo`` says which path each part took and whether it is *measured* or *estimated*; the
  ledger and the report carry it. With ``energy.tracking = "process"`` (default) CPU and RAM are
  this peer's share (its processes' CPU time and memory); RAPL and NVML always count the whole device.
- ``FakeMeter`` (``fake:<file.json>``): cumulative joules read from a file (``{"cpu_j": 1.5, "gpu_j": 0,
  "ram_j": 0.5}``), re-read on every poll, so a test or a demo sets what the "hardware" spent;
- ``NoMeter`` (``none``): nothing is metered (energy 0, labelled so).

The meter is read by the ledger's accountant thread every ``energy.ledger_every_s``, never on the
training thread: codecarbon's own thread samples power once a second; a reading costs a few ms.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from p2ptrain.compat import codecarbon as codecarbon_compat
from p2ptrain.energy.carbon import J_PER_KWH
from p2ptrain.errors import ConfigError

logger = logging.getLogger(__name__)
LONG_S = 24 * 3600.0  # codecarbon's own measuring period: we measure when we read, so its scheduler idles


@dataclass(frozen=True)
class EnergyReading:
    """Joules spent since the meter started, per part."""

    cpu_j: float = 0.0
    gpu_j: float = 0.0
    ram_j: float = 0.0

    @property
    def total_j(self) -> float:
        return self.cpu_j + self.gpu_j + self.ram_j

    def minus(self, earlier: EnergyReading) -> EnergyReading:
        """The energy between two readings (never negative: a counter reset counts as nothing)."""
        return EnergyReading(
            max(0.0, self.cpu_j - earlier.cpu_j),
            max(0.0, self.gpu_j - earlier.gpu_j),
            max(0.0, self.ram_j - earlier.ram_j),
        )


@dataclass(frozen=True)
class MeterInfo:
    """How each part is metered (each label ends in "measured" or "estimated") and what the hardware is."""

    cpu: str = "not metered"
    gpu: str = "not metered"
    ram: str = "not metered"
    cpu_model: str = ""
    gpu_model: str = ""  # "" = no GPU

    def as_dict(self) -> dict[str, str]:
        return {"cpu": self.cpu, "gpu": self.gpu, "ram": self.ram}


class EnergyMeter(Protocol):
    def start(self) -> MeterInfo:
        """Begin metering (may take a second or two: hardware detection); say how each part is metered."""
        ...

    def read(self) -> EnergyReading:
        """Cumulative joules since ``start``."""
        ...

    def stop(self) -> EnergyReading:
        """The final reading; the meter's threads are stopped."""
        ...


class NoMeter:
    def start(self) -> MeterInfo:
        return MeterInfo()

    def read(self) -> EnergyReading:
        return EnergyReading()

    def stop(self) -> EnergyReading:
        return EnergyReading()


class FakeMeter:
    """Cumulative joules from a JSON file (module docstring) or set by a test; a missing file reads as 0 J."""

    def __init__(self, path: Path | None = None, info: MeterInfo | None = None):
        self.path = path
        self.info = info or MeterInfo("fake (measured)", "fake (measured)", "fake (estimated)", "fake CPU", "")
        self.value = EnergyReading()
        self.reads = 0

    def set(self, cpu_j: float = 0.0, gpu_j: float = 0.0, ram_j: float = 0.0) -> None:
        self.value = EnergyReading(cpu_j, gpu_j, ram_j)

    def start(self) -> MeterInfo:
        return self.info

    def read(self) -> EnergyReading:
        self.reads += 1
        if self.path is not None:
            try:
                raw = json.loads(self.path.read_text())
            except (OSError, ValueError):
                raw = {}
            raw = raw if isinstance(raw, dict) else {}
            number = {k: float(v) for k, v in raw.items() if k in ("cpu_j", "gpu_j", "ram_j") and _number(v)}
            self.value = EnergyReading(**number)
        return self.value

    def stop(self) -> EnergyReading:
        return self.read()


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e15


class CodecarbonMeter:
    """codecarbon's ``OfflineEmissionsTracker`` used only as a meter: no file, no network, no emissions of its own
    (p2ptrain applies the grid intensity itself). Its totals are read from the tracker after a measurement."""

    def __init__(self, tracking: str = "process"):
        self.tracking = tracking
        self._tracker = None
        self._lock = threading.Lock()  # the accountant and a pause may read at once

    def start(self) -> MeterInfo:
        quiet = logging.getLogger("codecarbon")
        quiet.disabled = True  # its set-up logs a dozen INFO/WARNING lines to stderr, every measurement one more
        try:
            from codecarbon import OfflineEmissionsTracker

            codecarbon_compat.read_cpu_model_from_proc()
            self._tracker = OfflineEmissionsTracker(
                country_iso_code="USA",  # unused: p2ptrain applies its own intensity; set so that nothing geolocates
                save_to_file=False,
                log_level="error",
                allow_multiple_runs=True,  # several local peers on one machine (the demo, the tests)
                measure_power_secs=LONG_S,
                tracking_mode=self.tracking,
            )
            self._tracker.start()
        except Exception as e:  # noqa: BLE001 - a meter that cannot start must not stop training
            logger.warning("Energy meter (codecarbon) unavailable, energy is not metered: %r", e)
            self._tracker = None
            return MeterInfo(cpu=f"not metered (codecarbon failed: {e!r:.80})")
        finally:
            quiet.setLevel(logging.ERROR)
            quiet.disabled = False
        info = describe_codecarbon(self._tracker)
        logger.info("Energy meter: CPU %s; GPU %s; RAM %s", info.cpu, info.gpu, info.ram)
        return info

    def read(self) -> EnergyReading:
        tracker = self._tracker
        if tracker is None:
            return EnergyReading()
        with self._lock:
            tracker.flush()  # measures now (no output is configured, so it writes nothing)
            return _totals(tracker)

    def stop(self) -> EnergyReading:
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            return EnergyReading()
        with self._lock:
            tracker.stop()  # a last measurement, then its threads stop
            return _totals(tracker)


def _totals(tracker) -> EnergyReading:
    return EnergyReading(*(kwh * J_PER_KWH for kwh in codecarbon_compat.energy_kwh(tracker)))


def describe_codecarbon(tracker) -> MeterInfo:
    """Which path codecarbon took for each part (codecarbon 3.x's hardware objects)."""
    from codecarbon.external.hardware import CPU, GPU
    from codecarbon.external.ram import RAM

    cpu = gpu = "not metered"
    ram = "not metered"
    for hardware in codecarbon_compat.hardware(tracker):
        if isinstance(hardware, CPU):
            mode = codecarbon_compat.detail(hardware, "mode")
            if mode == "intel_rapl":
                cpu = "RAPL energy counters, whole package (measured)"
            elif mode == "cpu_load":
                generic = " generic" if codecarbon_compat.detail(hardware, "is_generic_tdp", False) else ""
                cpu = f"TDP × load, {codecarbon_compat.detail(hardware, 'tdp')} W{generic} TDP (estimated)"
            elif mode == "constant":
                cpu = f"half of a {codecarbon_compat.detail(hardware, 'tdp')} W TDP (estimated)"
            else:
                cpu = f"{mode} (measured)"
        elif isinstance(hardware, GPU):
            devices = getattr(hardware.devices, "devices", [])
            sampled = any(codecarbon_compat.detail(d, "use_power_fallback", False) for d in devices)
            gpu = "NVML power samples every 1 s (measured)" if sampled else "NVML energy counter (measured)"
        elif isinstance(hardware, RAM):
            ram = "from memory size, codecarbon's model (estimated)"
        else:
            cpu = f"{type(hardware).__name__} (measured)"
    detected = tracker.get_detected_hardware()
    cpu_model, gpu_model = str(detected.get("cpu_model") or "unknown CPU"), str(detected.get("gpu_model") or "")
    return MeterInfo(cpu, gpu, ram, cpu_model, gpu_model)


def start_meter(meter: EnergyMeter) -> MeterInfo:
    """``meter.start()`` that never fails (a meter that cannot start must not stop training).

    Call it on the main thread before the peer forks its DHT and averagers: codecarbon's hardware
    detection runs subprocesses, and a process forked meanwhile would inherit their pipes and keep the
    detection waiting for an end of output that never comes.
    """
    try:
        return meter.start()
    except Exception as e:  # noqa: BLE001
        logger.warning("Energy meter failed to start (%r): energy is not counted", e)
        return MeterInfo(cpu=f"not metered (the meter failed: {e!r:.80})")


def open_meter(spec: str, tracking: str = "process") -> EnergyMeter:
    """``auto``/``codecarbon``, ``none`` or ``fake:<file.json>`` (see the module docstring)."""
    if spec.startswith("fake:"):
        return FakeMeter(Path(spec[5:]).expanduser())
    if spec == "none":
        return NoMeter()
    if spec in ("auto", "codecarbon"):
        return CodecarbonMeter(tracking)
    raise ConfigError(f"energy.meter must be auto, codecarbon, none or fake:<file.json>, got {spec!r}")
