"""Which libp2p daemon hivemind runs under a peer: its bundled Go ``p2pd`` or ``p2ptrain-p2pd`` (py-libp2p).

hivemind starts its daemon from one place, ``P2P.create``, which looks the binary up with
``importlib.resources.path(hivemind_cli, "p2pd")``. Choosing the Python daemon replaces that lookup (the
module-level name ``path`` in ``hivemind.p2p.p2p_daemon``) and nothing else: hivemind's flags, its client
and its processes are unchanged. Processes forked afterwards (hivemind's DHT process) inherit the choice.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from importlib.resources import path as resource_path
from pathlib import Path

import hivemind.hivemind_cli as hivemind_cli
import hivemind.p2p.p2p_daemon as p2p_daemon

from p2ptrain.errors import ConfigError

KINDS = ("go", "py")
MDNS_ENV = "P2PTRAIN_P2PD_MDNS"  # read by p2ptrain-p2pd: hivemind passes its environment, not our flags
STOCK_ENV = "P2PTRAIN_P2PD_STOCK"  # read by p2ptrain-p2pd: "1" runs py-libp2p as released (a benchmark baseline)


def python_daemon() -> Path:
    """The ``p2ptrain-p2pd`` console script installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name("p2ptrain-p2pd")
    if beside.is_file():
        return beside
    found = shutil.which("p2ptrain-p2pd")
    if found is None:
        raise ConfigError("p2ptrain-p2pd is not installed (reinstall p2ptrain: ./scripts/setup.sh)")
    return Path(found)


def binary(kind: str) -> Path:
    """The daemon executable ``kind`` names."""
    if kind == "go":
        return Path(str(files(hivemind_cli) / p2p_daemon.P2PD_FILENAME))
    return python_daemon()


def select(kind: str, mdns: bool = False) -> None:
    """From now on, hivemind in this process (and its children) runs the ``kind`` daemon."""
    if kind not in KINDS:
        raise ConfigError(f"--p2p must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "go":
        p2p_daemon.path = resource_path
        os.environ.pop(MDNS_ENV, None)
        return
    binary = python_daemon()

    @contextmanager
    def python_binary(package: object, name: str) -> Iterator[Path]:
        if name != p2p_daemon.P2PD_FILENAME:  # pragma: no cover - hivemind asks for nothing else
            raise FileNotFoundError(name)
        yield binary

    p2p_daemon.path = python_binary
    if mdns:
        os.environ[MDNS_ENV] = "1"
    else:
        os.environ.pop(MDNS_ENV, None)


def current() -> str:
    return "go" if p2p_daemon.path is resource_path else "py"


@contextmanager
def selected(kind: str, mdns: bool = False) -> Iterator[None]:
    """``select`` for a block (tests, benchmarks that run both daemons side by side)."""
    before, before_mdns = current(), os.environ.get(MDNS_ENV) == "1"
    select(kind, mdns)
    try:
        yield
    finally:
        select(before, before_mdns)
