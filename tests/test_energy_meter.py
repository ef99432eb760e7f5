"""The energy meter: the fake one for tests, and codecarbon's real paths on whatever machine runs the suite."""

from __future__ import annotations

import json
import os
import time

import pytest

from p2ptrain.energy_meter import CodecarbonMeter, EnergyReading, FakeMeter, NoMeter, open_meter
from p2ptrain.errors import ConfigError


def test_fake_meter_reads_its_file_on_every_poll(tmp_path):
    path = tmp_path / "joules.json"
    meter = open_meter(f"fake:{path}")
    assert isinstance(meter, FakeMeter) and meter.read() == EnergyReading()  # no file: nothing spent
    path.write_text(json.dumps({"cpu_j": 12.5, "gpu_j": 100, "ram_j": 2.5, "bogus": 9}))
    assert meter.read() == EnergyReading(12.5, 100.0, 2.5) and meter.read().total_j == 115.0
    path.write_text(json.dumps({"cpu_j": "lots", "gpu_j": -5, "ram_j": True}))  # nonsense reads as nothing
    assert meter.read() == EnergyReading()
    assert EnergyReading(10, 5, 1).minus(EnergyReading(4, 6, 1)) == EnergyReading(6, 0, 0)
    assert isinstance(open_meter("none"), NoMeter) and open_meter("none").start().cpu == "not metered"
    with pytest.raises(ConfigError, match="energy.meter must be"):
        open_meter("wattmeter")


RAPL_READABLE = os.access("/sys/class/powercap/intel-rapl/intel-rapl:0/energy_uj", os.R_OK)


def test_codecarbon_meters_this_machine_and_says_how():
    """Real hardware, no fake: RAPL where the kernel exposes it readably, else TDP × load; NVML if there is a GPU."""
    meter = CodecarbonMeter(tracking="process")
    info = meter.start()
    try:
        if RAPL_READABLE:
            assert info.cpu.startswith("RAPL") and info.cpu.endswith("(measured)")
        else:
            assert info.cpu.startswith("TDP × load") and info.cpu.endswith("(estimated)"), info
        assert info.ram.endswith("(estimated)") and info.cpu_model
        assert ("NVML" in info.gpu) == bool(info.gpu_model)
        first = meter.read()
        deadline = time.perf_counter() + 1.0
        while time.perf_counter() < deadline:  # a second of CPU work
            sum(i * i for i in range(10_000))
        started = time.perf_counter()
        second = meter.read()
        read_s = time.perf_counter() - started
    finally:
        final = meter.stop()
    assert second.cpu_j > first.cpu_j and second.ram_j > first.ram_j
    assert final.total_j >= second.total_j
    assert read_s < 0.5  # a reading is cheap (it runs on the ledger's thread every energy.ledger_every_s)
    assert meter.read() == EnergyReading()  # stopped
