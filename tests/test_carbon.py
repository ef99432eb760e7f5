"""Grid carbon intensity: codecarbon's offline averages, live sources against a fake API on 127.0.0.1, fallbacks."""

from __future__ import annotations

import logging
import socket
import time

import pytest
from conftest import uk_forecast

from p2ptrain.energy.carbon import (
    ForecastPeriod,
    IntensityUnavailable,
    IntensityWatcher,
    UkCarbonIntensity,
    cleanest_cutoff,
    country_average,
    g_co2e,
)
from p2ptrain.energy.ledger import Accountant, Ledger, ledger_path, load_ledger
from p2ptrain.energy.meter import FakeMeter
from p2ptrain.energy.settings import EnergySettings
from p2ptrain.errors import ConfigError

NOW = 1_795_000_000.0 - 1_795_000_000.0 % 1800 + 600  # ten minutes into a half-hour


def test_country_averages_come_from_codecarbons_data_offline():
    france = country_average("FRA")
    assert france == country_average("fr") and france.kind == "country"
    assert 20 < france.g_co2_per_kwh < 150 and "France" in france.source  # a nuclear grid
    assert country_average("POL").g_co2_per_kwh > 500  # a coal grid
    world = country_average("")
    assert world.kind == "world" and world.g_co2_per_kwh == 475.0 and "no energy.country set" in world.source
    with pytest.raises(ConfigError, match="unknown country 'XQZ'"):
        country_average("XQZ")
    assert g_co2e(3.6e6, 250.0) == 250.0  # 1 kWh at 250 g/kWh


def test_gb_carbon_intensity_api_current_half_hour_and_forecast(grid_api):
    start = NOW - 600
    grid_api.answer("/intensity/", uk_forecast(start, [180, 150, 90, 60] + [200] * 44, actual=175))
    got = UkCarbonIntensity(grid_api.url).fetch(5.0, NOW)
    assert got.g_co2_per_kwh == 175 and "actual" in got.source and got.kind == "uk"
    assert len(got.forecast) == 48 and got.forecast[2] == ForecastPeriod(start + 3600, start + 5400, 90.0)
    path = grid_api.requests[0][0]
    assert path.startswith("/intensity/20") and path.endswith("Z/fw24h")  # /intensity/<from ISO 8601>/fw24h
    grid_api.answer("/intensity/", uk_forecast(start, [180, 150]))  # no actual yet: the forecast stands in
    assert UkCarbonIntensity(grid_api.url).fetch(5.0, NOW).g_co2_per_kwh == 180


def test_electricity_maps_sends_the_token_and_does_without_a_forecast_the_plan_lacks(grid_api):
    grid_api.answer("/v3/carbon-intensity/latest", {"zone": "DE", "carbonIntensity": 412, "datetime": "x"})
    grid_api.answer("/v3/carbon-intensity/forecast", {"message": "not in your plan"}, status=403)
    watcher = IntensityWatcher(
        EnergySettings(
            country="DE", intensity_source="electricitymaps", electricitymaps_token="tok", intensity_url=grid_api.url
        )
    )
    first = watcher.refresh()
    assert first.g_co2_per_kwh == 412 and first.kind == "electricitymaps" and first.forecast == ()
    assert grid_api.requests[0] == ("/v3/carbon-intensity/latest?zone=DE", "tok")  # zone from the country
    watcher.refresh()
    assert [p for p, _ in grid_api.requests].count("/v3/carbon-intensity/forecast?zone=DE") == 1  # not asked again
    grid_api.answer("/v3/carbon-intensity/latest", {"error": "bad token"}, status=401)
    assert watcher.refresh().kind == "fallback:country" and "HTTP 401" in watcher.current().source
    with pytest.raises(ConfigError, match="needs your token"):
        IntensityWatcher(EnergySettings(country="DE", intensity_source="electricitymaps"))


@pytest.mark.parametrize(
    "body, message",
    [
        (b"<html>maintenance</html>", "not JSON"),
        ({"data": []}, "no 'data' list"),
        ({"data": [{"from": "2026", "to": "x", "intensity": {"forecast": 100}}]}, "bad time"),
        (uk_forecast(NOW - 600, [-5]), "out of range"),
        (uk_forecast(NOW - 600, [1e9]), "out of range"),
        (uk_forecast(NOW - 600, ["NaN"]), "not a number"),
        (uk_forecast(NOW + 7200, [100]), "does not cover the current half-hour"),
        (b"[" + b"1," * 600_000 + b"1]", "larger than"),
    ],
)
def test_nonsense_from_a_live_source_is_refused(grid_api, body, message):
    grid_api.answer("/intensity/", body)
    with pytest.raises(IntensityUnavailable, match=message):
        UkCarbonIntensity(grid_api.url).fetch(5.0, NOW)


def test_a_source_that_hangs_or_refuses_gives_up_within_its_timeout(grid_api):
    grid_api.hang_s = 10.0
    started = time.monotonic()
    with pytest.raises(IntensityUnavailable, match="no answer within 0.5 s"):
        UkCarbonIntensity(grid_api.url).fetch(0.5, NOW)
    assert time.monotonic() - started < 2.0
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens here once closed
    with pytest.raises(IntensityUnavailable, match="cannot connect"):
        UkCarbonIntensity(f"http://127.0.0.1:{port}").fetch(2.0, NOW)


def test_the_watcher_falls_back_says_so_once_and_recovers(grid_api, caplog):
    grid_api.answer("/intensity/", b"oops", status=503)
    watcher = IntensityWatcher(EnergySettings(country="GB", intensity_source="uk", intensity_url=grid_api.url))
    with caplog.at_level(logging.INFO, logger="p2ptrain.energy.carbon"):
        down = watcher.refresh()
        watcher.refresh()
        now = time.time()
        grid_api.answer("/intensity/", uk_forecast(now - now % 1800, [140, 120]))
        up = watcher.refresh()
    assert down.g_co2_per_kwh == country_average("GBR").g_co2_per_kwh and down.kind == "fallback:country"
    assert "GB Carbon Intensity API unreachable: HTTP 503" in down.source
    assert up.g_co2_per_kwh == 140 and up.kind == "uk"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1 and any("answers again" in m for m in messages)


def test_the_live_source_being_down_never_delays_a_training_step(grid_api, tmp_path):
    """A source that accepts the connection and never answers: steps go on at full speed on the fallback."""
    grid_api.hang_s = 30.0
    settings = EnergySettings(
        country="GB",
        intensity_source="uk",
        intensity_url=grid_api.url,
        intensity_timeout_s=1.0,
        intensity_refresh_s=0.2,
    )
    watcher = IntensityWatcher(settings)
    meter = FakeMeter()
    acc = Accountant(
        ledger_path(tmp_path, "run"), Ledger(run_id="run", peer_id="QmPeer"), meter, watcher.current, every_s=0.1
    )
    watcher.start()
    acc.start()
    acc.set_active(True)
    overheads, started = [], time.monotonic()
    try:
        for step in range(60):  # 60 steps of 25 ms "compute" while every fetch hangs
            time.sleep(0.025)
            t0 = time.perf_counter()
            acc.on_step(8, 512, 0.025)  # all the training thread does for the ledger
            watcher.current()
            overheads.append(time.perf_counter() - t0)
            meter.set(cpu_j=10.0 * step)
        wall = time.monotonic() - started
    finally:
        acc.stop()
        watcher.stop(timeout_s=0.1)
    assert max(overheads) < 0.005, max(overheads)  # µs, never the 1 s fetch timeout
    assert wall < 60 * 0.025 + 0.5
    assert grid_api.requests, "the watcher did try the live source"
    led = load_ledger(ledger_path(tmp_path, "run"))
    assert led.samples == 480 and "GB Carbon Intensity API" in led.intensity_source
    assert "unreachable" in led.intensity_source or "not fetched yet" in led.intensity_source
    assert set(led.kwh_by_source) == {"fallback:country"}  # every joule was priced at the fallback


def test_cleanest_hours_of_a_forecast():
    start = NOW - 600
    values = [300, 100, 50, 200]
    forecast = tuple(ForecastPeriod(start + 1800 * i, start + 1800 * (i + 1), g) for i, g in enumerate(values))
    assert cleanest_cutoff(forecast, NOW, hours=1.0) == 100  # the two cleanest half-hours: 50 and 100
    assert cleanest_cutoff(forecast, NOW, hours=0.5) == 50
    assert cleanest_cutoff(forecast, NOW, hours=24) == 300  # fewer hours of forecast than asked: all of them
    assert cleanest_cutoff(forecast, NOW + 7200 + 1, hours=1) is None  # the forecast has run out
    assert cleanest_cutoff((), NOW, hours=1) is None
