"""The idle policy on a virtual clock (carbon-aware mode included), the gate the trainer passes through, the sensors."""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import threading
import time

import pytest
import torch

from p2ptrain.energy.carbon import ForecastPeriod, GridIntensity
from p2ptrain.errors import ConfigError
from p2ptrain.gate import Gate, Verdict
from p2ptrain.volunteer.daemon import describe_policy
from p2ptrain.volunteer.idle_policy import IdlePolicy, IdleSettings, Traffic, in_schedule
from p2ptrain.volunteer.sensors import FakeSensor, GpuProcess, MachineFacts, TrafficMeter, open_sensor

NOON = dt.datetime(2026, 11, 23, 12, 0)
OURS = {100, 101}
GAME = GpuProcess(4242, "game.exe", 3000.0)


def facts(*processes: GpuProcess, **kwargs) -> MachineFacts:
    return MachineFacts(gpu_processes=processes, **kwargs)


def test_a_game_pauses_at_once_and_training_resumes_after_the_quiet_period():
    policy = IdlePolicy(IdleSettings(quiet_period_s=60))
    assert policy.decide(0.0, NOON, facts(GpuProcess(100, "python", 2000)), OURS).run  # our own GPU context
    paused = policy.decide(1.0, NOON, facts(GAME), OURS)
    assert not paused.run and "game.exe (pid 4242)" in paused.reasons[0]
    assert not policy.decide(30.0, NOON, facts(GAME), OURS).run  # still playing
    quiet = policy.decide(31.0, NOON, facts(), OURS)  # the game has exited: wait for the quiet period
    assert not quiet.run and "quiet for 1 s of 60 s" in quiet.reasons[0]
    assert not policy.decide(89.9, NOON, facts(), OURS).run
    assert policy.decide(90.0, NOON, facts(), OURS).run  # 60 s after the game was last seen
    assert not policy.decide(91.0, NOON, facts(GAME), OURS).run  # and again for the next game


def test_desktop_and_small_gpu_processes_do_not_count_as_a_game():
    policy = IdlePolicy(IdleSettings(foreign_min_mb=256))
    desktop = (GpuProcess(1, "Xorg", 900), GpuProcess(2, "firefox", 120))
    assert policy.decide(0.0, NOON, facts(*desktop), OURS).run
    assert (
        not IdlePolicy(IdleSettings(foreign_min_mb=0, ignore_processes=())).decide(0, NOON, facts(*desktop), OURS).run
    )
    assert IdlePolicy(IdleSettings(pause_on_gpu_process=False)).decide(0.0, NOON, facts(GAME), OURS).run


def test_where_processes_are_not_listed_memory_held_by_others_pauses():
    policy = IdlePolicy(IdleSettings(foreign_memory_mb=1500, quiet_period_s=10))
    assert policy.decide(0, NOON, facts(memory_used_mb=3000), OURS, own_gpu_mb=2000).run  # 1000 MB: the desktop
    verdict = policy.decide(1, NOON, facts(memory_used_mb=6000), OURS, own_gpu_mb=2000)
    assert not verdict.run and verdict.reasons == ("other programs hold 4000 MB of GPU memory",)
    assert not policy.decide(2, NOON, facts(memory_used_mb=3000), OURS, own_gpu_mb=2000).run  # quiet period
    assert policy.decide(11, NOON, facts(memory_used_mb=3000), OURS, own_gpu_mb=2000).run


@pytest.mark.parametrize(
    "hhmm, windows, inside",
    [
        ("00:59", ("01:00-08:00",), False),
        ("01:00", ("01:00-08:00",), True),
        ("07:59", ("01:00-08:00",), True),
        ("08:00", ("01:00-08:00",), False),  # the end is exclusive
        ("23:30", ("22:00-06:00",), True),  # a window across midnight
        ("05:59", ("22:00-06:00",), True),
        ("06:00", ("22:00-06:00",), False),
        ("12:30", ("01:00-08:00", "12:00-13:00"), True),
        ("23:59", ("00:00-24:00",), True),
    ],
)
def test_schedule_boundaries(hhmm, windows, inside):
    hour, minute = map(int, hhmm.split(":"))
    assert in_schedule(dt.datetime(2026, 1, 1, hour, minute), windows) is inside
    verdict = IdlePolicy(IdleSettings(schedule=windows)).decide(
        0.0, dt.datetime(2026, 1, 1, hour, minute), facts(), OURS
    )
    assert verdict.run is inside
    assert inside or "outside the schedule" in verdict.reasons[0]


@pytest.mark.parametrize("bad", ["1:00-08:00", "01:00-25:00", "08:00", "01:60-02:00"])
def test_a_malformed_schedule_is_refused_with_its_value(bad):
    with pytest.raises(ConfigError, match=bad):
        IdleSettings(schedule=(bad,))


def test_temperature_pauses_above_the_limit_until_it_has_cooled_by_the_hysteresis():
    policy = IdlePolicy(IdleSettings(max_gpu_temperature_c=80))
    assert policy.decide(0, NOON, facts(temperature_c=79), OURS).run
    assert not policy.decide(1, NOON, facts(temperature_c=80), OURS).run
    assert not policy.decide(2, NOON, facts(temperature_c=76), OURS).run  # not cool enough yet
    assert policy.decide(3, NOON, facts(temperature_c=75), OURS).run


def test_battery_and_a_manual_pause_are_reasons_too():
    policy = IdlePolicy(IdleSettings())
    verdict = policy.decide(0, NOON, facts(on_battery=True), OURS, manual="seat 12 taken")
    assert verdict.reasons == ("paused by hand (seat 12 taken)", "on battery")
    assert IdlePolicy(IdleSettings(pause_on_battery=False)).decide(0, NOON, facts(on_battery=True), OURS).run


def test_a_power_cap_the_driver_refused_throttles_the_duty_cycle_and_recovers():
    policy = IdlePolicy(IdleSettings(gpu_power_limit_w=150), power_limit_applied=False)
    hot = policy.decide(0, NOON, facts(power_w=300), OURS)
    assert hot.run and hot.duty == pytest.approx(0.5) and "GPU power 300 W" in hot.notes[0]
    assert policy.decide(1, NOON, facts(power_w=200), OURS).duty == pytest.approx(0.375)
    duties = [policy.decide(2 + i, NOON, facts(power_w=140), OURS).duty for i in range(20)]
    assert duties == sorted(duties) and duties[-1] == 1.0  # under the cap: back to full speed, gradually
    capped = IdlePolicy(IdleSettings(gpu_power_limit_w=150), power_limit_applied=True)  # NVML holds the cap
    assert capped.decide(0, NOON, facts(power_w=300), OURS).duty == 1.0


def test_bandwidth_caps_throttle_by_the_worst_overshoot():
    policy = IdlePolicy(IdleSettings(max_upload_mbit=10, max_download_mbit=40))
    verdict = policy.decide(0, NOON, facts(), OURS, Traffic(upload_mbit=20, download_mbit=50))
    assert verdict.duty == pytest.approx(0.5) and len(verdict.notes) == 2
    assert policy.decide(1, NOON, facts(), OURS, Traffic(1000, 1000)).duty == pytest.approx(0.05)  # the floor


def test_gate_blocks_while_paused_and_calls_the_hooks_around_the_pause():
    gate, stop, calls = Gate(), threading.Event(), []
    gate.set(Verdict(False, ("another program uses the GPU",)))
    thread = threading.Thread(
        target=gate.pass_through, args=(stop, lambda v: calls.append(("pause", v.reasons)), calls.append)
    )
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and calls == [("pause", ("another program uses the GPU",))]
    gate.set(Verdict(True))
    thread.join(2.0)
    assert not thread.is_alive() and len(calls) == 2 and calls[1] >= 0.3  # resumed, told how long it paused


def test_gate_returns_on_stop_without_resuming():
    gate, stop, calls = Gate(), threading.Event(), []
    gate.set(Verdict(False, ("x",)))
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    gate.pass_through(stop, lambda v: calls.append("pause"), lambda s: calls.append("resume"))
    assert calls == ["pause"] and time.monotonic() - started < 2.0


def test_gate_rests_the_duty_cycles_share_after_a_step():
    gate, stop = Gate(), threading.Event()
    assert gate.rest(0.1, stop) == 0.0
    gate.set(Verdict(True, duty=0.25))
    started = time.monotonic()
    assert gate.rest(0.1, stop) == pytest.approx(0.3)
    assert time.monotonic() - started >= 0.29


def test_fake_sensor_reads_its_file_on_every_poll(tmp_path):
    path = tmp_path / "gpu.json"
    sensor = open_sensor(f"fake:{path}")
    assert sensor.read() == MachineFacts()  # no file: an idle machine
    path.write_text(json.dumps({"processes": [{"pid": 7, "name": "game", "used_mb": 3000}], "temperature_c": 70}))
    read = sensor.read()
    assert read.gpu_processes == (GpuProcess(7, "game", 3000.0),) and read.temperature_c == 70.0
    assert read.foreign_processes({7}) == []
    assert not sensor.set_power_limit(100)
    path.write_text(json.dumps({"power_limit_settable": True}))
    assert sensor.set_power_limit(100) and isinstance(sensor, FakeSensor) and sensor.power_limit_w == 100


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without an NVIDIA GPU")
def test_no_gpu_means_no_gpu_facts_and_nvml_by_name_says_why():
    assert open_sensor("auto").read().gpu_processes == ()  # this machine has no NVIDIA GPU
    with pytest.raises(ConfigError, match="gpu_sensor nvml"):
        open_sensor("nvml")


def test_traffic_meter_counts_this_process_tcp_bytes_both_ways():
    meter = TrafficMeter(window_s=30)
    if not meter.available:
        pytest.skip("ss (iproute2) is not installed")
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    try:
        assert meter.rates(0.0, {os.getpid()}) is None  # the first sample
        payload = b"x" * 2_000_000
        sender = threading.Thread(target=client.sendall, args=(payload,))
        sender.start()
        received = 0
        while received < len(payload):
            received += len(conn.recv(1 << 20))
        sender.join()
        up, down = meter.rates(1.0, {os.getpid()})  # both ends are ours: 2 MB each way in "1 s"
        # at least the 16 Mbit each way; the worker's other TCP connections (DHT nodes of earlier tests in this
        # process) may add some (CI: 17.05), never a second copy of the payload (32)
        assert 16.0 <= up <= 20.0 and 16.0 <= down <= 20.0
    finally:
        for s in (client, conn, server):
            s.close()


# -- carbon-aware mode --------------------------------------------------------------------------------


def grid(g: float, forecast=()) -> GridIntensity:
    return GridIntensity(g, "fake intensity series", "uk", tuple(forecast))


def test_carbon_aware_mode_pauses_above_the_limit_and_resumes_below_it():
    policy = IdlePolicy(IdleSettings(max_grid_g_co2_per_kwh=250))
    series = [180, 240, 250, 310, 420, 260, 200, 90]  # g CO2e/kWh, one value per 15 minutes
    runs = [policy.decide(900.0 * i, NOON, facts(), OURS, grid=grid(g)).run for i, g in enumerate(series)]
    assert runs == [True, True, True, False, False, False, True, True]
    paused = policy.decide(0, NOON, facts(), OURS, grid=grid(420))
    assert paused.reasons == ("grid at 420 g CO2e/kWh, above 250 (fake intensity series)",)
    assert IdlePolicy(IdleSettings()).decide(0, NOON, facts(), OURS, grid=grid(2000)).run  # off by default


def test_carbon_aware_mode_trains_in_the_cleanest_hours_of_the_forecast():
    start = dt.datetime(2026, 11, 23, 0, 0).timestamp()
    values = [300, 280, 120, 90, 100, 250, 400, 410] + [350] * 40  # 48 half-hours
    forecast = [ForecastPeriod(start + 1800 * i, start + 1800 * (i + 1), g) for i, g in enumerate(values)]
    policy = IdlePolicy(IdleSettings(cleanest_hours=1.5))  # the three cleanest half-hours: 90, 100, 120
    runs = []
    for i in range(8):
        now = start + 1800 * i + 60
        window = [p for p in forecast if p.end > now]  # the source's forecast always starts at the current period
        verdict = policy.decide(i, dt.datetime.fromtimestamp(now), facts(), OURS, grid=grid(values[i], window))
        runs.append(verdict.run)
    # 120 and 90 are among the three cleanest of the next 24 h; once the trough has begun to pass, the window rolls
    # on: at 100 and at 250 the cleanest three still ahead are 100/250/350 and 250/350/350; 400 and 410 never are
    assert runs == [False, False, True, True, True, True, False, False]
    out = policy.decide(0, dt.datetime.fromtimestamp(start + 60), facts(), OURS, grid=grid(300, forecast))
    assert out.reasons[0].startswith("not among the 1.5 cleanest hours of the forecast: 300 g CO2e/kWh now, those")
    # no forecast (a yearly average, or a source without one): this rule cannot apply and does not pause
    assert policy.decide(0, NOON, facts(), OURS, grid=grid(300)).run


def test_the_daemon_pauses_and_resumes_the_trainer_on_a_fake_intensity_series(tmp_path):
    """The daemon's watcher step, a real Gate and a 'trainer' thread passing through it: the idle mechanism."""
    from p2ptrain.settings import PeerSettings
    from p2ptrain.volunteer.config import build_config
    from p2ptrain.volunteer.daemon import VolunteerDaemon

    class Series:  # what IntensityWatcher.current() would return, one value per call
        def __init__(self, values):
            self.values = list(values)

        def current(self) -> GridIntensity:
            return grid(self.values.pop(0) if len(self.values) > 1 else self.values[0])

    config = build_config({"idle": {"max_grid_g_co2_per_kwh": 300.0, "gpu_sensor": f"fake:{tmp_path / 'gpu.json'}"}})
    daemon = VolunteerDaemon(config, PeerSettings(data_dir=tmp_path), threading.Event())
    daemon.sensor, daemon.intensity = open_sensor(config.idle.gpu_sensor), Series([200, 350, 420, 280])
    policy = IdlePolicy(config.idle)
    calls, stop = [], threading.Event()

    def trainer() -> None:
        while not stop.is_set():
            daemon.gate.pass_through(
                stop, lambda v: calls.append(("pause", v.reasons[0])), lambda s: calls.append("resume")
            )
            stop.wait(0.02)

    thread = threading.Thread(target=trainer)
    try:
        daemon._decide(policy)  # 200: train
        thread.start()
        daemon._decide(policy)  # 350: pause
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        daemon._decide(policy)  # 420: still paused
        daemon._decide(policy)  # 280: resume
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        stop.set()
        thread.join(5)
    assert calls == [("pause", "grid at 350 g CO2e/kWh, above 300 (fake intensity series)"), "resume"]
    assert [e["event"] for e in daemon.events] == ["pause", "resume"]
    assert "pause above 300 g CO2e/kWh" in describe_policy(config.idle)


def test_carbon_settings_are_checked():
    with pytest.raises(ConfigError, match="max_grid_g_co2_per_kwh"):
        IdleSettings(max_grid_g_co2_per_kwh=-1)
    with pytest.raises(ConfigError, match="cleanest_hours"):
        IdleSettings(cleanest_hours=25)
