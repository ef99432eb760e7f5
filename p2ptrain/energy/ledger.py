"""The energy and carbon ledger of one peer in one swarm: what it contributed and what that cost.

    <data_dir>/runs/<run_id>/ledger.json      # written atomically every energy.ledger_every_s and at exit

It survives restarts (a restarted peer adds to it) and is published, signed with this peer's identity
key, as a DHT record (``records.py``) from which `p2ptrain report --swarm` adds up the swarm.

The ``Accountant`` owns the bookkeeping thread. The training thread only calls ``on_step`` (add
samples, tokens, compute seconds: a few µs under a lock) and ``set_active`` (training or paused); every
``ledger_every_s`` the accountant reads the meter and the grid intensity, and adds

    energy J    = the meter's joules since the last tick × the fraction of the tick spent training
    g CO2e      = energy J / 3.6e6 J/kWh × grid intensity (g CO2e/kWh, ``carbon.py``)
    device s    = seconds spent training, pauses excluded (GPU-seconds on a GPU peer, CPU-seconds on a CPU one)

then writes the file and, at most every ``PUBLISH_EVERY_S`` and at exit, publishes it. Energy spent
while paused (a game) is not this peer's. Nothing here runs on the training thread but ``on_step`` and
``set_active``, so neither a slow disk, a slow meter nor an unreachable DHT can delay a step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from p2ptrain.energy.carbon import J_PER_KWH, GridIntensity, g_co2e
from p2ptrain.energy.meter import EnergyMeter, EnergyReading, MeterInfo
from p2ptrain.errors import LedgerInvalid
from p2ptrain.fileio import atomic_write_json, read_json

logger = logging.getLogger(__name__)
LEDGER_VERSION = 1
PUBLISH_EVERY_S = 60.0
MAX_HISTORY = 240  # points kept in the file; halved in resolution when full, so a long run stays bounded
MAX_SOURCES = 8  # distinct intensity kinds kept in kwh_by_source
# Bounds for values from files and from the network (protocols/dht-records.md, "Ledger records")
MAX_COUNT = 10**15  # samples, tokens
MAX_SECONDS = 1e10  # device_s, compute_s: ~300 years
MAX_ENERGY_J = 1e14  # per part: 28 GWh
MAX_G = 1e13  # g CO2e
MAX_TEXT = 160  # characters of a label
MAX_POWER_W = 20_000.0  # average over the training time: more than any single machine draws
SLACK_S = 3600.0  # energy and tokens may precede the first counted second by this much (ticks, restarts)
MAX_TOKENS_PER_S = 1e8


@dataclass
class Ledger:
    run_id: str
    peer_id: str
    model: str = ""
    model_params: int = 0  # parameters of the model (for the datacenter comparison)
    seq: int = 0  # bumped at every write: the newer of two copies has the larger seq
    started_at: float = 0.0  # unix time of the first tick
    updated_at: float = 0.0
    samples: int = 0  # training samples this peer processed (forward + backward)
    tokens: int = 0  # samples × sequence length
    device_s: float = 0.0  # seconds spent training (GPU-seconds on a GPU peer), pauses excluded
    compute_s: float = 0.0  # of those, seconds in forward/backward
    cpu_j: float = 0.0
    gpu_j: float = 0.0
    ram_j: float = 0.0
    g_co2e: float = 0.0
    device: str = "cpu"  # "gpu" or "cpu": what trained
    cpu_model: str = ""
    gpu_model: str = ""
    country: str = ""  # ISO 3166 alpha-3 of the grid, "" = not set (world average)
    intensity_source: str = ""  # the latest intensity's source, for people
    kwh_by_source: dict[str, float] = field(default_factory=dict)  # energy per intensity kind ("uk", "country", …)
    meter: dict[str, str] = field(default_factory=dict)  # cpu/gpu/ram → how it is metered (measured/estimated)
    history: list[list[float]] = field(default_factory=list)  # [unix time, energy J, g CO2e, tokens], cumulative
    version: int = LEDGER_VERSION

    @property
    def energy_j(self) -> float:
        return self.cpu_j + self.gpu_j + self.ram_j

    @property
    def energy_kwh(self) -> float:
        return self.energy_j / J_PER_KWH

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> Ledger:
        """A validated ledger from a decoded file or record. Raises LedgerInvalid."""
        if not isinstance(raw, dict):
            raise LedgerInvalid("a ledger must be a map")
        if raw.get("version") != LEDGER_VERSION:
            raise LedgerInvalid(f"ledger version {raw.get('version')!r:.20} is not {LEDGER_VERSION}")
        names = {f.name: f for f in fields(cls)}
        extra, missing = set(raw) - set(names), set(names) - set(raw)
        if extra or missing:
            raise LedgerInvalid(f"ledger has unknown fields {sorted(map(str, extra))[:5]} / lacks {sorted(missing)}")
        for name, value in raw.items():
            _check(name, str(names[name].type), value)
        ledger = cls(**{k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()})
        _plausible(ledger)
        return ledger


def _check(name: str, kind: str, value: Any) -> None:
    def bad(why: str) -> LedgerInvalid:
        return LedgerInvalid(f"ledger field {name}: {why}")

    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            raise bad(f"must be an integer in [0, {MAX_COUNT:.0e}]")
    elif kind == "float":
        limit = MAX_ENERGY_J if name.endswith("_j") else MAX_G if name == "g_co2e" else MAX_SECONDS
        if not _finite(value, limit):
            raise bad(f"must be a finite number in [0, {limit:.0e}]")
    elif kind == "str":
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise bad(f"must be text of at most {MAX_TEXT} characters")
    elif kind == "dict[str, float]":
        if not isinstance(value, dict) or len(value) > MAX_SOURCES:
            raise bad(f"must be a map of at most {MAX_SOURCES} entries")
        if not all(isinstance(k, str) and len(k) <= 40 and _finite(v, MAX_ENERGY_J) for k, v in value.items()):
            raise bad("entries must be short text → kWh")
    elif kind == "dict[str, str]":
        if not isinstance(value, dict) or set(value) - {"cpu", "gpu", "ram"}:
            raise bad("must map cpu/gpu/ram to text")
        if not all(isinstance(v, str) and len(v) <= MAX_TEXT for v in value.values()):
            raise bad("labels must be short text")
    elif kind == "list[list[float]]":
        if not isinstance(value, list) or len(value) > MAX_HISTORY:
            raise bad(f"must be a list of at most {MAX_HISTORY} points")
        for point in value:
            if not isinstance(point, list) or len(point) != 4 or not all(_finite(v, 1e16) for v in point):
                raise bad("points must be [time, energy J, g CO2e, tokens]")
    else:  # pragma: no cover - a field type this function does not know
        raise bad(f"unchecked type {kind}")


def _finite(value: Any, limit: float) -> bool:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return number and math.isfinite(value) and 0 <= value <= limit


def _plausible(ledger: Ledger) -> None:
    """Numbers no real peer can reach in the time it says it trained."""
    if ledger.device not in ("cpu", "gpu"):
        raise LedgerInvalid(f"ledger device must be cpu or gpu, got {ledger.device!r:.20}")
    if ledger.compute_s > ledger.device_s + SLACK_S:
        raise LedgerInvalid("ledger compute_s exceeds the time trained")
    if ledger.energy_j > MAX_POWER_W * (ledger.device_s + SLACK_S):
        raise LedgerInvalid(f"ledger energy implies more than {MAX_POWER_W:.0f} W on average")
    if ledger.tokens > MAX_TOKENS_PER_S * (ledger.device_s + SLACK_S) or ledger.samples > ledger.tokens:
        raise LedgerInvalid("ledger token count is impossible for the time trained")


def ledger_path(data_dir: Path, run_id: str) -> Path:
    return data_dir / "runs" / run_id / "ledger.json"


def load_ledger(path: Path) -> Ledger | None:
    """The ledger in ``path``; None when there is none. Raises LedgerInvalid when it is unreadable."""
    if not path.exists():
        return None
    raw = read_json(path)
    if raw is None:
        raise LedgerInvalid(f"{path} is not JSON")
    return Ledger.from_dict(raw)


def open_ledger(path: Path, run_id: str, peer_id: str) -> Ledger:
    """This peer's ledger for ``run_id``: the one on disk, or a new one. A damaged file is kept aside, not lost."""
    try:
        ledger = load_ledger(path)
        why = None if ledger is None or (ledger.run_id, ledger.peer_id) == (run_id, peer_id) else "another peer's"
    except LedgerInvalid as e:
        ledger, why = None, f"damaged ({e})"
    if why is None and ledger is not None:
        return ledger
    if why is not None:
        aside = path.with_name(f"ledger.set-aside-{int(time.time())}.json")
        path.replace(aside)
        logger.warning("The energy ledger %s is %s: kept as %s, starting a new one", path, why, aside)
    return Ledger(run_id=run_id, peer_id=peer_id)


def save_ledger(path: Path, ledger: Ledger) -> None:
    atomic_write_json(path, ledger.to_dict(), mode=0o600)


def add_history_point(ledger: Ledger, now: float) -> None:
    ledger.history.append([now, ledger.energy_j, ledger.g_co2e, float(ledger.tokens)])
    if len(ledger.history) > MAX_HISTORY:
        last = ledger.history[-1]
        ledger.history = ledger.history[:-1:2] + [last]  # half the resolution, the newest point kept


class Accountant:
    """Owns the ledger while the peer trains (module docstring). Started and stopped by the peer."""

    def __init__(
        self,
        path: Path,
        ledger: Ledger,
        meter: EnergyMeter,
        intensity: Callable[[], GridIntensity],
        every_s: float,
        publish: Callable[[Ledger], bool] | None = None,
        clock: Callable[[], float] = time.time,
        started: MeterInfo | None = None,
    ):
        """``started``: what ``meter.start()`` returned, if the caller started it; else the thread starts it."""
        self.path, self.ledger, self.meter, self.intensity = path, ledger, meter, intensity
        self._meter_info = started
        self.every_s, self._publish, self._clock = every_s, publish, clock
        self._lock = threading.Lock()  # the pending counters and the active flag, shared with the training thread
        self._pending = [0, 0, 0.0]  # samples, tokens, compute_s since the last tick
        self._active = False
        self._active_since = 0.0
        self._active_s = 0.0  # training seconds since the last tick
        self._last_tick = 0.0
        self._last_reading = EnergyReading()
        self._last_publish = -math.inf
        self._stop = threading.Event()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="energy-ledger", daemon=True)
        self.info = None

    # the training thread ----------------------------------------------------------------------------

    def on_step(self, samples: int, tokens: int, compute_s: float) -> None:
        with self._lock:
            self._pending[0] += samples
            self._pending[1] += tokens
            self._pending[2] += compute_s

    def set_active(self, active: bool) -> None:
        """Training (True) or paused/stopped (False): energy and seconds count only while training."""
        now = self._clock()
        with self._lock:
            if active and not self._active:
                self._active_since = now
            elif not active and self._active:
                self._active_s += max(0.0, now - self._active_since)
            self._active = active

    # the accountant's thread ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def wait_started(self, timeout_s: float) -> bool:
        return self._started.wait(timeout_s)

    def _run(self) -> None:
        try:
            info = self.info = self._meter_info or self.meter.start()
            self.ledger.meter = {k: v[:MAX_TEXT] for k, v in info.as_dict().items()}
            self.ledger.cpu_model, self.ledger.gpu_model = info.cpu_model[:MAX_TEXT], info.gpu_model[:MAX_TEXT]
            self._last_reading = self.meter.read()
        except Exception as e:  # noqa: BLE001 - metering is never worth stopping training for
            logger.warning("Energy meter failed to start (%r): energy is not counted", e)
        self._last_tick = self._clock()
        self._started.set()
        while not self._stop.wait(self.every_s):
            try:
                self.tick()
            except Exception as e:  # noqa: BLE001 - a full disk or a meter hiccup: try again next tick
                logger.warning("Energy ledger update failed: %r", e)

    def tick(self, reading: EnergyReading | None = None, final: bool = False) -> Ledger:
        """Account the interval since the last tick, write the ledger, publish it when due."""
        reading = self.meter.read() if reading is None else reading
        now = self._clock()
        with self._lock:
            if self._active:
                self._active_s += max(0.0, now - self._active_since)
                self._active_since = now
            active_s, self._active_s = self._active_s, 0.0
            (samples, tokens, compute_s), self._pending = self._pending, [0, 0, 0.0]
        interval_s = max(now - self._last_tick, 1e-9)
        fraction = min(1.0, active_s / interval_s)
        spent = reading.minus(self._last_reading)
        self._last_reading, self._last_tick = reading, now
        grid = self.intensity()
        led = self.ledger
        led.started_at = led.started_at or now
        led.samples += samples
        led.tokens += tokens
        led.compute_s += compute_s
        led.device_s += active_s
        led.cpu_j += spent.cpu_j * fraction
        led.gpu_j += spent.gpu_j * fraction
        led.ram_j += spent.ram_j * fraction
        counted_j = spent.total_j * fraction
        led.g_co2e += g_co2e(counted_j, grid.g_co2_per_kwh)
        if counted_j > 0 and (grid.kind in led.kwh_by_source or len(led.kwh_by_source) < MAX_SOURCES):
            led.kwh_by_source[grid.kind] = led.kwh_by_source.get(grid.kind, 0.0) + counted_j / J_PER_KWH
        led.intensity_source = grid.source[:MAX_TEXT]
        led.seq += 1
        led.updated_at = now
        add_history_point(led, now)
        save_ledger(self.path, led)
        if self._publish is not None and (final or now - self._last_publish >= PUBLISH_EVERY_S):
            self._last_publish = now
            if not self._publish(led):
                logger.debug("Could not publish the energy ledger (no reachable DHT peer?)")
        return led

    def stop(self, timeout_s: float = 2.0) -> Ledger:
        """The last tick (meter stopped, ledger written and published); call after training has stopped."""
        self.set_active(False)
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("The energy ledger thread is still busy: the last interval is not counted")
            return self.ledger
        try:
            return self.tick(self.meter.stop(), final=True)
        except Exception as e:  # noqa: BLE001 - shutdown goes on; the previous ledger file stays valid
            logger.warning("Could not write the final energy ledger: %r", e)
            return self.ledger
