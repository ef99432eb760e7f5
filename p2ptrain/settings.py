"""Peer settings: what is particular to this machine (paths, device, ports, batch per step).

Configuration flows one way: CLI flags → ``resolve_settings`` → ``PeerSettings`` (frozen, validated)
→ components. Sources are merged here and nowhere else, lowest first:

    defaults  <  [peer] in the daemon's config file  <  P2PTRAIN_<FIELD> environment variables  <  flags

(e.g. ``P2PTRAIN_DATA_DIR=/srv/p2ptrain``; list fields take comma-separated values). The energy settings
(``energy.settings.EnergySettings``, the ``[energy]`` table) merge the same way into ``PeerSettings.energy``
(``P2PTRAIN_COUNTRY=FRA``, ``--country FRA``). Components
take a ``PeerSettings`` and never read the environment or files. What the whole swarm shares
(model, dataset, optimizer) is the signed ``manifest.SwarmManifest``, not this.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from p2ptrain.energy.settings import EnergySettings
from p2ptrain.errors import ConfigError
from p2ptrain.fields import option, parse_text

logger = logging.getLogger(__name__)

ENV_PREFIX = "P2PTRAIN_"


def default_data_dir(env: Mapping[str, str]) -> Path:
    base = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME", "~"), ".local", "share")
    return Path(base).expanduser() / "p2ptrain"


@dataclass(frozen=True)
class PeerSettings:
    """This machine's settings (not the swarm's: that is the signed manifest). Defaults < config file < environment
    (``P2PTRAIN_<FIELD>``) < flags; a field made with ``option`` is also a flag of `seed`, `join` and `daemon run`."""

    data_dir: Path = option(
        help="identity, keys, checkpoints, status, log (created 0700)", shown_default="~/.local/share/p2ptrain"
    )
    device: str = option("auto", "auto (first CUDA GPU if any, else CPU), cpu, cuda or cuda:N")
    batch_size: int = option(8, "samples per forward/backward on this peer; lower it on out-of-memory")
    host: str = option("0.0.0.0", "listen address; 127.0.0.1 keeps the swarm on this machine")
    port: int = option(31337, "listen port, the one to forward in a router (fixed, so it stays valid); 0 = any free")
    announce: tuple[str, ...] = option((), "public multiaddr to advertise instead of the listen ones (repeatable)")
    initial_peers: tuple[str, ...] = option((), "multiaddr of a swarm member, …/p2p/<id> (repeatable)")
    p2p: str = option("go", "libp2p daemon: go (hivemind's bundled p2pd) or py (p2ptrain-p2pd, py-libp2p)")
    mdns: bool = option(True, "with --p2p py: find swarm peers on the LAN by mDNS, so a LAN needs no invite")
    torch_threads: int = option(0, "CPU threads for torch; 0 = torch's default", flag="threads")
    gpu_memory_fraction: float = 1.0  # of the GPU's memory this peer may allocate (torch's allocator cap)
    max_steps: int = option(0, "leave after this global step; 0 = train until stopped")
    checkpoint_every: int = option(10, "write the local checkpoint every N global steps (and on exit)")
    validate_every: int = option(5, "held-out loss every N global steps; 0 = never")
    wait_for_peers: int = option(0, "before the first step, wait (≤ wait_for_peers_s) until this many peers are here")
    wait_for_peers_s: float = 600.0
    stop_grace_s: float = 3.0  # on Ctrl+C, wait this long for the current step before abandoning it
    log_level: str = option("INFO", "DEBUG, INFO, WARNING or ERROR (INFO: what a volunteer cares about)")
    tensorboard: str = option("", "write TensorBoard curves (loss, throughput, rounds, energy) to this directory")
    wandb: str = option("", "log the same curves to this Weights & Biases project (wandb's login; WANDB_MODE=offline)")
    energy: EnergySettings = field(default_factory=EnergySettings)  # metering and grid carbon intensity

    def __post_init__(self) -> None:
        problems = [
            (self.batch_size >= 1, f"--batch-size must be ≥ 1, got {self.batch_size}"),
            (self.p2p in ("go", "py"), f"--p2p must be go or py, got {self.p2p!r}"),
            (0 <= self.port <= 65535, f"--port must be in 0-65535, got {self.port}"),
            (self.torch_threads >= 0, "--threads must be ≥ 0"),
            (0 < self.gpu_memory_fraction <= 1, "gpu_memory_fraction must be in (0, 1]"),
            (self.max_steps >= 0, "--max-steps must be ≥ 0"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be ≥ 1"),
            (self.validate_every >= 0, "--validate-every must be ≥ 0"),
            (0 <= self.stop_grace_s <= 60, "stop_grace_s must be in [0, 60]"),
            (self.wait_for_peers >= 0 and self.wait_for_peers_s >= 0, "--wait-for-peers must be ≥ 0"),
            (
                self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                "--device must be auto, cpu, cuda or cuda:N",
            ),
            (
                self.log_level in ("DEBUG", "INFO", "WARNING", "ERROR"),
                "--log-level must be DEBUG, INFO, WARNING or ERROR",
            ),
        ]
        for ok, message in problems:
            if not ok:
                raise ConfigError(message)
        for addr in self.initial_peers + self.announce:
            if not addr.startswith("/"):
                raise ConfigError(
                    f"{addr!r} is not a multiaddr (expected e.g. /ip4/203.0.113.5/tcp/31337/p2p/12D3Koo…)"
                )

    def to_record(self) -> dict[str, Any]:
        """JSON-able form, stored in checkpoints and logged at start-up."""
        record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}
        record["energy"] = self.energy.to_record()  # without the API token
        return record


def _parse(name: str, kind: str, text: str) -> Any:
    try:
        value = parse_text(kind, text)
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name.upper()}={text!r} is not a valid {kind}") from None
    if kind == "Path":
        return Path(value).expanduser()
    return tuple(value) if kind.startswith("tuple") else value


# old names still accepted (from flags, environment and config file) for one release, with a warning
DEPRECATED = {"max_epochs": "max_steps"}  # 0.1: "epoch" meant global step


def _renamed(values: Mapping[str, Any], key: Callable[[str], str], spell: Callable[[str], str]) -> dict[str, Any]:
    """``values`` with the deprecated settings' keys (``key(name)``) replaced by the new ones' (a value under the
    new key wins); ``spell(name)`` is how the user wrote it, for the warning."""
    out = dict(values)
    for old, new in DEPRECATED.items():
        value = out.pop(key(old), None)
        if value is not None:
            logger.warning("%s is deprecated and will be removed: use %s", spell(old), spell(new))
            if out.get(key(new)) is None:
                out[key(new)] = value
    return out


def resolve_settings(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    base: Mapping[str, Any] | None = None,
    energy: Mapping[str, Any] | None = None,
) -> PeerSettings:
    """Merge defaults < ``base``/``energy`` (the daemon's config file) < environment < flags (None: not given).

    ``flags`` may name fields of ``PeerSettings`` and of ``EnergySettings`` (``country``, ``meter``, ...).
    """
    same = lambda name: name  # noqa: E731
    env_key = lambda name: ENV_PREFIX + name.upper()  # noqa: E731
    env = _renamed(env, env_key, env_key)
    flags = _renamed(flags, same, lambda name: "--" + name.replace("_", "-"))
    base = _renamed(base or {}, same, lambda name: f"config key {name!r}")
    values: dict[str, Any] = {"data_dir": default_data_dir(env), **base}
    energy_values: dict[str, Any] = dict(energy or {})
    for cls, into in ((PeerSettings, values), (EnergySettings, energy_values)):
        for f in fields(cls):
            text = env.get(ENV_PREFIX + f.name.upper())
            if text is not None and f.name != "energy":
                into[f.name] = _parse(f.name, str(f.type), text)
    energy_names = {f.name for f in fields(EnergySettings)}
    for name, value in flags.items():
        if value is not None:
            into = energy_values if name in energy_names else values
            into[name] = tuple(value) if isinstance(value, list) else value
    values["data_dir"] = Path(values["data_dir"]).expanduser()
    if "log_level" in values:
        values["log_level"] = str(values["log_level"]).upper()
    return PeerSettings(**values, energy=EnergySettings(**energy_values))
