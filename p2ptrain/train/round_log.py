"""This peer's averaging rounds as its owner sees them: how many succeeded, how many failed and why, the bytes they
moved, and the last few (the dashboard's table, ``/metrics``' counters, ``status.json``).

Bytes are the round's payload as the butterfly all-reduce moves it (``averaging.payload_bytes``): this peer sends
its parts to their aggregators and the averages of the part it aggregates back, and receives as much; the libp2p
framing, matchmaking and DHT traffic are not in it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

KEEP = 20  # rounds kept for the table

# what a failure's text says → the reason it is counted under (first match); anything else is "error"
REASONS = (
    ("timeout", ("timeout", "timed out")),
    ("no group", ("could not find a group", "no group", "not looking for group", "matchmaking")),
    ("refused average", ("the group's average of tensor",)),
    ("incomplete", ("came back from nobody", "incomplete")),
    ("unreachable group", ("can be reached directly by all the others",)),
    ("not admitted", ("not admitted",)),
    ("behind the swarm", ("without this peer",)),  # the swarm took the round's step without it (step_numbers)
    ("cancelled", ("cancelled", "canceled")),
)


def failure_reason(error: BaseException | str) -> str:
    """The reason a failed round counts under (``REASONS``)."""
    text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else error
    text = text.lower()
    return next((reason for reason, marks in REASONS if any(mark in text for mark in marks)), "error")


class RoundLog:
    """Counts and the last ``KEEP`` rounds; thread-safe (rounds end on the trainer's thread, the status is written
    from it too)."""

    def __init__(self, keep: int = KEEP, clock: Any = time.time):
        self.keep, self.clock = keep, clock
        self._lock = threading.Lock()
        self.ok, self.failed = 0, {}
        self.bytes_sent = self.bytes_received = 0.0
        self.last: list[dict[str, Any]] = []

    def succeeded(
        self, step: int, peers: int, codec: str, payload: float | None, seconds: float | None, levels: tuple = ()
    ) -> None:
        """A round of ``peers`` members that averaged this peer's values; ``payload``: its bytes each way (None:
        not known for this codec), ``seconds``: the all-reduce's time (None: not measured); ``levels``: a grouped
        round's levels, each (level, the other members' peer ids, seconds)."""
        with self._lock:
            self.ok += 1
            self.bytes_sent += payload or 0.0
            self.bytes_received += payload or 0.0
            self._keep({"step": step, "ok": True, "peers": peers, "codec": codec,
                        "bytes": None if payload is None else round(payload),
                        "seconds": None if seconds is None else round(seconds, 3),
                        **({"levels": [list(level) for level in levels]} if levels else {})})  # fmt: skip

    def failed_with(self, step: int, error: BaseException | str) -> str:
        reason = failure_reason(error)
        with self._lock:
            self.failed[reason] = self.failed.get(reason, 0) + 1
            self._keep({"step": step, "ok": False, "reason": reason, "detail": str(error)[:200]})
        return reason

    def as_status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "rounds": {"ok": self.ok, "failed": dict(self.failed)},
                "bytes_sent": self.bytes_sent,
                "bytes_received": self.bytes_received,
                "last_rounds": list(self.last),
            }

    def _keep(self, entry: dict[str, Any]) -> None:
        self.last = [*self.last, {"at": self.clock(), **entry}][-self.keep :]
