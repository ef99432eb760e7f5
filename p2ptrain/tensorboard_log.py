"""``--tensorboard DIR``: the peer's curves as TensorBoard scalars, for researchers who follow their runs there.

Off by default. It needs the ``tensorboard`` package (``pip install tensorboard``), which torch's ``SummaryWriter``
writes with; without it the peer stops at start with a message saying so. A thread reads what the peer writes for
its dashboard (``status.json``, the energy ledger) every ``EVERY_S`` and, at each new global step, adds one point
per curve with the global step as x (``SCALARS``, and ``energy/kwh``, ``energy/g_co2e`` from the ledger); steps
quicker than that are sampled, and the last one is written at exit. The events go to ``DIR/<run id>``, so one
directory holds several swarms side by side.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from p2ptrain.dashboard.server import Dashboard
from p2ptrain.errors import ConfigError

logger = logging.getLogger(__name__)

EVERY_S = 2.0
SCALARS = (  # TensorBoard tag, the status key it reads
    ("train/loss", "loss"),
    ("train/held_out_loss", "val_loss"),
    ("train/samples_per_s", "samples_per_s"),
    ("swarm/peers", "peers"),
    ("averaging/bytes_sent", "bytes_sent"),
    ("averaging/bytes_received", "bytes_received"),
)


class TensorBoardLog:
    """Writes the curves of the peer whose data directory is ``data_dir`` into ``directory``."""

    def __init__(self, data_dir: Path, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the tensorboard package: pip install tensorboard (or leave --tensorboard out)"
            ) from None
        self.reader = Dashboard(data_dir)  # what the dashboard reads: the status and the ledger
        self.directory, self._writer_type = directory, SummaryWriter
        self.writer: Any = None
        self.last_step, self.written = -1, set()  # the last global step written, and its tags

    def write(self, final: bool = False) -> bool:
        """Add the points of a global step not written yet; True if it did. ``final``: also the points the last
        step lacked (the ledger is written every 10 s and at exit)."""
        status = self.reader.status()
        run_id = status.get("run_id")
        if not isinstance(run_id, str) or not run_id or "/" in run_id:  # not in a swarm yet
            return False
        step = status.get("epoch")
        if not isinstance(step, int) or step < self.last_step or (step == self.last_step and not final):
            return False
        if self.writer is None:
            self.writer = self._writer_type(log_dir=str(self.directory / run_id))
        if step > self.last_step:
            self.last_step, self.written = step, set()
        points = [(tag, status.get(key)) for tag, key in SCALARS]
        rounds = status.get("rounds") if isinstance(status.get("rounds"), dict) else {}
        failed = rounds.get("failed") if isinstance(rounds.get("failed"), dict) else {}
        points += [("averaging/rounds_ok", rounds.get("ok")), ("averaging/rounds_failed", sum(failed.values()))]
        ledger = self.reader.ledger(status)
        if ledger is not None:
            points += [("energy/kwh", ledger.energy_kwh), ("energy/g_co2e", ledger.g_co2e)]
        for tag, value in points:
            if tag not in self.written and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, step)
                self.written.add(tag)
        self.writer.flush()
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(EVERY_S):
            try:
                self.write()
            except Exception as e:  # noqa: BLE001 - a half-written file: read whole next time; training goes on
                logger.debug("tensorboard: %r", e)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.write(final=True)
        if self.writer is not None:
            self.writer.close()


@contextlib.contextmanager
def curves(directory: str, data_dir: Path) -> Iterator[None]:
    """While the peer runs: its curves into ``directory`` (nothing if it is "")."""
    if not directory:
        yield
        return
    log = TensorBoardLog(data_dir, Path(directory).expanduser())
    stop = threading.Event()
    thread = threading.Thread(target=log.run, args=(stop,), name="tensorboard", daemon=True)
    thread.start()
    logger.info("TensorBoard curves in %s (tensorboard --logdir %s)", directory, directory)
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        log.close()
