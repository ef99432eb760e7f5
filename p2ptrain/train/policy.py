"""The adaptive compression policy: every member of a group derives the same level from the same facts.

Before the all-reduce of a round, hivemind's matchmaking hands every member the same list of the
members' *reports* (the all-gather of ``DecentralizedAverager.step(gather=...)``), ordered like the
group. Each report says what that peer saw in its last round: the level used, how long the
all-reduce took, and how much compute time the peer spent between rounds. ``choose_level`` is a pure
function of that list, so all members choose the same level with no coordinator (protocols/averaging.md).

The rule keeps the expected all-reduce time within ``budget`` × compute time:
- no member has history → the most compressed level (start conservative);
- predicted time of a level = the slowest member's: its floor (the shortest recent round: latency,
  scheduling) plus the rest of its recent round time scaled by the payload ratio;
- the group's current level is the most compressed one its members used last. If that one no longer
  fits, tighten at once to the least compressed level that does (a slower link is followed at once);
- otherwise loosen by at most two levels (≈4x the bytes) per round, and only to a level predicted to
  take at most ``LOOSEN_MARGIN`` of the allowed time: a faster link is probed in steps, and a level
  near the limit is kept rather than toggled each round by noise in the measured round times.
  Round times below ``MIN_ROUND_S`` count as that much, so one lucky tiny round cannot jump to the
  densest level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2ptrain.train.codecs import LADDER, Level

MAX_SECONDS = 86_400.0  # a report claiming more is not believed
MAX_LOOSEN = 2  # levels per round
MIN_ROUND_S = 0.05
LOOSEN_MARGIN = 0.7  # a looser level must be predicted to fit with this much to spare


@dataclass(frozen=True)
class RoundReport:
    level: int | None  # LADDER index used in the peer's last round; None before its first round
    round_s: float  # all-reduce time at that level: median of the peer's last 3 rounds (0 if none)
    compute_s: float  # forward/backward seconds the peer spent since its previous round
    floor_s: float = 0.0  # the shortest of its recent rounds: the part of a round that bytes do not buy

    def to_wire(self) -> dict[str, Any]:
        level = -1 if self.level is None else self.level
        return {"level": level, "round_s": self.round_s, "compute_s": self.compute_s, "floor_s": self.floor_s}

    @classmethod
    def from_wire(cls, raw: Any, ladder: Sequence[Level] = LADDER) -> RoundReport | None:
        """Parse another peer's report; None if it is malformed (that peer then counts as having no history)."""
        if not isinstance(raw, dict):
            return None
        level, round_s, compute_s, floor_s = (raw.get(k) for k in ("level", "round_s", "compute_s", "floor_s"))
        if not (isinstance(level, int) and -1 <= level < len(ladder)):
            return None
        times = (round_s, compute_s, floor_s)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= MAX_SECONDS for v in times):
            return None
        return cls(None if level < 0 else level, float(round_s), float(compute_s), min(float(floor_s), float(round_s)))


@dataclass(frozen=True)
class Plan:
    level: int  # LADDER index
    predicted_s: float | None = None  # expected round time at that level; None without history
    allowed_s: float | None = None  # budget x the slowest member's compute time


def choose_level(
    reports: Sequence[RoundReport | None], numel: int, budget: float, ladder: Sequence[Level] = LADDER
) -> int:
    """The LADDER index the group uses this round (see the module docstring)."""
    return plan_round(reports, numel, budget, ladder).level


def plan_round(
    reports: Sequence[RoundReport | None], numel: int, budget: float, ladder: Sequence[Level] = LADDER
) -> Plan:
    """``choose_level`` with its prediction and allowance, for the round's log line."""
    most = len(ladder) - 1
    known = [r for r in reports if r is not None and r.level is not None and r.round_s > 0]
    computes = [r.compute_s for r in reports if r is not None and r.compute_s > 0]
    if not known or not computes:
        return Plan(most)
    allowed_s = budget * min(computes)

    def predicted_s(level: int) -> float:
        """floor + (round − floor) scaled by the payload: only the part above the floor grows with bytes."""
        return max(
            r.floor_s
            + max(r.round_s - r.floor_s, MIN_ROUND_S)
            * ladder[level].bytes_for(numel)
            / ladder[r.level].bytes_for(numel)
            for r in known
        )

    current = max(r.level for r in known)
    loosest = max(0, current - MAX_LOOSEN)
    if predicted_s(current) > allowed_s:
        level = next((level for level in range(current + 1, most + 1) if predicted_s(level) <= allowed_s), most)
    else:
        looser = (level for level in range(loosest, current) if predicted_s(level) <= LOOSEN_MARGIN * allowed_s)
        level = next(looser, current)
    return Plan(level, predicted_s(level), allowed_s)
