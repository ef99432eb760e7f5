"""codecarbon 3.x's private names the energy meter reads: the tracker's energy totals and its hardware objects.

codecarbon measures energy but publishes it only as emissions files; p2ptrain reads its running totals instead
(``energy.meter``). pyproject.toml pins the major version; a hardware object without an attribute reads as
``default``.
"""

from __future__ import annotations

from typing import Any


def energy_kwh(tracker: Any) -> tuple[float, float, float]:
    """kWh the tracker has counted so far for (CPU, GPU, RAM)."""
    return tracker._total_cpu_energy.kWh, tracker._total_gpu_energy.kWh, tracker._total_ram_energy.kWh


def hardware(tracker: Any) -> list[Any]:
    """The tracker's hardware objects (``codecarbon.external.hardware.CPU``, ``GPU``, ``ram.RAM``)."""
    return list(tracker._hardware)


def detail(part: Any, name: str, default: Any = "?") -> Any:
    """A hardware object's private setting: ``mode``, ``tdp``, ``is_generic_tdp``, ``use_power_fallback``."""
    return getattr(part, "_" + name, default)


def read_cpu_model_from_proc(cpuinfo_path: str = "/proc/cpuinfo") -> None:
    """Make codecarbon's CPU detection read the model name from ``/proc/cpuinfo`` where it names one (x86 Linux).

    codecarbon asks py-cpuinfo (``codecarbon.core.util.detect_cpu_model``), which runs a second Python interpreter
    to probe CPUID: ~1.3 s of CPU at every peer's start, for the same string the kernel already shows. Only
    ``brand_raw`` is read from its answer. Elsewhere (no such line: ARM, macOS, Windows) py-cpuinfo stays as it is.
    """
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return
    if model:
        import cpuinfo

        cpuinfo.get_cpu_info = lambda: {"brand_raw": model}
