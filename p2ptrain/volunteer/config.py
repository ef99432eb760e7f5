"""The volunteer daemon's config file (TOML, in the platform's config dir): the choices it runs with.

    p2ptrain config                              # show every setting, its value and where it comes from
    p2ptrain config set swarm.model gpt2-small
    p2ptrain config set idle.schedule 01:00-08:00,12:00-13:00
    p2ptrain config unset idle.schedule          # back to the default

A missing file means every default (safe ones: pause for any game, 90% of GPU memory at most, stop
at 83 °C, pause on battery). Five tables::

    [swarm]     model, invite                      what to join
    [peer]      data_dir, device, batch_size, port, … ``settings.PeerSettings`` fields
    [idle]      quiet_period_s, schedule, caps, … ``idle_policy.IdleSettings`` fields (carbon-aware mode too)
    [energy]    country, intensity_source, meter, … ``energy.settings.EnergySettings`` fields
    [dashboard] port                               the daemon's page and /metrics, on 127.0.0.1 only

Configuration flows one way: this file → ``DaemonConfig`` (typed, validated; an unknown key is an
error naming it) → ``PeerSettings`` / ``IdleSettings`` (environment variables and flags still win
over the file for peer settings). The file is written atomically, mode 0600.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomli_w

from p2ptrain.energy.settings import EnergySettings
from p2ptrain.errors import ConfigError
from p2ptrain.fields import parse_text
from p2ptrain.fileio import atomic_write_bytes
from p2ptrain.settings import DEPRECATED, PeerSettings, resolve_settings
from p2ptrain.volunteer.idle_policy import IdleSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


@dataclass(frozen=True)
class SwarmChoice:
    model: str = "gpt2-small"  # the model whose swarm to join (`p2ptrain join --model`)
    invite: str = ""  # a researcher's invite (p2pt1-…); empty: rejoin the last swarm, or one training `model`


@dataclass(frozen=True)
class DashboardChoice:
    port: int = 8470  # the daemon serves its page and /metrics at 127.0.0.1:port (as `p2ptrain dashboard`); 0: none

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"dashboard.port must be in 0-65535 (0: no dashboard), got {self.port}")


PEER_KEYS = tuple(f.name for f in fields(PeerSettings) if f.name != "energy")
TABLES: dict[str, type] = {
    "swarm": SwarmChoice, "peer": PeerSettings, "idle": IdleSettings, "energy": EnergySettings,
    "dashboard": DashboardChoice,
}  # fmt: skip
SECRET_KEYS = ("energy.electricitymaps_token",)  # shown as "(set)" by `p2ptrain config`


@dataclass(frozen=True)
class DaemonConfig:
    swarm: SwarmChoice = field(default_factory=SwarmChoice)
    peer: dict[str, Any] = field(default_factory=dict)  # PeerSettings overrides (validated by peer_settings)
    idle: IdleSettings = field(default_factory=IdleSettings)
    path: Path | None = None  # where it was read from
    energy: dict[str, Any] = field(default_factory=dict)  # EnergySettings overrides (validated by peer_settings)
    dashboard: DashboardChoice = field(default_factory=DashboardChoice)

    def peer_settings(self, flags: Mapping[str, Any], env: Mapping[str, str]) -> PeerSettings:
        """defaults < this file < P2PTRAIN_* environment < flags; the [idle] caps that torch applies are added."""
        settings = resolve_settings(flags, env, base=self.peer, energy=self.energy)
        idle = {"gpu_memory_fraction": self.idle.max_gpu_memory_fraction}
        if self.idle.cpu_threads:
            idle["torch_threads"] = self.idle.cpu_threads
        return replace(settings, **idle)


def config_path(env: Mapping[str, str]) -> Path:
    """``P2PTRAIN_CONFIG``, else the platform's config dir: XDG on Linux (and WSL), Application Support on macOS."""
    if env.get("P2PTRAIN_CONFIG"):
        return Path(env["P2PTRAIN_CONFIG"]).expanduser()
    home = Path(env.get("HOME", "~")).expanduser()
    if sys.platform == "darwin":
        return home / "Library" / "Application Support" / "p2ptrain" / "config.toml"
    if sys.platform == "win32":
        return Path(env.get("APPDATA", home)) / "p2ptrain" / "config.toml"
    return Path(env.get("XDG_CONFIG_HOME") or home / ".config") / "p2ptrain" / "config.toml"


def read_raw(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TOML file ({e}). Fix it, or remove it for the defaults.") from e
    for table, values in raw.items():
        if table not in TABLES or not isinstance(values, dict):
            raise ConfigError(f"{path}: unknown table [{table}] (known: {', '.join(TABLES)})")
        for key in values:
            if key not in _names(table) and not (table == "peer" and key in DEPRECATED):
                raise ConfigError(f"{path}: unknown setting {table}.{key} (see `p2ptrain config`)")
    return raw


def load_config(env: Mapping[str, str]) -> DaemonConfig:
    path = config_path(env)
    return build_config(read_raw(path), path)


def build_config(raw: dict[str, dict[str, Any]], path: Path | None = None) -> DaemonConfig:
    where = path or "config"
    try:
        swarm = SwarmChoice(**_typed("swarm", raw.get("swarm", {})))
        idle = IdleSettings(**_typed("idle", raw.get("idle", {})))
        peer = _typed("peer", raw.get("peer", {}))
        PeerSettings(**{"data_dir": Path("."), **peer})  # validates the values now, not when the daemon starts
        energy = _typed("energy", raw.get("energy", {}))
        EnergySettings(**energy)
        dashboard = DashboardChoice(**_typed("dashboard", raw.get("dashboard", {})))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return DaemonConfig(swarm, peer, idle, path, energy, dashboard)


def set_value(env: Mapping[str, str], dotted: str, text: str | None, path: Path | None = None) -> Path:
    """Set ``table.key`` to ``text`` (parsed as the setting's type), or remove it with ``text=None``; validated."""
    table, _, key = dotted.partition(".")
    if table not in TABLES or key not in _names(table):
        raise ConfigError(f"unknown setting {dotted!r}: use table.key, e.g. idle.quiet_period_s (`p2ptrain config`)")
    path = path or config_path(env)
    raw = read_raw(path)
    values = raw.setdefault(table, {})
    if text is None:
        values.pop(key, None)
    else:
        values[key] = _parse_text(dotted, _kind(table, key), text)
    build_config(raw, path)  # refuse a value that does not validate, before writing
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write_bytes(path, tomli_w.dumps({t: v for t, v in raw.items() if v}).encode(), mode=0o600)
    return path


def describe(config: DaemonConfig) -> list[tuple[str, Any, bool]]:
    """(``table.key``, effective value, set in the file?) for every setting, for `p2ptrain config`."""
    raw = read_raw(config.path) if config.path else {}
    rows = []
    for table, cls in TABLES.items():
        for f in fields(cls):
            if table == "peer" and f.name == "energy":
                continue  # its own table
            if table in ("peer", "energy"):
                overrides = getattr(config, table)
                value = overrides.get(f.name, "(default)" if f.name == "data_dir" else f.default)
            else:
                value = getattr(getattr(config, table), f.name)
            if f"{table}.{f.name}" in SECRET_KEYS and value:
                value = "(set)"
            rows.append((f"{table}.{f.name}", value, f.name in raw.get(table, {})))
    return rows


def _names(table: str) -> set[str]:
    return {f.name for f in fields(TABLES[table]) if not (table == "peer" and f.name == "energy")}


def _kind(table: str, key: str) -> str:
    return str(next(f.type for f in fields(TABLES[table]) if f.name == key))


def _typed(table: str, values: dict[str, Any]) -> dict[str, Any]:
    """TOML values checked against the dataclass field types (ints where floats go are fine)."""
    out = {}
    for key, value in values.items():
        kind = _kind(table, key)
        if kind.startswith("tuple"):
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
            value = tuple(value) if ok else value
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind == "float":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif kind == "Path":
            ok = isinstance(value, str)
            value = Path(value).expanduser() if ok else value
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ConfigError(f"{table}.{key} = {value!r} is not a {kind}")
        out[key] = value
    return out


def _parse_text(name: str, kind: str, text: str) -> Any:
    try:
        return parse_text(kind, text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a valid {kind}") from None
