"""``--tensorboard DIR`` and ``--wandb PROJECT``: the peer's curves for researchers who follow their runs in
TensorBoard or Weights & Biases.

Both are off by default and need their package (``pip install tensorboard`` / ``pip install wandb``); without it
the peer stops at start with a message saying so. A thread reads what the peer writes for its dashboard
(``status.json``, the energy ledger) every ``EVERY_S`` and, at each new global step, adds one point per curve with
the global step as x (``SCALARS``, and ``energy/kwh``, ``energy/g_co2e`` from the ledger); steps quicker than that
are sampled, and the last one is written at exit.

- TensorBoard: events in ``DIR/<run id>``, so one directory holds several swarms side by side.
- wandb: one wandb run per peer and swarm, grouped by the swarm's run id, in ``PROJECT``. wandb's own settings
  apply (``wandb login`` or ``WANDB_API_KEY``; ``WANDB_MODE=offline`` writes locally for a later ``wandb sync``).
  If wandb cannot start (not logged in, no network) the peer says so once and trains on.
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
SCALARS = (  # curve, the status key it reads
    ("train/loss", "loss"),
    ("train/held_out_loss", "val_loss"),
    ("train/samples_per_s", "samples_per_s"),
    ("swarm/peers", "peers"),
    ("averaging/bytes_sent", "bytes_sent"),
    ("averaging/bytes_received", "bytes_received"),
)


class TensorBoardSink:
    def __init__(self, directory: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "--tensorboard needs the tensorboard package: pip install tensorboard (or leave --tensorboard out)"
            ) from None
        self.directory, self._writer_type, self.writer = directory, SummaryWriter, None

    def add(self, status: dict[str, Any], step: int, points: list[tuple[str, float]]) -> None:
        if self.writer is None:
            self.writer = self._writer_type(log_dir=str(self.directory / status["run_id"]))
        for tag, value in points:
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class WandbSink:
    def __init__(self, project: str):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs the wandb package: pip install wandb (or leave --wandb out)") from None
        self.wandb, self.project, self.run, self.failed = wandb, project, None, False

    def add(self, status: dict[str, Any], step: int, points: list[tuple[str, float]]) -> None:
        if self.failed:
            return
        if self.run is None:
            peer = str(status.get("peer_id") or "peer")
            try:
                self.run = self.wandb.init(
                    project=self.project, group=status["run_id"], name=f"{status['run_id']}-{peer[-8:]}",
                    job_type="peer", config={"run_id": status["run_id"], "peer_id": peer}, reinit="create_new",
                )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - not logged in, no network: the curves are lost, not the training
                self.failed = True
                logger.warning("wandb did not start (%s): no curves in project %s; training goes on", e, self.project)
                return
        self.run.log(dict(points), step=step)

    def close(self) -> None:
        """Finish the run, and wait until wandb's service has written it: ``finish`` returns before the run's file
        has the last points (offline, 1 in 4 times here); ``teardown`` waits for the service to exit."""
        if self.run is not None:
            self.run.finish()
            self.wandb.teardown()


class CurveLog:
    """Adds the curves of the peer whose data directory is ``data_dir`` to each of ``sinks``."""

    def __init__(self, data_dir: Path, sinks: list[Any]):
        self.reader = Dashboard(data_dir)  # what the dashboard reads: the status and the ledger
        self.sinks = sinks
        self.last_step, self.written = -1, set()  # the last global step written, and its curves

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
        if step > self.last_step:
            self.last_step, self.written = step, set()
        points = [(tag, status.get(key)) for tag, key in SCALARS]
        rounds = status.get("rounds") if isinstance(status.get("rounds"), dict) else {}
        failed = rounds.get("failed") if isinstance(rounds.get("failed"), dict) else {}
        points += [("averaging/rounds_ok", rounds.get("ok")), ("averaging/rounds_failed", sum(failed.values()))]
        ledger = self.reader.ledger(status)
        if ledger is not None:
            points += [("energy/kwh", ledger.energy_kwh), ("energy/g_co2e", ledger.g_co2e)]
        new = [
            (tag, float(value))
            for tag, value in points
            if tag not in self.written and isinstance(value, int | float) and not isinstance(value, bool)
        ]
        if new:
            for sink in self.sinks:
                sink.add(status, step, new)
            self.written.update(tag for tag, _ in new)
        return True

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(EVERY_S):
            try:
                self.write()
            except Exception as e:  # noqa: BLE001 - a half-written file: read whole next time; training goes on
                logger.debug("curves: %r", e)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.write(final=True)
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.close()


@contextlib.contextmanager
def curves(tensorboard: str, wandb_project: str, data_dir: Path) -> Iterator[None]:
    """While the peer runs: its curves into the TensorBoard directory ``tensorboard`` and the wandb project
    ``wandb_project`` (neither if both are "")."""
    sinks: list[Any] = []
    if tensorboard:
        sinks.append(TensorBoardSink(Path(tensorboard).expanduser()))
        logger.info("TensorBoard curves in %s (tensorboard --logdir %s)", tensorboard, tensorboard)
    if wandb_project:
        sinks.append(WandbSink(wandb_project))
        logger.info("wandb curves in project %s", wandb_project)
    if not sinks:
        yield
        return
    log = CurveLog(data_dir, sinks)
    stop = threading.Event()
    thread = threading.Thread(target=log.run, args=(stop,), name="curves", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        log.close()
