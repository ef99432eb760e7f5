"""The energy meter: the fake one for tests, and codecarbon's real paths on whatever machine runs the suite."""

from __future__ import annotations

import json
import os
import time

import pytest

from p2ptrain.energy.meter import CodecarbonMeter, EnergyReading, FakeMeter, NoMeter, open_meter
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


def test_the_cpu_model_comes_from_proc_cpuinfo_as_py_cpuinfo_finds_it(tmp_path, monkeypatch):
    """codecarbon's CPU model (its TDP table's key) read from /proc/cpuinfo is py-cpuinfo's own answer, without
    py-cpuinfo's second interpreter; a file that names no model leaves py-cpuinfo in charge. (A meter started
    earlier in this process has already made the change: py-cpuinfo's own answer is its JSON, which it leaves.)"""
    import json

    import cpuinfo

    from p2ptrain.compat.codecarbon import read_cpu_model_from_proc

    original = cpuinfo.get_cpu_info
    monkeypatch.setattr(cpuinfo, "get_cpu_info", original)  # restored after the test, whatever it patches
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n")
    read_cpu_model_from_proc(str(tmp_path / "arm"))
    assert cpuinfo.get_cpu_info is original
    if "model name" not in open("/proc/cpuinfo").read():
        pytest.skip("this machine's /proc/cpuinfo names no model")
    read_cpu_model_from_proc()
    started = time.perf_counter()
    fast = cpuinfo.get_cpu_info()["brand_raw"]
    assert time.perf_counter() - started < 0.1
    assert fast and fast == json.loads(cpuinfo.get_cpu_info_json())["brand_raw"]


FAKE_NVML = """
import sys, time, types
mode = sys.argv[1]  # "counter": the GPU has NVML's energy counter; "power": only its power draw
T0, WATTS = time.monotonic(), 250.0
nvml = types.ModuleType("pynvml")
class NVMLError(Exception): pass
class NVMLError_NotSupported(NVMLError): pass
def energy_mj(handle):
    if mode != "counter":
        raise NVMLError_NotSupported("Not Supported")
    return int((time.monotonic() - T0) * WATTS * 1000)
nvml.__dict__.update(
    NVMLError=NVMLError, NVMLError_NotSupported=NVMLError_NotSupported, NVML_TEMPERATURE_GPU=0,
    c_nvmlMemory_t=lambda *a: types.SimpleNamespace(total=a[0], free=a[1], used=a[2]),
    nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
    nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetTotalEnergyConsumption=energy_mj,
    nvmlDeviceGetPowerUsage=lambda h: int(WATTS * 1000), nvmlDeviceGetName=lambda h: "Fake GeForce RTX 4090",
    nvmlDeviceGetUUID=lambda h: "GPU-00000000-fake", nvmlDeviceGetEnforcedPowerLimit=lambda h: 450000,
    nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=24 << 30, free=20 << 30, used=4 << 30),
    nvmlDeviceGetTemperature=lambda h, sensor: 60, nvmlDeviceGetComputeMode=lambda h: 0,
    nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97, memory=40),
    nvmlDeviceGetComputeRunningProcesses=lambda h: [], nvmlDeviceGetGraphicsRunningProcesses=lambda h: [],
)
sys.modules["pynvml"] = nvml
import json
from p2ptrain.energy.meter import CodecarbonMeter
meter = CodecarbonMeter()
info = meter.start()
t0 = time.monotonic()
first = meter.read()  # it measures somewhere between t0 and t1 (a first reading may take a second)
t1 = time.monotonic()
time.sleep(2.0)
t2 = time.monotonic()
second = meter.read()
t3 = time.monotonic()
print(json.dumps({"gpu": info.gpu, "gpu_model": info.gpu_model, "gpu_j": second.gpu_j - first.gpu_j,
                  "shortest_s": t2 - t1, "longest_s": t3 - t0}))
meter.stop()
"""


@pytest.mark.parametrize("mode, path", [("counter", "NVML energy counter"), ("power", "NVML power samples")])
def test_gpu_energy_through_a_fake_nvml(tmp_path, mode, path):
    """No GPU here: NVML is faked (a 250 W GPU, with or without the energy counter); codecarbon and our meter
    are real, in a fresh process (codecarbon detects hardware once per process)."""
    import subprocess
    import sys

    smi = tmp_path / "nvidia-smi"  # codecarbon asks nvidia-smi whether this is an NVIDIA machine
    smi.write_text("#!/bin/sh\nexit 0\n")
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-c", FAKE_NVML, mode], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["gpu"].startswith(path) and got["gpu"].endswith("(measured)")
    assert "Fake GeForce RTX 4090" in got["gpu_model"]
    # 250 W × the seconds between the two measurements (±10% for the 1 s power samples' timing)
    assert 0.9 * 250.0 * got["shortest_s"] <= got["gpu_j"] <= 1.1 * 250.0 * got["longest_s"], got
