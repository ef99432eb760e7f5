"""The options the commands share, declared once; the peer's flags → ``PeerSettings``."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from p2ptrain.cli import session
from p2ptrain.energy.settings import EnergySettings
from p2ptrain.fields import flag_name, is_option
from p2ptrain.settings import DEPRECATED, PeerSettings, resolve_settings
from p2ptrain.swarm.manifest import AGGREGATIONS, COMPRESSIONS, MODES, AveragingSpec

logger = logging.getLogger("p2ptrain")


Codec = Enum("Codec", {name: name for name in COMPRESSIONS}, type=str)  # the manifest's list, one source


DEFAULT_CODEC = Codec(AveragingSpec.compression)


Mode = Enum("Mode", {name: name for name in MODES}, type=str)


DEFAULT_MODE = Mode(AveragingSpec.mode)


Aggregation = Enum("Aggregation", {name: name for name in AGGREGATIONS}, type=str)


DEFAULT_AGGREGATION = Aggregation(AveragingSpec.aggregation)


# -- the peer's options, from PeerSettings' and EnergySettings' fields (``fields.option``) ---------------------------

OPTION_FIELDS = {f.name: f for cls in (PeerSettings, EnergySettings) for f in fields(cls) if is_option(f)}
_TYPES = {"Path": Path, "str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": list[str]}


def option_type(name: str) -> Any:
    """``Annotated[T | None, typer.Option(...)]`` for the settings field ``name``: None means "not given", so the
    config file, the environment or the default decides."""
    f = OPTION_FIELDS[name]
    kind = _TYPES[str(f.type)]
    shown = f.metadata["shown_default"] or ("" if f.default is MISSING or f.default in ("", ()) else str(f.default))
    text = f.metadata["help"] + (f" (default: {shown})" if shown and kind is not bool else "")
    flag = flag_name(f)
    declared = f"{flag}/--no-{flag[2:]}" if kind is bool else flag
    return Annotated[kind | None, typer.Option(declared, help=text)]


def peer_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the options of these settings fields (all of them if none is named). The command takes them
    as one argument, ``flags`` (field name → value; None: not given), for ``resolve_settings``."""
    chosen = list(names or OPTION_FIELDS)
    deprecated = {old: new for old, new in DEPRECATED.items() if new in chosen}

    def wrap(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "flags"]
        added = [
            inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option_type(n))
            for n in chosen
        ]
        for old, new in deprecated.items():
            hidden = Annotated[
                int | None, typer.Option("--" + old.replace("_", "-"), hidden=True, help=f"old name of --{new}")
            ]
            added.append(inspect.Parameter(old, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=hidden))

        @functools.wraps(command)
        def with_options(**values: Any) -> Any:
            flags = {p.name: values.pop(p.name) for p in added}
            return command(**values, flags=flags)

        del with_options.__wrapped__  # typer reads the parameters from the signature below, not the command's
        with_options.__signature__ = signature.replace(parameters=[*own, *added])
        with_options.__annotations__ = {p.name: p.annotation for p in (*own, *added)}
        return with_options

    return wrap


DataDir = option_type("data_dir")
InitialPeers = option_type("initial_peers")
Country = option_type("country")
IntensitySource = option_type("intensity_source")
Debug = Annotated[bool, typer.Option("--debug", help="tracebacks, versions and DEBUG logs, for bug reports")]


MaxGridIntensity = Annotated[
    float | None,
    typer.Option(help="carbon-aware: pause while the grid emits more g CO2e/kWh (config: idle.max_grid_g_co2_per_kwh)"),
]


CleanestHours = Annotated[
    float | None,
    typer.Option(help="carbon-aware: train only in the N cleanest hours of the forecast (config: idle.cleanest_hours)"),
]


def peer_settings(flags: dict[str, Any], debug: bool = False) -> PeerSettings:
    """The settings the peer commands' options (``peer_options``) call for, over config, environment, defaults."""
    if debug:
        flags = {**flags, "log_level": "DEBUG"}
    return resolve_settings(flags, session.env())
