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
- take the least compressed level that fits, but loosen by at most two levels (≈4x the bytes) per
  round: a faster link is probed in steps, a slower one is followed at once. Round times below
  ``MIN_ROUND_S`` count as that much, so one lucky tiny round cannot jump to the densest level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from p2ptrain.codecs import LADDER, Level

MAX_SECONDS = 86_400.0  # a report claiming more is not believed
MAX_LOOSEN = 2  # levels per round
MIN_ROUND_S = 0.05


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


def choose_level(
    reports: Sequence[RoundReport | None], numel: int, budget: float, ladder: Sequence[Level] = LADDER
) -> int:
    """The LADDER index the group uses this round (see the module docstring)."""
    most = len(ladder) - 1
    known = [r for r in reports if r is not None and r.level is not None and r.round_s > 0]
    computes = [r.compute_s for r in reports if r is not None and r.compute_s > 0]
    if not known or not computes:
        return most
    allowed_s = budget * min(computes)
    loosest = max(0, max(r.level for r in known) - MAX_LOOSEN)

    def predicted_s(level: int) -> float:
        """floor + (round − floor) scaled by the payload: only the part above the floor grows with bytes."""
        return max(
            r.floor_s
            + max(r.round_s - r.floor_s, MIN_ROUND_S)
            * ladder[level].bytes_for(numel)
            / ladder[r.level].bytes_for(numel)
            for r in known
        )

    for level in range(loosest, most + 1):
        if predicted_s(level) <= allowed_s:
            return level
    return most
