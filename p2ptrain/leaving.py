"""How a stay in the swarm ends: each part's stop run in turn, timed, a failure logged without skipping the rest.

``peer.stay`` puts each part's stop on an ``ExitStack`` as the part starts (wrapped by ``Leaving.timed``), so the
shutdown order is the start order reversed; the log line "Stopped in 4.2 s (finish the step 0.1 s, ...)" comes from
the ``ShutdownClock``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from p2ptrain.processes import descendants

logger = logging.getLogger(__name__)


class ShutdownClock:
    """Times each shutdown phase, so a slow stop says which phase was slow."""

    def __init__(self) -> None:
        self._start = self._last = time.monotonic()
        self._laps: list[tuple[str, float]] = []

    def lap(self, name: str) -> None:
        now = time.monotonic()
        self._laps.append((name, now - self._last))
        self._last = now

    def total(self) -> float:
        return time.monotonic() - self._start

    def summary(self) -> str:
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self._laps)


class Leaving:
    """How a stay ends: whether it rejoins, the processes to reap, and each stop timed."""

    def __init__(self) -> None:
        self.rejoining = False
        self.children: list[Any] = []
        self.worker: threading.Thread | None = None  # the trainer's thread, once started
        self.clock = ShutdownClock()

    def begin(self, rejoining: bool) -> None:
        self.rejoining, self.children, self.clock = rejoining, descendants(), ShutdownClock()

    def summarize(self) -> None:
        done = "Left to rejoin" if self.rejoining else "Stopped"
        logger.info("%s in %.1f s (%s)", done, self.clock.total(), self.clock.summary())

    def timed(self, name: str, stop: Callable[..., Any], *args: Any) -> Callable[[], None]:
        """``stop(*args)`` as a step of the shutdown: timed, and a failure logged, never stopping the next steps."""

        def step() -> None:
            try:
                stop(*args)
            except Exception as e:  # noqa: BLE001 - the rest of the shutdown must still happen
                logger.warning("Leaving: %s failed: %r", name, e)
            self.clock.lap(name)

        return step
