"""The gate between training steps: whoever may pause training sets it, the trainer passes through it.

The volunteer daemon's idle policy sets one (a game started, too hot, off-schedule); the network watch another
(no relay left).

``Trainer.run`` calls ``gate.pass_through(stop)`` before every step. While the verdict is "pause"
the call blocks (waking every ``WAKE_S`` to notice a stop) after ``on_pause`` has released the GPU;
when the verdict turns to "run", ``on_resume`` takes the GPU back and catches up from the swarm.
While running with a duty cycle d < 1 the trainer rests ``compute × (1 − d) / d`` after each step,
so it computes a fraction d of the wall time (power and bandwidth caps).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

WAKE_S = 0.5
MAX_REST_S = 30.0  # one rest between steps is never longer than this


@dataclass(frozen=True)
class Verdict:
    """May training run now, and at what duty cycle."""

    run: bool
    reasons: tuple[str, ...] = ()  # why it is paused (empty when running)
    duty: float = 1.0  # fraction of wall time the trainer may compute
    notes: tuple[str, ...] = ()  # why it is throttled


class Gate:
    def __init__(self) -> None:
        self._verdict = Verdict(True)
        self._changed = threading.Condition()

    @property
    def verdict(self) -> Verdict:
        return self._verdict

    def set(self, verdict: Verdict) -> None:
        with self._changed:
            self._verdict = verdict
            self._changed.notify_all()

    def pass_through(
        self,
        stop: threading.Event,
        on_pause: Callable[[Verdict], None],
        on_resume: Callable[[float], None],
    ) -> None:
        """Return when training may go on (or ``stop`` is set); calls the hooks around a pause."""
        if self._verdict.run or stop.is_set():
            return
        paused_at = time.monotonic()
        on_pause(self._verdict)
        with self._changed:
            while not self._verdict.run and not stop.is_set():
                self._changed.wait(WAKE_S)
        if not stop.is_set():
            on_resume(time.monotonic() - paused_at)

    def rest(self, compute_s: float, stop: threading.Event) -> float:
        """After a step that computed ``compute_s``: wait out the duty cycle's share; returns seconds rested."""
        duty = self._verdict.duty
        if duty >= 1.0 or compute_s <= 0:
            return 0.0
        seconds = min(MAX_REST_S, compute_s * (1.0 - duty) / duty)
        stop.wait(seconds)
        return seconds
