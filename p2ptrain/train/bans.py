"""Local bans: a peer whose contributions keep failing the checks of ``robust.py`` is left out for a while.

Each averager keeps its own ``Bans`` (in the averager's process, where rounds run). A member whose copy of a part
was refused (``robust.check_contributions``) gets one strike for that round, however many parts were refused;
``STRIKES`` strikes within ``WINDOW_S`` ban it for ``COOLING_OFF_S``. While banned, this averager refuses its
requests to join a group this peer leads and to download its state, and leaves its contributions out unchecked
(also those that would pass the checks). In a group another member leads, a banned peer is still a member: leaving
would fail the round for every member. A ban is this peer's judgement only and is not published; strikes come from
what this averager refused itself and from other peers' evidence that it checked itself (``accusations.py``), so
one liar cannot get an honest peer banned by others. The ban ends by itself; a peer that lies again is banned
again.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

logger = logging.getLogger(__name__)

STRIKES = 3  # refused rounds within WINDOW_S that ban a peer
WINDOW_S = 600.0
COOLING_OFF_S = 1800.0


class Bans:
    def __init__(
        self,
        strikes: int = STRIKES,
        window_s: float = WINDOW_S,
        cooling_off_s: float = COOLING_OFF_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.strikes, self.window_s, self.cooling_off_s, self.clock = strikes, window_s, cooling_off_s, clock
        self._rounds: dict[str, deque[tuple[float, bytes]]] = {}  # peer → (time, round id) of its refused rounds
        self._until: dict[str, float] = {}

    def strike(self, peer: object, round_id: bytes, reason: str) -> bool:
        """Count a refused contribution of ``peer`` in round ``round_id``; True if this bans it (logged)."""
        key, now = str(peer), self.clock()
        if self.banned(key):
            return False
        rounds = self._rounds.setdefault(key, deque(maxlen=self.strikes))
        if any(seen == round_id for _, seen in rounds):
            return False
        rounds.append((now, round_id))
        if len(rounds) < self.strikes or now - rounds[0][0] > self.window_s:
            return False
        self._until[key] = now + self.cooling_off_s
        del self._rounds[key]
        logger.warning(
            "Banned peer %s for %.0f s: its contributions were refused in %d rounds within %.0f s (last: %s). This "
            "peer no longer averages with it until then",
            key,
            self.cooling_off_s,
            self.strikes,
            self.window_s,
            reason,
        )
        return True

    def banned(self, peer: object) -> bool:
        key = str(peer)
        until = self._until.get(key)
        if until is None:
            return False
        if self.clock() < until:
            return True
        del self._until[key]
        logger.info("The ban of peer %s has ended", key)
        return False
