"""The volunteer daemon and its control commands: ``daemon run/start/stop/status``, ``status``, ``pause``,
``resume``, ``leave``, ``config``. The daemon is ``volunteer/daemon.py``; these talk to it through its control socket.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path
from typing import Annotated, Any

import typer

from p2ptrain.cli import session
from p2ptrain.cli.options import CleanestHours, Country, DataDir, Debug, IntensitySource, MaxGridIntensity, peer_options
from p2ptrain.cli.session import setup_logging, until_signalled, versions
from p2ptrain.volunteer.status_text import describe_status

logger = logging.getLogger("p2ptrain")


def daemon_config():
    from p2ptrain.volunteer.config import load_config

    return load_config(session.env())


def daemon_dir(data_dir: Path | None) -> Path:
    return daemon_config().peer_settings({"data_dir": data_dir}, session.env()).data_dir


def with_idle_flags(config: Any, max_grid_intensity: float | None, cleanest_hours: float | None) -> Any:
    """The config file's [idle] with the carbon-aware flags over it (validated like the file)."""
    from dataclasses import replace

    overrides = {"max_grid_g_co2_per_kwh": max_grid_intensity, "cleanest_hours": cleanest_hours}
    overrides = {k: float(v) for k, v in overrides.items() if v is not None}
    return replace(config, idle=replace(config.idle, **overrides)) if overrides else config


@peer_options("data_dir", "log_level", "country", "intensity_source")
def daemon_run(
    max_grid_intensity: MaxGridIntensity = None,
    cleanest_hours: CleanestHours = None,
    debug: Debug = False,
    flags: dict[str, Any] | None = None,
) -> None:
    """Run the daemon in the foreground (what the service files in daemon/ run)."""
    from p2ptrain.volunteer.daemon import run_daemon

    config = with_idle_flags(daemon_config(), max_grid_intensity, cleanest_hours)
    flags = {**(flags or {}), **({"log_level": "DEBUG"} if debug else {})}
    setup_logging(config.peer_settings(flags, session.env()))
    logger.debug(versions())
    until_signalled(lambda stop: run_daemon(config, flags, session.env(), stop))


def daemon_start(
    data_dir: DataDir = None,
    country: Country = None,
    intensity_source: IntensitySource = None,
    max_grid_intensity: MaxGridIntensity = None,
    cleanest_hours: CleanestHours = None,
) -> None:
    """Start the daemon in the background and return once it answers."""
    from p2ptrain.swarm.identity import ensure_private_dir
    from p2ptrain.volunteer.background import start_in_background

    config = with_idle_flags(daemon_config(), max_grid_intensity, cleanest_hours)  # bad values fail here
    config.peer_settings({"country": country, "intensity_source": intensity_source}, session.env())
    directory = ensure_private_dir(daemon_dir(data_dir))
    passed = {
        "--country": country,
        "--intensity-source": intensity_source,
        "--max-grid-intensity": max_grid_intensity,
        "--cleanest-hours": cleanest_hours,
    }
    flags = [text for flag, value in passed.items() if value is not None for text in (flag, str(value))]
    started = start_in_background(directory, flags, session.env())
    if started.already:
        print(f"The daemon is already running (pid {started.pid}): p2ptrain status")
    else:
        print(
            f"Daemon started (pid {started.pid}); its log: {directory / 'p2ptrain.log'}. See it with: p2ptrain status"
        )


def daemon_stop(data_dir: DataDir = None) -> None:
    """Stop the daemon: it leaves the averaging round, writes its checkpoint and exits."""
    stop_daemon(data_dir, "stop")


def stop_daemon(data_dir: Path | None, command: str) -> None:
    from p2ptrain.volunteer.background import stop_and_wait

    took = stop_and_wait(daemon_dir(data_dir), command)
    print(f"{'Left the swarm and stopped' if command == 'leave' else 'Stopped'} in {took:.1f} s")


def daemon_status(data_dir: DataDir = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Same as `p2ptrain status`."""
    status(data_dir, as_json)


def status(
    data_dir: DataDir = None, as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False
) -> None:
    """What the daemon is doing: training or paused (and why), the swarm, this peer's contribution."""
    import json

    from p2ptrain.volunteer.control_socket import request

    reply = request(daemon_dir(data_dir), "status")
    print(json.dumps(reply, indent=2) if as_json else describe_status(reply))


def pause(
    reason: Annotated[str, typer.Option(help="shown in status, e.g. 'seat 12 taken'")] = "p2ptrain pause",
    data_dir: DataDir = None,
) -> None:
    """Pause training (the peer stays in the swarm and gives the GPU back) until `p2ptrain resume`."""
    from p2ptrain.volunteer.control_socket import request

    print(describe_status(request(daemon_dir(data_dir), "pause", reason=reason)))


def resume(data_dir: DataDir = None) -> None:
    """Undo `p2ptrain pause` (the idle policy may still hold training, e.g. while a game runs)."""
    from p2ptrain.volunteer.control_socket import request

    print(describe_status(request(daemon_dir(data_dir), "resume")))


def leave(data_dir: DataDir = None) -> None:
    """Leave the swarm for good: the daemon stops and will not rejoin that swarm when started again."""
    stop_daemon(data_dir, "leave")


def config_show(ctx: typer.Context) -> None:
    """Every setting, its value, and whether the file sets it (`p2ptrain config set KEY VALUE` to change one)."""
    if ctx.invoked_subcommand is not None:
        return
    from p2ptrain.volunteer.config import config_path, describe

    config = daemon_config()
    path = config_path(session.env())
    print(f"# {path}{'' if path.exists() else ' (not written yet: all defaults)'}")
    for key, value, in_file in describe(config):
        shown = ", ".join(value) if isinstance(value, tuple) else value
        print(f"{key} = {shown}{'' if in_file else '   (default)'}")


def config_set(key: str, value: str) -> None:
    """Set KEY (table.key, e.g. idle.quiet_period_s) to VALUE; lists are comma-separated."""
    from p2ptrain.volunteer.config import set_value

    path = set_value(session.env(), key, value)
    print(f"{key} = {value} (in {path}; a running daemon uses it after `p2ptrain daemon stop` and start)")


def config_unset(key: str) -> None:
    """Remove KEY from the file: back to its default."""
    from p2ptrain.volunteer.config import set_value

    print(f"{key} back to its default (in {set_value(session.env(), key, None)})")
