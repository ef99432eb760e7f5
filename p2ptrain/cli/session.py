"""What every command that runs something shares: the environment, logging, versions, signals.

Only ``until_signalled`` installs signal handlers: SIGINT/SIGTERM set a stop event and the peer shuts down in order
(a second Ctrl+C kills at once); SIGUSR1 prints every thread's stack.
"""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import platform
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from typing import Any

import typer

from p2ptrain import __version__
from p2ptrain.errors import ExitCode
from p2ptrain.settings import PeerSettings

logger = logging.getLogger("p2ptrain")

_ENV: Mapping[str, str] = os.environ  # replaced by main(env=...) in tests


def use_env(env: Mapping[str, str] | None) -> None:
    global _ENV
    _ENV = os.environ if env is None else env


def env() -> Mapping[str, str]:
    """The environment the commands read (``P2PTRAIN_*``, ``HOME``): the process's, or a test's."""
    return _ENV


def versions() -> str:
    import hivemind
    import torch

    return (
        f"p2ptrain {__version__}, hivemind {hivemind.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}, {platform.platform()}"
    )


def setup_logging(settings: PeerSettings, log_file: bool = True) -> None:
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")  # hivemind's records go through our handlers
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(settings.log_level)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    if log_file:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            settings.data_dir / "p2ptrain.log", maxBytes=10_000_000, backupCount=3
        )
        rotating.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
        root.addHandler(rotating)
    hivemind_level = logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING
    logging.getLogger("hivemind").setLevel(hivemind_level)


def run_until_signalled(settings: PeerSettings, request: Any) -> None:
    from p2ptrain.peer import run_peer

    setup_logging(settings)
    logger.debug(versions())
    until_signalled(lambda stop: run_peer(settings, request, stop, announce=lambda text: print(text, flush=True)))


def until_signalled(work: Callable[[threading.Event], None]) -> None:
    """Run ``work(stop)``; SIGINT/SIGTERM set ``stop`` (a second one kills at once); Ctrl+C exits 130."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            from p2ptrain.processes import reap_children

            logger.warning("Second %s: stopping now", signal.Signals(signum).name)
            reap_children(timeout_s=0)
            os._exit(ExitCode.INTERRUPTED)
        logger.info("%s: leaving the swarm (Ctrl+C again to force)", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    # `kill -USR1 <pid>` prints every thread's stack (to the real stderr, even when sys.stderr is redirected)
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    work(stop)
    if received and received[0] == signal.SIGINT:
        raise typer.Exit(ExitCode.INTERRUPTED)
