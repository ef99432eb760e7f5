"""Grid carbon intensity: what one kWh drawn here emits (g CO2e/kWh). Offline by default, live where asked.

Sources (``energy.intensity_source``):

- ``country`` (default, offline): the yearly per-country average shipped by codecarbon
  (``global_energy_mix.json``: Our World in Data / Ember electricity data, g CO2e/kWh); with no
  ``energy.country`` set, the world average codecarbon uses (475 g/kWh, IEA 2019);
- ``uk``: National Grid ESO's Carbon Intensity API for Great Britain (no key): the current half-hour
  and a 24-hour forecast (``GET /intensity/<now>/fw24h``);
- ``electricitymaps``: Electricity Maps (``GET /v3/carbon-intensity/latest?zone=…`` with the user's
  ``auth-token``), and its forecast where the user's plan includes it.

A live source is fetched by ``IntensityWatcher`` on its own thread, every ``intensity_refresh_s``,
each fetch bounded as a whole by ``intensity_timeout_s`` and by ``MAX_RESPONSE_BYTES``. Readers (the
ledger's accountant, the idle policy) take the latest value without waiting. When the source cannot
be reached or answers nonsense, the country average stands in and says so: its ``source`` label
("… (GB Carbon Intensity API unreachable: …)") reaches the ledger, `status` and the report.

    g CO2e = energy (kWh) × intensity (g CO2e/kWh),   1 kWh = 3.6e6 J
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from p2ptrain.energy.settings import EnergySettings
from p2ptrain.errors import ConfigError, P2PTrainError

logger = logging.getLogger(__name__)
J_PER_KWH = 3.6e6
MAX_G_CO2_PER_KWH = 3000.0  # the dirtiest grids are ~1300; above this a source's number is nonsense
MAX_RESPONSE_BYTES = 1 << 20  # a live source's answer is a few KB
MAX_FORECAST_PERIODS = 200  # GB's 24 h forecast is 48 half-hours; Electricity Maps' is ≤ 72 hours


class IntensityUnavailable(P2PTrainError):
    """A live intensity source could not be reached or gave no usable value."""


@dataclass(frozen=True)
class ForecastPeriod:
    start: float  # unix seconds
    end: float
    g_co2_per_kwh: float


@dataclass(frozen=True)
class GridIntensity:
    g_co2_per_kwh: float
    source: str  # for people: "country average for France (FRA, 2023, codecarbon)", "GB Carbon Intensity API (…)"
    kind: str  # for the ledger's per-source sums: "country", "world", "uk", "electricitymaps"; "fallback:<source>"
    forecast: tuple[ForecastPeriod, ...] = ()  # from now on, where the source gives one
    at: float = 0.0  # unix time the value is for (0 for yearly averages)


def g_co2e(energy_j: float, g_co2_per_kwh: float) -> float:
    """Emissions of ``energy_j`` joules drawn from a grid at ``g_co2_per_kwh``: kWh × g/kWh."""
    return energy_j / J_PER_KWH * g_co2_per_kwh


# -- the offline per-country average (codecarbon's data) ---------------------------------------------


@functools.lru_cache(maxsize=1)
def _energy_mix() -> tuple[dict[str, Any], float]:
    """codecarbon's per-country data and its world average (g CO2e/kWh); read once, no network."""
    from codecarbon.input import DataSource

    source = DataSource()
    world = float(source.get_carbon_intensity_per_source_data()["world_average"])
    return source.get_global_energy_mix_data(), world


def alpha3(country: str) -> str:
    """ISO 3166 alpha-3 of ``country`` (alpha-2 or alpha-3, any case). Raises ConfigError for an unknown code."""
    import pycountry

    code = country.strip().upper()
    found = pycountry.countries.get(alpha_2=code) if len(code) == 2 else pycountry.countries.get(alpha_3=code)
    if found is None:
        raise ConfigError(f"unknown country {country!r} (energy.country / --country): use an ISO 3166 code like FRA")
    return found.alpha_3


def country_average(country: str) -> GridIntensity:
    """The yearly average intensity of ``country``'s grid, or the world average where it is unknown or unset."""
    data, world = _energy_mix()
    if not country:
        return GridIntensity(world, f"world average {world:.0f} g/kWh (no energy.country set; IEA 2019)", "world")
    code = alpha3(country)
    entry = data.get(code) or {}
    value = entry.get("carbon_intensity")
    if not isinstance(value, (int, float)) or not 0 < value <= MAX_G_CO2_PER_KWH:
        return GridIntensity(world, f"world average {world:.0f} g/kWh (codecarbon has no data for {code})", "world")
    name, year = entry.get("country_name", code), entry.get("year", "?")
    return GridIntensity(float(value), f"country average for {name} ({code}, {year}, codecarbon data)", "country")


def cleanest_cutoff(forecast: tuple[ForecastPeriod, ...], now: float, hours: float) -> float | None:
    """The intensity at or below which lie the ``hours`` cleanest hours of the next 24 h of ``forecast``.

    None when the forecast does not cover ``now`` (no forecast, or a stale one)."""
    window = [p for p in forecast if p.end > now and p.start < now + 24 * 3600]
    if not window or not window[0].start <= now < window[0].end:
        return None
    by_intensity = sorted(window, key=lambda p: p.g_co2_per_kwh)
    covered = 0.0
    for period in by_intensity:
        covered += (period.end - period.start) / 3600
        if covered >= hours:
            return period.g_co2_per_kwh
    return by_intensity[-1].g_co2_per_kwh  # fewer hours of forecast than asked: all of them


def current_period(forecast: tuple[ForecastPeriod, ...], now: float) -> ForecastPeriod | None:
    return next((p for p in forecast if p.start <= now < p.end), None)


# -- live sources -----------------------------------------------------------------------------------


def get_json(url: str, timeout_s: float, params: dict | None = None, headers: dict | None = None) -> Any:
    """GET ``url`` and parse its JSON, within ``timeout_s`` overall and ``MAX_RESPONSE_BYTES``.

    Raises:
        IntensityUnavailable: unreachable, too slow, an HTTP error, too large, or not JSON.
    """
    import requests

    deadline = time.monotonic() + timeout_s
    try:
        with requests.get(url, params=params, headers=headers, timeout=timeout_s, stream=True) as resp:
            if resp.status_code != 200:
                raise IntensityUnavailable(f"HTTP {resp.status_code} from {resp.url.split('?')[0]}")
            body = b""
            for chunk in resp.iter_content(64 * 1024):
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise IntensityUnavailable(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
                if time.monotonic() > deadline:
                    raise IntensityUnavailable(f"no complete answer within {timeout_s:g} s")
    except requests.Timeout:
        raise IntensityUnavailable(f"no answer within {timeout_s:g} s") from None
    except requests.ConnectionError as e:
        reason = getattr(e.args[0], "reason", None) if e.args else None
        raise IntensityUnavailable(f"cannot connect ({reason or type(e).__name__})") from None
    except requests.RequestException as e:
        raise IntensityUnavailable(f"request failed ({type(e).__name__})") from None
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise IntensityUnavailable("the answer is not JSON") from None


def _intensity(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise IntensityUnavailable(f"{what} is not a number: {value!r:.40}")
    if not 0 <= value <= MAX_G_CO2_PER_KWH:
        raise IntensityUnavailable(f"{what} {value} g/kWh is out of range [0, {MAX_G_CO2_PER_KWH:g}]")
    return float(value)


def _time(text: Any) -> float:
    if not isinstance(text, str) or len(text) > 40:
        raise IntensityUnavailable(f"bad time {text!r:.40}")
    try:  # "2026-11-23T12:00Z" (GB) or "2026-11-23T12:00:00.000Z" (Electricity Maps); 3.10 reads no "Z"
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise IntensityUnavailable(f"bad time {text!r}") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()


class UkCarbonIntensity:
    """GB's national carbon intensity (National Grid ESO, carbonintensity.org.uk): half-hours, 24 h forecast."""

    name = "GB Carbon Intensity API"
    kind = "uk"
    URL = "https://api.carbonintensity.org.uk"

    def __init__(self, base_url: str = ""):
        self.base_url = (base_url or self.URL).rstrip("/")

    def fetch(self, timeout_s: float, now: float) -> GridIntensity:
        start = dt.datetime.fromtimestamp(now - now % 1800, dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
        body = get_json(f"{self.base_url}/intensity/{start}/fw24h", timeout_s)
        rows = body.get("data") if isinstance(body, dict) else None
        if not isinstance(rows, list) or not rows:
            raise IntensityUnavailable("the answer has no 'data' list")
        forecast, actual = [], None
        for row in rows[:MAX_FORECAST_PERIODS]:
            if not isinstance(row, dict) or not isinstance(row.get("intensity"), dict):
                raise IntensityUnavailable("a period of the answer is malformed")
            period = ForecastPeriod(
                _time(row.get("from")), _time(row.get("to")), _intensity(row["intensity"].get("forecast"), "forecast")
            )
            if period.start <= now < period.end and row["intensity"].get("actual") is not None:
                actual = _intensity(row["intensity"]["actual"], "actual")
            forecast.append(period)
        forecast.sort(key=lambda p: p.start)
        current = current_period(tuple(forecast), now)
        if current is None:
            raise IntensityUnavailable("the answer does not cover the current half-hour")
        value, what = (actual, "actual") if actual is not None else (current.g_co2_per_kwh, "forecast")
        return GridIntensity(value, f"{self.name} ({what} for this half-hour)", self.kind, tuple(forecast), now)


class ElectricityMaps:
    """Electricity Maps' latest intensity for a zone (the user's token), and its forecast where the plan has one."""

    name = "Electricity Maps API"
    kind = "electricitymaps"
    URL = "https://api.electricitymaps.com"

    def __init__(self, token: str, zone: str, base_url: str = ""):
        self.base_url, self.zone = (base_url or self.URL).rstrip("/"), zone
        self._headers = {"auth-token": token}
        self._forecast_refused = False  # the plan has no forecast: do not ask again

    def fetch(self, timeout_s: float, now: float) -> GridIntensity:
        started = time.monotonic()
        params = {"zone": self.zone}
        body = get_json(f"{self.base_url}/v3/carbon-intensity/latest", timeout_s, params, self._headers)
        if not isinstance(body, dict):
            raise IntensityUnavailable("the answer is not a JSON object")
        value = _intensity(body.get("carbonIntensity"), "carbonIntensity")
        forecast: list[ForecastPeriod] = []
        left_s = timeout_s - (time.monotonic() - started)
        if not self._forecast_refused and left_s > 0.1:
            try:
                answer = get_json(f"{self.base_url}/v3/carbon-intensity/forecast", left_s, params, self._headers)
                for row in (answer.get("forecast") or [])[:MAX_FORECAST_PERIODS]:
                    start = _time(row.get("datetime"))  # hourly values
                    forecast.append(ForecastPeriod(start, start + 3600, _intensity(row.get("carbonIntensity"), "")))
            except (IntensityUnavailable, AttributeError, TypeError) as e:
                self._forecast_refused = "HTTP 4" in str(e)
                logger.debug("No Electricity Maps forecast for %s: %s", self.zone, e)
                forecast = []
        return GridIntensity(value, f"{self.name} (zone {self.zone})", self.kind, tuple(forecast), now)


def live_source(settings: EnergySettings) -> UkCarbonIntensity | ElectricityMaps | None:
    if settings.intensity_source == "uk":
        return UkCarbonIntensity(settings.intensity_url)
    if settings.intensity_source == "electricitymaps":
        if not settings.electricitymaps_token:
            raise ConfigError(
                "intensity_source electricitymaps needs your token: p2ptrain config set energy.electricitymaps_token …"
                " (or P2PTRAIN_ELECTRICITYMAPS_TOKEN)"
            )
        zone = settings.electricitymaps_zone or (_alpha2(settings.country) if settings.country else "")
        if not zone:
            raise ConfigError("intensity_source electricitymaps needs energy.country or energy.electricitymaps_zone")
        return ElectricityMaps(settings.electricitymaps_token, zone, settings.intensity_url)
    return None


def _alpha2(country: str) -> str:
    import pycountry

    return pycountry.countries.get(alpha_3=alpha3(country)).alpha_2


# -- the watcher: live values off the training thread -----------------------------------------------


class IntensityWatcher:
    """The current grid intensity for this machine; fetches a live source on its own thread (owned by the peer
    or the daemon: ``start``/``stop``). ``current()`` never waits."""

    def __init__(self, settings: EnergySettings, clock: Callable[[], float] = time.time):
        self.settings, self._clock = settings, clock
        self.fallback = country_average(settings.country)  # also validates the country, at start-up
        self.source = live_source(settings)
        self._current = self.fallback
        self._down: str | None = None  # why the live source is unreachable, while it is
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def current(self) -> GridIntensity:
        return self._current

    def start(self) -> None:
        if self.source is None or self._thread is not None:
            return
        # the first value is the fallback, until the first fetch answers (a slow source never holds training)
        self._current = self._fallen_back("not fetched yet")
        self._thread = threading.Thread(target=self._run, name="grid-intensity", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)  # a fetch in flight ends within its own timeout; nobody waits for it

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.settings.intensity_refresh_s)

    def refresh(self) -> GridIntensity:
        """Fetch the live source once (on the caller's thread); on failure use the fallback and say why."""
        if self.source is None:
            return self._current
        try:
            value = self.source.fetch(self.settings.intensity_timeout_s, self._clock())
        except IntensityUnavailable as e:
            if self._down is None:
                logger.warning(
                    "%s unreachable (%s): using the %s until it answers",
                    self.source.name,
                    e,
                    self.fallback.source,
                )
            self._down = str(e)
            self._current = self._fallen_back(f"unreachable: {e}")
            return self._current
        if self._down is not None:
            logger.info("%s answers again: %.0f g CO2e/kWh", self.source.name, value.g_co2_per_kwh)
        self._down = None
        self._current = value
        return value

    def _fallen_back(self, why: str) -> GridIntensity:
        return replace(
            self.fallback,
            source=f"{self.fallback.source}; {self.source.name} {why}",
            kind=f"fallback:{self.fallback.kind}",
        )
