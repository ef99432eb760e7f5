"""hivemind averagers that compress with the ladder of ``codecs`` and, when adaptive, choose the rung per round.

``CompressedAllReduce`` replaces ``aggregate_with_group`` (hivemind's, named in ``compat.hivemind``) — the code that
runs in the averager process once a group has formed — the way hivemind's own PowerSGD averager does:
1. read the members' reports from the group's all-gather and choose the level (``policy``), or use
   the fixed one from the manifest;
2. flatten the local tensors, add the error-feedback residual (gradient mode; in local mode the
   parameters themselves carry what was not sent), keep the shared random-k coordinates;
3. run hivemind's all-reduce on that vector with the level's codec, and beside it work out what the codec
   takes from the parts this member sends (``codecs.codec_loss``);
4. write the average back in place (``GroupRounds`` has refused a non-finite or far-off one) and
   commit the new residual, the codec's loss included (gradient mode), or hand that loss to the local
   mode's optimizer (``feedback``), whose parameters keep it. A failed round changes nothing: hivemind
   then falls back to local values.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.compression import CompressionInfo
from hivemind.optim.grad_averager import GradientAverager
from hivemind.utils.asyncio import enter_asynchronously

from p2ptrain.compat.hivemind import AveragerHooks
from p2ptrain.train.codecs import DENSE, LADDER, Level, codec_loss, densify, part_size, shared_indices, sparsify_
from p2ptrain.train.group_rounds import GroupRounds, RoundOutcome
from p2ptrain.train.policy import Plan, RoundReport, plan_round
from p2ptrain.train.step_numbers import EpochReports

logger = logging.getLogger(__name__)


class CompressedAllReduce(AveragerHooks):
    """Mixin for ``DecentralizedAverager`` subclasses; call ``_init_compression`` before their ``__init__``."""

    def _init_compression(
        self,
        fixed: Level | None,
        budget: float,
        error_feedback: bool,
        dense: bool = False,
        feedback: list[torch.Tensor] | None = None,
    ) -> None:
        """``dense``: adaptive on the dense rungs of the ladder only (a grouped swarm's levels chain their averages,
        which random-k's per-round coordinates would not). ``feedback``: tensors shaped as the averaged ones, in
        shared memory, into which a successful round writes what the codec took from this member's values (0 where
        it took nothing), for the owner to keep."""
        self._fixed, self._budget, self._error_feedback = fixed, budget, error_feedback
        self._ladder = tuple(level for level in LADDER if level.ratio >= 1.0) if dense else LADDER
        self._residual: torch.Tensor | None = None
        self._feedback = feedback

    def _choose(self, group_info: GroupInfo, user_gathered: dict, numel: int) -> tuple[Plan | None, Level]:
        syncing = [isinstance(g, dict) and g.get("params") is True for g in user_gathered.values()]
        if any(syncing):  # the local mode's parameters themselves (``sync_every``): exactly, or not at all
            if not all(syncing):
                raise AllreduceException("the members of this group disagree on what it averages (step numbers?)")
            return None, Level("none")
        if self._fixed is not None:
            return None, self._fixed
        reports = [
            RoundReport.from_wire(g.get("report") if isinstance(g, dict) else None, self._ladder)
            for g in (user_gathered[p] for p in group_info.peer_ids)
        ]
        plan = plan_round(reports, numel, self._budget, self._ladder)
        return plan, self._ladder[plan.level]

    async def aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs) -> RoundOutcome:
        try:
            bandwidths, mode_ids, user_bytes = zip(*map(self.serializer.loads, group_info.gathered), strict=True)
            user_gathered = dict(zip(group_info.peer_ids, map(self.serializer.loads, user_bytes), strict=True))
            modes = tuple(map(AveragingMode, mode_ids))
            download = [b if m != AveragingMode.CLIENT else 0.0 for b, m in zip(bandwidths, modes, strict=True)]
            async with enter_asynchronously(self.get_tensors()) as local_tensors:
                flat = torch.cat([t.detach().reshape(-1).float().cpu() for t in local_tensors])
                numel = flat.numel()
                plan, level = self._choose(group_info, user_gathered, numel)
                residual = self._residual.clone() if self._residual is not None else torch.zeros(numel)
                if level.ratio >= 1.0:
                    indices, values = None, flat.add_(residual)
                    residual.zero_()
                else:
                    indices = shared_indices(group_info.group_id, numel, level.ratio)
                    values = sparsify_(flat, residual, indices)
                loop = asyncio.get_event_loop()
                fractions = await loop.run_in_executor(
                    None, load_balance_peers, values.numel(), download, min_vector_size
                )
                kwargs.update(
                    compression=DENSE[level.codec](),
                    tensor_infos=(CompressionInfo.from_tensor(values, key=0),),
                    part_size_bytes=part_size(level.bytes_for(numel), len(group_info.peer_ids)),
                )
                loss = None
                if level.codec != "none" and (self._error_feedback or self._feedback is not None):
                    own = group_info.peer_ids.index(self.peer_id)
                    partition = (fractions, kwargs["compression"], kwargs["part_size_bytes"], own)
                    # beside the all-reduce (which overwrites ``values`` with the average), on a copy
                    loss = loop.run_in_executor(None, codec_loss, values.clone(), *partition)
                started = time.perf_counter()
                try:
                    await self.run_allreduce_inplace([values], group_info, peer_fractions=fractions, **kwargs)
                finally:
                    lost = None if loss is None else await loss
                round_s = time.perf_counter() - started
                if lost is not None and indices is not None:
                    lost = densify(lost, indices, numel)
                dense = values if indices is None else densify(values, indices, numel)
                split_like(dense, local_tensors)
                if self._error_feedback:
                    self._residual = residual if lost is None else residual.add_(lost)
                if self._feedback is not None and lost is not None:
                    split_like(lost, self._feedback)
                elif self._feedback is not None:  # the codec took nothing (fp32, or a parameter round)
                    for tensor in self._feedback:
                        tensor.zero_()
            outcome = RoundOutcome(user_gathered)
            outcome.level, outcome.codec, outcome.round_s = plan.level if plan else -1, level.describe(), round_s
            outcome.plan = plan
            outcome.group_size = len(group_info.peer_ids)
            outcome.ratio, outcome.group_id = level.ratio, group_info.group_id
            outcome.bytes_sent = payload_bytes(level, numel, len(group_info.peer_ids))
            return outcome
        except BaseException as e:
            if isinstance(e, Exception):
                logger.warning("Averaging round failed: %r", e)
            raise AllreduceException(f"Unable to run All-Reduce: {e!r}") from e


def split_like(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy the flat vector into ``tensors``, in order."""
    offset = 0
    for tensor in tensors:
        tensor.copy_(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()


def payload_bytes(level: Level, numel: int, group_size: int) -> float:
    """Bytes one peer sends in a butterfly all-reduce: its (n-1)/n share out, averaged parts back."""
    return 2.0 * level.bytes_for(numel) * (group_size - 1) / max(group_size, 1)


class CompressedGradientAverager(EpochReports, GroupRounds, CompressedAllReduce, GradientAverager):
    """hivemind.Optimizer's gradient averager with a fixed level (int8, random-k with error feedback)."""

    def __init__(self, *args: Any, level: Level, **kwargs: Any):
        self._init_compression(level, budget=1.0, error_feedback=True)
        super().__init__(*args, **kwargs)


class PseudoGradientAverager(GroupRounds, CompressedAllReduce, DecentralizedAverager):
    """Averages the local-update mode's pseudo-gradients; adaptive when ``level`` is None."""

    def __init__(
        self,
        tensors: list[torch.Tensor],
        *,
        level: Level | None,
        budget: float,
        dense: bool = False,
        feedback: list[torch.Tensor] | None = None,
        **kwargs: Any,
    ):
        self._init_compression(level, budget, error_feedback=False, dense=dense, feedback=feedback)
        super().__init__(averaged_tensors=tensors, **kwargs)
