"""Averaging rounds among peers that may sit behind NAT: who aggregates a part, and what counts as a round done.

hivemind splits a group's vector into one part per member; each member aggregates its part from everybody and
sends the average back. Two things go wrong among volunteers behind NAT routers, and this module fixes both for
every averager p2ptrain runs (gradients, optimizer state, compressed and local-update ones), as a mixin:

1. **Who aggregates.** A member nobody can open a direct connection to cannot aggregate: every other member's
   part for it would have to cross a relay, which is no data path (``nat.py``). Each member reports its
   reachability kind with its bandwidth in the group's all-gather; from the same reports every member derives
   the same shares (``nat.aggregates``): a member that cannot aggregate gets a share of 0 and only sends its part
   and receives the average, as hivemind's client-mode peers do.
2. **A round that lost a part is not a success.** hivemind's all-reduce does not fail when one member's exchange
   with another fails: the sender keeps its own values for that part, the aggregator leaves the sender out, and
   the round still returns as averaged with everybody, so members end the step with different values and nobody
   says so. Here a member whose result is missing a part (it kept its own values for some of the vector) fails
   the round, which hivemind then retries or reports as failed ("proceeding with local gradients"); a member
   that had to leave a sender out of the part it aggregated says so in the log. The parameter check after each
   global step (``param_check.py``) then finds and resynchronises any member whose parameters left the group's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.group_info import GroupInfo

from p2ptrain.nat import aggregates
from p2ptrain.reachability import Kind

logger = logging.getLogger(__name__)


class GroupRounds:
    """Mixin for hivemind's ``DecentralizedAverager`` subclasses (listed first among the bases).

    ``reach_kind``: this peer's reachability kind (``reachability.Kind``), reported in each round's all-gather."""

    def __init__(self, *args: Any, reach_kind: str = Kind.UNKNOWN, **kwargs: Any):
        self.reach_kind = str(reach_kind)
        super().__init__(*args, **kwargs)

    # hivemind gathers [bandwidth, mode, user data] from each member (averager.py step()); the bandwidth slot
    # carries [bandwidth, reach kind] between p2ptrain's averagers, and is turned back before hivemind reads it.
    @property
    def bandwidth(self) -> list[Any]:
        return [self._bandwidth, self.reach_kind]

    @bandwidth.setter
    def bandwidth(self, value: float | None) -> None:
        self._bandwidth = value

    async def _aggregate_with_group(self, group_info: GroupInfo, *args: Any, **kwargs: Any) -> Any:
        return await super()._aggregate_with_group(with_shares(group_info, self.serializer), *args, **kwargs)

    async def _run_allreduce_inplace_(self, tensors: Any, group_info: GroupInfo, group_id: bytes | None = None, **kw):
        await super()._run_allreduce_inplace_(tensors, group_info, group_id=group_id, **kw)
        runner_future = self._running_groups.get(group_info.group_id if group_id is None else group_id)
        if runner_future is not None and runner_future.done() and not runner_future.cancelled():
            check_whole(runner_future.result(), group_info)


def with_shares(group_info: GroupInfo, serializer: Any) -> GroupInfo:
    """``group_info`` with each member's reported [bandwidth, kind] replaced by the bandwidth hivemind shares the
    vector by: 0 for a member that cannot aggregate (``nat.aggregates``)."""
    entries = [serializer.loads(raw) for raw in group_info.gathered]
    reported = [entry[0] for entry in entries]
    if not all(isinstance(r, list) and len(r) == 2 and isinstance(r[1], str) for r in reported):
        raise AllreduceException("a group member did not report its reachability (not a p2ptrain averager)")
    kinds = [r[1] for r in reported]
    chosen = aggregates(kinds)
    gathered = tuple(
        serializer.dumps([r[0] if ok else 0.0, *entry[1:]])
        for r, ok, entry in zip(reported, chosen, entries, strict=True)
    )
    if not all(chosen):
        logger.debug(
            "Group %s: members %s only send (reachability %s)",
            group_info.group_id.hex()[:8],
            [str(p)[-6:] for p, ok in zip(group_info.peer_ids, chosen, strict=True) if not ok],
            kinds,
        )
    return dataclasses.replace(group_info, gathered=gathered)


def check_whole(runner: Any, group_info: GroupInfo) -> None:
    """Raise if this member's result is missing a part; log the senders its own part had to leave out."""
    container = runner.tensor_part_container
    if runner.banned_senders:
        logger.warning(
            "Averaging round with %d peers: %s sent nothing in time; the part this peer aggregated averages the "
            "others only",
            group_info.group_size,
            ", ".join(str(p) for p in runner.banned_senders),
        )
    if container.failed_size:
        share = container.failed_size / max(container.total_size, 1)
        raise AllreduceException(
            f"{share:.0%} of the vector came back from nobody (an aggregating peer failed or was unreachable): the "
            f"round with {group_info.group_size} peers is incomplete"
        )
