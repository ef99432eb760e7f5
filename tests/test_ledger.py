"""The energy ledger: exact sums on a fake meter and a virtual clock, atomic persistence, bounds on every value."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from p2ptrain.energy.carbon import GridIntensity
from p2ptrain.energy.ledger import (
    MAX_HISTORY,
    Accountant,
    Ledger,
    add_history_point,
    ledger_path,
    load_ledger,
    open_ledger,
    save_ledger,
)
from p2ptrain.energy.meter import FakeMeter
from p2ptrain.errors import LedgerInvalid

KWH = 3.6e6  # J
FRANCE = GridIntensity(50.0, "country average for France (test)", "country")
GB_LIVE = GridIntensity(200.0, "GB Carbon Intensity API (test)", "uk")


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def accountant(tmp_path, meter, clock, grid=FRANCE, published=None):
    ledger = Ledger(run_id="run", peer_id="QmPeer", model="gpt2-tiny", model_params=470_528)
    publish = None if published is None else (lambda led: published.append(led.to_dict()) or True)
    acc = Accountant(ledger_path(tmp_path, "run"), ledger, meter, lambda: grid, 10.0, publish, clock)
    acc._last_tick = clock()  # as the thread does once the meter has started
    return acc


def test_ledger_sums_are_exact(tmp_path):
    meter, clock, published = FakeMeter(), Clock(), []
    acc = accountant(tmp_path, meter, clock, published=published)
    acc.set_active(True)
    for step in range(30):  # 30 steps of 8 samples × 64 tokens, 0.25 s of compute each
        acc.on_step(8, 512, 0.25)
        if step % 10 == 9:  # a tick every 10 steps: 10 s, 1 kWh of CPU and 0.5 kWh of GPU more each time
            clock.t += 10.0
            n = (step + 1) // 10
            meter.set(cpu_j=n * KWH, gpu_j=n * KWH / 2, ram_j=n * KWH / 4)
            acc.tick()
    led = load_ledger(ledger_path(tmp_path, "run"))
    assert (led.samples, led.tokens, led.compute_s, led.device_s) == (240, 15_360, 7.5, 30.0)
    assert (led.cpu_j, led.gpu_j, led.ram_j) == (3 * KWH, 1.5 * KWH, 0.75 * KWH)
    assert led.energy_kwh == 5.25 and led.g_co2e == 5.25 * 50.0
    assert led.kwh_by_source == {"country": 5.25} and led.seq == 3 and len(led.history) == 3
    assert led.history[-1] == [clock.t, 5.25 * KWH, 262.5, 15_360.0]
    assert led.intensity_source == FRANCE.source
    assert len(published) == 1  # the first tick publishes; the next are within PUBLISH_EVERY_S


def test_paused_time_and_its_energy_are_not_counted_and_sources_are_summed_apart(tmp_path):
    meter, clock = FakeMeter(), Clock()
    acc = accountant(tmp_path, meter, clock)
    acc.set_active(True)
    clock.t += 2.5
    acc.set_active(False)  # a game starts: paused for the rest of the 10 s tick
    clock.t += 7.5
    meter.set(gpu_j=4 * KWH)
    led = acc.tick()
    assert led.device_s == 2.5 and led.gpu_j == KWH  # a quarter of the interval trained: a quarter of the energy
    acc.set_active(True)
    acc.intensity = lambda: GB_LIVE
    clock.t += 10.0
    meter.set(gpu_j=6 * KWH)  # 2 kWh more, all while training, on the live intensity
    led = acc.tick()
    assert led.device_s == 12.5 and led.gpu_j == 3 * KWH
    assert led.kwh_by_source == {"country": 1.0, "uk": 2.0} and led.g_co2e == 1.0 * 50 + 2.0 * 200


def test_a_restarted_peer_adds_to_its_ledger(tmp_path):
    path = ledger_path(tmp_path, "run")
    first = Ledger(run_id="run", peer_id="QmPeer", samples=10, tokens=640, device_s=5.0, cpu_j=100.0, seq=4)
    save_ledger(path, first)
    again = open_ledger(path, "run", "QmPeer")
    assert again == first
    assert open_ledger(path, "run", "QmOther").samples == 0  # another peer's file is not continued...
    assert [load_ledger(p).peer_id for p in path.parent.glob("ledger.set-aside-*.json")] == ["QmPeer"]  # ...nor lost


def test_the_meter_counter_resetting_counts_nothing_rather_than_negative(tmp_path):
    meter, clock = FakeMeter(), Clock()
    acc = accountant(tmp_path, meter, clock)
    acc.set_active(True)
    clock.t += 10
    meter.set(cpu_j=1000.0)
    acc.tick()
    clock.t += 10
    meter.set(cpu_j=10.0)  # a driver reload reset the counter
    assert acc.tick().cpu_j == 1000.0


WRITER = """
import sys
from pathlib import Path
from p2ptrain.energy.ledger import Ledger, save_ledger
path, n = Path(sys.argv[1]), 0
history = [[1.8e9 + i, float(i), float(i), float(i)] for i in range(200)]  # a large file: a long write
while True:
    n += 1
    save_ledger(path, Ledger(run_id="run", peer_id="QmPeer", seq=n, samples=n, tokens=64 * n, device_s=float(n),
                             cpu_j=float(n), history=history))
    print(n, flush=True)
"""


def test_a_crash_mid_write_keeps_the_previous_ledger(tmp_path):
    """SIGKILL a process that rewrites the ledger as fast as it can: the file is always a whole ledger."""
    path = tmp_path / "ledger.json"
    for attempt in range(8):  # a non-atomic writer is caught by a third of the kills here
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()  # one ledger was written completely
            assert first.strip().isdigit(), first
            time.sleep(0.05 + 0.03 * attempt)  # killed at a different point of some later write
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        led = load_ledger(path)  # raises if the file were half-written
        assert led.seq >= 1 and led.tokens == 64 * led.seq and led.cpu_j == led.seq


def test_a_failed_write_leaves_the_previous_ledger_and_no_temp_file(tmp_path, monkeypatch):
    path = ledger_path(tmp_path, "run")
    save_ledger(path, Ledger(run_id="run", peer_id="QmPeer", samples=1, tokens=64, device_s=1.0))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", disk_full)
    with pytest.raises(OSError):
        save_ledger(path, Ledger(run_id="run", peer_id="QmPeer", samples=2, tokens=128, device_s=2.0))
    monkeypatch.undo()
    assert load_ledger(path).samples == 1
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]


def test_a_damaged_ledger_is_kept_aside_not_lost(tmp_path):
    path = ledger_path(tmp_path, "run")
    path.parent.mkdir(parents=True)
    path.write_text('{"samples": 12, "trunc')
    fresh = open_ledger(path, "run", "QmPeer")
    assert fresh.samples == 0
    kept = list(path.parent.glob("ledger.set-aside-*.json"))
    assert len(kept) == 1 and kept[0].read_text() == '{"samples": 12, "trunc'


def test_history_stays_bounded_and_keeps_the_newest_point():
    led, t = Ledger(run_id="run", peer_id="QmPeer"), 1_800_000_000.0
    for _ in range(3 * MAX_HISTORY):
        t += 1
        led.tokens += 64
        add_history_point(led, t)
    assert len(led.history) <= MAX_HISTORY and led.history[-1] == [t, 0.0, 0.0, float(led.tokens)]
    times = [point[0] for point in led.history]
    assert times == sorted(times) and times[0] < t - 2 * MAX_HISTORY  # still spans the whole run
    Ledger.from_dict(json.loads(json.dumps(led.to_dict())))


def valid() -> dict:
    return Ledger(run_id="r", peer_id="QmPeer", samples=10, tokens=640, device_s=60.0, compute_s=30.0).to_dict()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"samples": -1}, "samples: must be an integer"),
        ({"tokens": 1.5}, "tokens: must be an integer"),
        ({"tokens": True}, "tokens: must be an integer"),
        ({"cpu_j": math.nan}, "cpu_j: must be a finite number"),
        ({"gpu_j": math.inf}, "gpu_j: must be a finite number"),
        ({"g_co2e": -0.1}, "g_co2e: must be a finite number"),
        ({"model": "x" * 1000}, "model: must be text"),
        ({"device": "tpu"}, "device must be cpu or gpu"),
        ({"meter": {"cpu": "ok", "evil": "x"}}, "meter: must map"),
        ({"kwh_by_source": {str(i): 1.0 for i in range(20)}}, "kwh_by_source: must be a map"),
        ({"history": [[1.0, 2.0]]}, "history: points must be"),
        ({"history": [[0.0, 0.0, 0.0, 0.0]] * 1000}, "history: must be a list"),
        ({"version": 99}, "version 99"),
        ({"extra": 1}, "unknown fields"),
        ({"cpu_j": 1e12}, "more than 20000 W"),  # 1 TJ in a minute of training
        ({"tokens": 10**15, "samples": 1}, "impossible"),
        ({"compute_s": 1e7}, "compute_s exceeds"),
    ],
)
def test_impossible_or_malformed_ledgers_are_refused(change, message):
    raw = {**valid(), **change}
    with pytest.raises(LedgerInvalid, match=message):
        Ledger.from_dict(raw)


def test_a_missing_field_is_refused():
    raw = valid()
    del raw["tokens"]
    with pytest.raises(LedgerInvalid, match="lacks"):
        Ledger.from_dict(raw)


def test_a_meter_started_by_the_caller_is_described_in_the_ledger(tmp_path):
    """The peer starts the meter before it forks and hands the accountant what start() said."""
    meter = FakeMeter()
    info = meter.start()
    meter.set(cpu_j=5.0)
    ledger = Ledger(run_id="run", peer_id="QmPeer", model="gpt2-tiny", model_params=470_528)
    clock = Clock()
    acc = Accountant(ledger_path(tmp_path, "run"), ledger, meter, lambda: FRANCE, 3600.0, clock=clock, started=info)
    acc.start()
    try:
        assert acc.wait_started(10)
        assert acc.info is info and ledger.meter == info.as_dict() and ledger.cpu_model == "fake CPU"
        acc.set_active(True)
        clock.t += 10.0
        meter.set(cpu_j=15.0)
        assert acc.tick().cpu_j == 10.0  # counted from the reading at start, not from zero
    finally:
        acc.stop()
