"""How a peer's optimizer stops within a bounded time: its averager processes (``stop_optimizer``) and the training
step in progress (``abandon_round``), whichever averaging mode it runs (``optimizers.PeerOptimizer``)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import traceback
from multiprocessing.process import BaseProcess
from typing import Any

from p2ptrain.compat.hivemind import terminate_processes
from p2ptrain.train.optimizers import PeerOptimizer

logger = logging.getLogger(__name__)

GOODBYE_S = 3.0  # hivemind's graceful shutdown of the averagers, at most; then they are terminated


def stop_optimizer(optimizer: PeerOptimizer, step_running: bool, goodbye_s: float = GOODBYE_S) -> None:
    """Stop the optimizer's averager processes: hivemind's own shutdown (goodbye to the swarm, each averager given
    its grace period) or, while a training step is still running inside hivemind (holding its locks, its round
    cancelled but not returned), terminate them outright. The graceful way would race with that step: seen taking
    6.8 s and failing with "Set changed size during iteration"; the progress record it would clear expires alone.

    The goodbye gets ``goodbye_s`` in all: it first waits for a state-averaging round running in the background
    (hivemind's ``delay_state_averaging``), up to the averaging timeout; seen taking 7.8 s of a SIGTERMed peer's
    12.3 s. Cut short, that round fails for its group as if this peer had dropped out; this peer loses nothing (its
    result would have been applied at the next step)."""
    if not step_running:
        # a round the last step arranged ahead: hivemind's shutdown would join it with zero weight and wait for
        # it (up to the averaging timeout; seen taking > 20 s on slow links); forgotten, so not cancelled twice
        optimizer.cancel_rounds(forget=True)
        goodbye = threading.Thread(target=_say_goodbye, args=(optimizer,), name="goodbye", daemon=True)
        goodbye.start()
        goodbye.join(goodbye_s)
        if not goodbye.is_alive():
            return
        logger.warning(
            "Saying goodbye took over %.0f s (in %s): terminating the averagers", goodbye_s, _where(goodbye.ident)
        )
    terminate_processes(child for child in vars(optimizer).values() if isinstance(child, BaseProcess))


def _where(thread_id: int | None) -> str:
    """The innermost calls of a thread outside Python's own library, e.g. ``state_averager.py:400 step``."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    stdlib = os.path.dirname(threading.__file__)
    calls = [f for f in traceback.extract_stack(frame) if not f.filename.startswith(stdlib)] if frame else []
    return " ← ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(calls[-2:])) or "?"


def _say_goodbye(optimizer: Any) -> None:
    try:
        optimizer.shutdown()
    except Exception as e:  # noqa: BLE001 - after the deadline, its averagers and DHT stop under it
        logger.debug("Goodbye ended with %r", e)


def abandon_round(worker: threading.Thread, optimizer: PeerOptimizer | None, grace_s: float) -> None:
    """Give the current step ``grace_s`` to finish; then cancel its averaging round so it returns now."""
    worker.join(grace_s)
    if worker.is_alive() and optimizer is not None:
        logger.info("Leaving the averaging round in progress")
        optimizer.cancel_rounds()
        worker.join(1.5)  # a step still blocked in hivemind after the cancel rarely returns later
    if worker.is_alive():
        logger.warning("The training step did not stop in time; shutting down around it")
