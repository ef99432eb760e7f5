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
