"""A grouped swarm's outer round (manifest ``averaging.group_size``): every level of the grid in turn, in one step.

``grouping`` lays Moshpit SGD's grid over clusters of nearby peers. Moshpit averages *parameters*, one level per
step, and the differences between peers contract over the passes. The local-update mode averages pseudo-gradients
(compressible: small and centred, unlike parameters), and averaging those does not contract differences between the
peers' anchors: a peer that applied another group's average stays apart for good. So here a global step's round
runs the levels of one pass back to back, each averaging what the one before left in the averager's tensors — the
peer's cluster first (nearby, fast), then one peer of each cluster across regions — and every peer applies the
result. Where the clusters fill the grid (at most ``size`` clusters, or a power of it) that is the weighted mean of
the whole swarm on every peer, as with one group for all: each member sends, as its weight, the weight its values
already stand for times its ``Group.share``. Elsewhere peers end close to it (``grouping``), and a round that fails
at one level carries the peer's values to the next.

Traffic per peer and step is one vector per level (1 + log_size of the cluster count), and only the levels above 0
cross regions, each in a group of at most about ``size`` peers.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from p2ptrain.swarm.grouping import Group, step_bits
from p2ptrain.train.group_rounds import RoundOutcome

logger = logging.getLogger(__name__)

SETTLE_S = 5.0  # beyond a level's share of the timeout: how long to wait for its result before giving up on it


class LevelRounds:
    """One outer round over ``groups`` (this peer's groups at every level, level 0 first; or a function that derives
    them, called in the round's thread within its timeout, so that reading the swarm's records does not hold up the
    training), run in a thread. It quacks like hivemind's ``StepControl`` as far as ``LocalUpdateOptimizer`` uses
    one (``done``, ``result``, ``cancel``);
    its result is the last successful level's ``RoundOutcome`` with the whole round's time and bytes, and
    ``group_size`` the peers whose values the result holds. It fails only when no level succeeded. Every member of a
    level's group knows the others, so they meet without the DHT (``compat.matchmaking``): the lowest peer id
    leads."""

    def __init__(
        self,
        averager: Any,
        groups: list[Group] | Callable[[], list[Group]],
        *,
        gather: dict[str, Any],
        weight: float,
        timeout: float,
        max_weight: float,
        epoch: int,
        through_dht: bool = False,
    ):
        self.averager, self._groups, self.gather, self.timeout = averager, groups, gather, timeout
        self.weight, self.max_weight, self.epoch = weight, max_weight, epoch
        self.through_dht = through_dht  # each level's group meets as hivemind's do (a benchmark's baseline)
        self.me = averager.peer_id.to_base58()
        self._ended: Future = Future()
        self._cancelled = threading.Event()
        self._control: Any = None
        threading.Thread(target=self._run, name="level rounds", daemon=True).start()

    def done(self) -> bool:
        return self._ended.done()

    def cancelled(self) -> bool:
        return self._cancelled.is_set() and self._ended.done()

    def result(self, timeout: float | None = None) -> RoundOutcome:
        return self._ended.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._ended.exception(timeout)

    def cancel(self) -> bool:
        self._cancelled.set()
        control = self._control
        if control is not None and not control.done():
            control.cancel()
        return True

    def _run(self) -> None:
        try:
            self._ended.set_result(self._levels())
        except BaseException as e:  # noqa: BLE001 - the optimizer applies its own update
            self._ended.set_exception(e)

    def _levels(self) -> RoundOutcome:
        deadline = time.monotonic() + self.timeout
        # derived from the records read now, in this thread: the training goes on meanwhile
        groups = self._groups() if callable(self._groups) else self._groups
        weight, covers, last, seconds, sent, done = self.weight, 1, None, 0.0, 0.0, []
        for i, group in enumerate(groups):
            if self._cancelled.is_set():
                raise RuntimeError("cancelled")
            if len(group.members) < 2:
                continue  # alone at this level (a cluster of one, or a grid not full): nothing to average
            left = max(0.5, (deadline - time.monotonic()) / (len(groups) - i))
            self.averager.set_group(step_bits(group.key_bits, self.epoch), group.members, through_dht=self.through_dht)
            mine = weight * group.share
            self._control = self.averager.step(  # no retries: the others of this group move on to the next level
                gather={**self.gather, "weight": mine, "covers": covers},
                weight=mine,
                timeout=left,
                allow_retries=False,
                wait=False,
            )
            try:
                outcome = self._control.result(timeout=left + SETTLE_S)
            except BaseException as e:  # noqa: BLE001 - this level failed: the next one gets this peer's values
                if self._cancelled.is_set():
                    raise RuntimeError("cancelled") from e
                logger.info("Global step %d: level %d's round failed (%r)", self.epoch, group.level, e)
                if not self._control.done():
                    self._control.cancel()
                continue
            members = sorted(peer.to_base58() for peer in outcome)
            logger.info(
                "Global step %d: level %d of %d averaged in a group of %d (%s), %.2f s",
                self.epoch, group.level, len(groups), outcome.group_size, " ".join(members), outcome.round_s,
            )  # fmt: skip
            done.append((group.level, [p for p in members if p != self.me], round(outcome.round_s, 3)))
            weight = min(self.max_weight, sum(_reported(outcome, "weight", mine, self.max_weight)))
            covers = int(min(1e6, sum(_reported(outcome, "covers", covers, 1e6))))
            seconds, sent, last = seconds + outcome.round_s, sent + outcome.bytes_sent, outcome
        if last is None:
            raise RuntimeError(f"no level of the grid's {len(groups)} averaged")
        last.round_s, last.bytes_sent, last.group_size, last.levels = seconds, sent, covers, tuple(done)
        return last


def _reported(outcome: RoundOutcome, name: str, own: float, bound: float) -> list[float]:
    """What each member of a level's group said it sent (``weight``) or stood for (``covers``); a value that is not
    a positive finite number, or above ``bound``, counts as this peer's own (a member's word moves only its share)."""
    values = []
    for data in outcome.values():
        value = data.get(name) if isinstance(data, dict) else None
        ok = type(value) in (int, float) and math.isfinite(value) and 0 < value <= bound
        values.append(float(value) if ok else own)
    return values
