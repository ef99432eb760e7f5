"""Which libp2p daemon hivemind runs under a peer, and with which extra flags.

hivemind starts its daemon from one place, ``P2P.create``, which looks the binary up with
``importlib.resources.path(hivemind_cli, "p2pd")`` and builds the command line from its own parameters.
``select`` replaces that lookup (``compat.hivemind.set_daemon_launcher``) and nothing else: hivemind's flags, its
client and its processes are unchanged.

- ``go``: hivemind's bundled Go ``p2pd``; with extra flags, through ``p2ptrain-p2pd-go`` (``go_p2pd.py``), which
  appends them.
- ``py``: ``p2ptrain-p2pd`` (py-libp2p), which reads the extra flags itself.

The extra flags travel in the environment (``P2PTRAIN_P2PD_FLAGS``), which hivemind passes to its daemon;
processes forked afterwards (hivemind's DHT process) inherit the choice.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from p2ptrain.compat.hivemind import DAEMON_FILENAME, daemon_launcher, set_daemon_launcher
from p2ptrain.errors import ConfigError
from p2ptrain.swarm.go_p2pd import FLAGS_ENV, LOG_DIR_ENV, go_binary

KINDS = ("go", "py")
MDNS_ENV = "P2PTRAIN_P2PD_MDNS"  # read by p2ptrain-p2pd: hivemind passes its environment, not our flags
STOCK_ENV = "P2PTRAIN_P2PD_STOCK"  # read by p2ptrain-p2pd: "1" runs py-libp2p as released (a benchmark baseline)


def installed(name: str) -> Path:
    """A console script of p2ptrain's installed beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed (reinstall p2ptrain: ./scripts/setup.sh)")
    return Path(found)


def python_daemon() -> Path:
    return installed("p2ptrain-p2pd")


def binary(kind: str) -> Path:
    """The daemon executable ``kind`` names."""
    return go_binary() if kind == "go" else python_daemon()


def select(kind: str, mdns: bool = False, flags: Sequence[str] = ()) -> None:
    """From now on, hivemind in this process (and its children) runs the ``kind`` daemon with ``flags`` added."""
    if kind not in KINDS:
        raise ConfigError(f"--p2p must be one of {', '.join(KINDS)}, got {kind!r}")
    _set_env(MDNS_ENV, "1" if mdns and kind == "py" else None)
    _set_env(FLAGS_ENV, " ".join(flags) or None)
    if kind == "go" and not flags and not os.environ.get(LOG_DIR_ENV):
        set_daemon_launcher(None)
        return
    launcher = installed("p2ptrain-p2pd-go") if kind == "go" else python_daemon()

    @contextmanager
    def ours(package: object, name: str) -> Iterator[Path]:
        if name != DAEMON_FILENAME:  # pragma: no cover - hivemind asks for nothing else
            raise FileNotFoundError(name)
        yield launcher

    ours.kind = kind  # type: ignore[attr-defined] - read back by current()
    set_daemon_launcher(ours)


def _set_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def current() -> str:
    return getattr(daemon_launcher(), "kind", "go")


@contextmanager
def selected(kind: str, mdns: bool = False, flags: Sequence[str] = ()) -> Iterator[None]:
    """``select`` for a block (tests, benchmarks that run both daemons side by side)."""
    before = current(), os.environ.get(MDNS_ENV) == "1", tuple(os.environ.get(FLAGS_ENV, "").split())
    select(kind, mdns, flags)
    try:
        yield
    finally:
        select(*before)
