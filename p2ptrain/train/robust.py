"""Robust aggregation of one part of an averaging round: the members' contributions are checked, then reduced by a
rule that a minority of dishonest members cannot drag far (``protocols/averaging.md``, "Robust aggregation").

hivemind splits a group's vector into parts; the member that aggregates a part receives every member's copy of it
and answers with their mean. Here that member first checks each contribution (``check_contributions``): the right
shape, finite values, a finite positive weight, and a norm at most ``NORM_BOUND`` times the group's median norm.
A failing member is left out of the part and every later part this member aggregates in the round, and the refusal
is logged with its peer id. The rest are reduced by the swarm's rule (``AGGREGATIONS``, a manifest field):

- ``centered_clip`` (default; Karimireddy et al. 2021, as in BTARD, Gorbunov et al. 2022): start at the
  coordinate-wise median, then repeat ``v += Σ wᵢ·clip(xᵢ − v, τ) / Σ wᵢ`` with τ the median distance of the
  members from the start. A far-off member moves the result by at most τ·wᵢ/Σ w; honest members, all about τ away,
  are left almost unclipped, so with all peers honest the result is close to the weighted mean.
- ``trimmed_mean``: per coordinate, drop the ⌊n/4⌋ (at least 1 when n ≥ 3) largest and smallest values, average
  the rest.
- ``median``: per coordinate, the median (the mean of the middle two when n is even).
- ``mean``: hivemind's weighted mean: no protection beyond the checks.

Weights (hivemind's sample counts, sent by each member) are capped at the members' median weight, so a member
cannot outweigh the others by claiming a huge batch; the coordinate-wise rules do not weight at all.

An aggregator can only protect its parts while honest members are the majority of the group. Where they are not
(two liars in a group of three), each member still refuses an average far off its own values (``AverageBound``):
a member trusts its own contribution, so an average whose norm exceeds ``NORM_BOUND`` times it fails the round for
that member, which then goes on with its own values as after any failed round.

``RobustPartReducer`` is hivemind's ``TensorPartReducer`` with this in place of its running sum: it keeps the
part's contributions until all current senders have sent it, then reduces them in a worker thread (so the
averager's event loop goes on serving the other parts meanwhile).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

from p2ptrain.swarm.manifest import AGGREGATIONS
from p2ptrain.train.bans import Bans

logger = logging.getLogger(__name__)

NORM_BOUND = 10.0  # a contribution whose norm exceeds this many times the members' median norm is refused
CLIP_RADIUS = 2.0  # CenteredClip's τ: this many times the members' median distance from the coordinate-wise median
CLIP_ITERATIONS = 20  # CenteredClip stops earlier once the result moves by less than CLIP_TOLERANCE of its norm
CLIP_TOLERANCE = 1e-5


def median(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The median along ``dim``, the mean of the middle two when their number is even (torch's ``median`` takes the
    lower one, which would favour the lower of two camps; ``quantile`` refuses tensors over 2**24 values)."""
    n = x.shape[dim]
    ordered = x.sort(dim=dim).values
    middle = ordered.narrow(dim, (n - 1) // 2, 2 - n % 2)
    return middle.mean(dim=dim)


@dataclass(frozen=True)
class Refusal:
    sender: int  # index among the round's senders
    reason: str


def check_contributions(
    parts: Sequence[torch.Tensor], weights: Sequence[float], shape: torch.Size
) -> tuple[list[int], list[Refusal]]:
    """Which contributions to one part may be reduced: indices of those kept, and why the others were refused.

    The norm bound is relative to the median norm of the contributions that passed the other checks, so it holds
    whatever the scale of what is averaged (gradients, pseudo-gradients, parameters). With an even number of them
    it is the lower of the middle two: two liars sending huge vectors in a group of four (or one in two) would
    otherwise set the bound themselves. Zero contributions (an honest member's gradient can be zero on a part) do
    not count towards the median."""
    kept, refused = [], []
    for i, (part, weight) in enumerate(zip(parts, weights, strict=True)):
        if not isinstance(part, torch.Tensor) or part.shape != shape or not part.is_floating_point():
            got = f"{tuple(part.shape)} {part.dtype}" if isinstance(part, torch.Tensor) else type(part).__name__
            refused.append(Refusal(i, f"a part of shape/dtype {got}, not {tuple(shape)} floating point"))
        elif not torch.isfinite(part).all():
            refused.append(Refusal(i, "non-finite values (NaN/inf)"))
        elif not (weight > 0 and weight < float("inf")):  # also refuses NaN
            refused.append(Refusal(i, f"weight {weight!r}, not a finite positive number"))
        else:
            kept.append(i)
    norms = torch.stack([parts[i].float().norm() for i in kept]) if kept else torch.zeros(0)
    if int((norms > 0).sum()) >= 2:
        limit = NORM_BOUND * float(norms[norms > 0].median())  # the lower middle: large norms are what do harm
        for i, norm in zip(list(kept), norms.tolist(), strict=True):
            if norm > limit:
                kept.remove(i)
                refused.append(Refusal(i, f"norm {norm:.3g}, beyond {NORM_BOUND:g}× the members' median"))
    return kept, refused


def reduce_parts(parts: Sequence[torch.Tensor], weights: Sequence[float], rule: str) -> torch.Tensor:
    """Reduce the checked contributions ``parts`` (all the same shape) to one by ``rule`` (one of AGGREGATIONS)."""
    if not parts:
        raise AllreduceException("no contribution to this part passed the checks")
    stacked = torch.stack([p.float().reshape(-1) for p in parts])  # (n, d)
    shape = parts[0].shape
    w = torch.tensor(weights, dtype=torch.float32)
    w = torch.minimum(w, median(w))
    if rule == "mean" or len(parts) == 1:
        result = (w[:, None] * stacked).sum(0) / w.sum()
    elif rule == "median":
        result = median(stacked)
    elif rule == "trimmed_mean":
        trim = max(len(parts) // 4, 1 if len(parts) >= 3 else 0)
        ordered = stacked.sort(dim=0).values
        result = ordered[trim : len(parts) - trim].mean(0)
    elif rule == "centered_clip":
        result = centered_clip(stacked, w)
    else:
        raise ValueError(f"unknown aggregation {rule!r}; one of {AGGREGATIONS}")
    return result.reshape(shape)


def centered_clip(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """CenteredClip of the rows of ``stacked`` (n, d) with ``weights`` (n,), from the coordinate-wise median."""
    v = median(stacked)
    tau = CLIP_RADIUS * float(median((stacked - v).norm(dim=1)))
    if tau == 0.0:
        return v
    w = weights / weights.sum()
    for _ in range(CLIP_ITERATIONS):
        diff = stacked - v
        scale = (tau / diff.norm(dim=1).clamp_min(1e-30)).clamp(max=1.0)
        step = ((w * scale)[:, None] * diff).sum(0)
        v = v + step
        if float(step.norm()) <= CLIP_TOLERANCE * float(v.norm()):
            break
    return v


class AverageBound:
    """What a member accepts back from a round, tensor by tensor: finite values, with a norm at most ``NORM_BOUND``
    times that of its own tensor (or of the tensor's share of its whole vector's norm, if larger: an honest member's
    own tensor may be near zero where the others' are not). Made from the member's tensors before the round;
    ``where`` names the group in the log line of a refusal."""

    def __init__(self, tensors: Sequence[torch.Tensor], where: str = ""):
        self.where = where
        norms = [float(t.detach().float().norm()) for t in tensors]
        total, numel = math.sqrt(sum(n * n for n in norms)), sum(t.numel() for t in tensors)
        trusted = math.isfinite(total) and total > 0  # nothing to measure against: only finiteness is checked
        self.limits = [
            NORM_BOUND * max(n, total * math.sqrt(t.numel() / numel)) if trusted else math.inf
            for n, t in zip(norms, tensors, strict=True)
        ]

    def refusal(self, index: int, average: torch.Tensor) -> str:
        """Why the average of tensor ``index`` is refused ("" if it is not); a refusal is logged at WARNING."""
        reason = ""
        if not torch.isfinite(average).all():
            reason = f"the group's average of tensor {index} is not finite (a member sent NaN/inf)"
        elif (norm := float(average.float().norm())) > self.limits[index]:
            reason = (
                f"the group's average of tensor {index} has norm {norm:.3g}, beyond {NORM_BOUND:g}× this peer's own "
                f"({self.limits[index] / NORM_BOUND:.3g}): members sending values far off the others' outnumbered "
                "the honest ones in this group"
            )
        if reason:
            logger.warning("Refused an averaging round with %s: %s; keeping this peer's values", self.where, reason)
        return reason


class RobustPartReducer(TensorPartReducer):
    """hivemind's ``TensorPartReducer`` that checks and robustly reduces each part (the module docstring).

    ``sender_ids``: the round's senders in hivemind's order, for the log; ``rule``: one of ``AGGREGATIONS``;
    ``where``: names the round in the log (e.g. the group id); ``bans``: this averager's, which count each refused
    sender's strike for ``round_id`` and whose banned senders are left out unchecked; ``on_refuse(sender, part)``:
    called for each contribution the checks refuse (which then becomes evidence: ``accusations.py``)."""

    def __init__(
        self,
        part_shapes: Sequence[torch.Size],
        sender_ids: Sequence[object],
        rule: str,
        where: str = "",
        bans: Bans | None = None,
        round_id: bytes = b"",
        on_refuse: Callable[[int, int], None] | None = None,
    ):
        if rule not in AGGREGATIONS:
            raise ValueError(f"unknown aggregation {rule!r}; one of {AGGREGATIONS}")
        self.sender_ids, self.rule, self.where = list(sender_ids), rule, where
        self.bans, self.round_id, self.on_refuse = bans, round_id, on_refuse
        # sender index → why its contributions are left out of this round
        self.refused: dict[int, str] = {
            i: "banned" for i, peer in enumerate(self.sender_ids) if bans is not None and bans.banned(peer)
        }
        self.contributions: dict[int, tuple[torch.Tensor, float]] = {}
        self.reducing = False
        self.reduction: asyncio.Future | None = None  # the part being reduced in a worker thread
        super().__init__(part_shapes, len(self.sender_ids))

    def reset_accumulators(self) -> None:
        """Begin collecting the next part (hivemind's, with a collection in place of the running sum)."""
        if self.current_part_index >= self.num_parts - 1:
            self.finalize()
            return
        self.current_part_index += 1
        self.current_part_accumulated_from = 0
        self.current_part_future = asyncio.Future()
        self.num_current_senders = sum(self.current_part_index < failed for failed in self.sender_failed_after)
        self.contributions = {}
        self.accumulator = None  # hivemind's finalize deletes it

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """Keep ``tensor_part`` until every current sender has sent this part; return the part's reduction."""
        if not (0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts):
            raise AllreduceException(f"part {part_index} from sender {sender_index} is out of range")
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            await asyncio.wait(
                {self.current_part_future, asyncio.ensure_future(self.finished.wait())},
                return_when=asyncio.FIRST_COMPLETED,
            )
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        if part_index != self.current_part_index or sender_index in self.contributions:
            raise AllreduceException(f"sender {sender_index} sent part {part_index} twice or out of order")
        future = self.current_part_future
        self.contributions[sender_index] = (tensor_part, float(weight))
        self.current_part_accumulated_from += 1
        self.check_current_part_finished()
        return await future

    def check_current_part_finished(self) -> None:
        if self.reducing or self.current_part_accumulated_from < self.num_current_senders:
            return
        self.reducing = True
        self.reduction = asyncio.ensure_future(self._reduce_current())  # referenced: a bare task may be collected

    async def _reduce_current(self) -> None:
        future, index = self.current_part_future, self.current_part_index
        shape = self.part_shapes[index]
        senders = [s for s in sorted(self.contributions) if s not in self.refused]
        parts = [self.contributions[s][0] for s in senders]
        weights = [self.contributions[s][1] for s in senders]
        try:
            reduced, refusals = await asyncio.get_running_loop().run_in_executor(
                None, self._reduce, parts, weights, shape
            )
            for refusal in refusals:
                self._refuse(senders[refusal.sender], index, refusal.reason)
            if not future.done():
                future.set_result(reduced)
        except (AllreduceException, ValueError, RuntimeError) as e:  # RuntimeError: torch's
            if not future.done():
                future.set_exception(e if isinstance(e, AllreduceException) else AllreduceException(repr(e)))
        finally:
            self.reducing = False
            if not self.finished.is_set() and future is self.current_part_future:
                self.reset_accumulators()

    def _reduce(self, parts: list, weights: list[float], shape: torch.Size) -> tuple[torch.Tensor, list[Refusal]]:
        kept, refusals = check_contributions(parts, weights, shape)
        return reduce_parts([parts[i] for i in kept], [weights[i] for i in kept], self.rule), refusals

    def _refuse(self, sender: int, part_index: int, reason: str) -> None:
        self.refused[sender] = reason
        if self.bans is not None:
            self.bans.strike(self.sender_ids[sender], self.round_id, reason)
        if self.on_refuse is not None:
            self.on_refuse(sender, part_index)
        logger.warning(
            "Averaging round %s: refused the contribution of peer %s to part %d (%s); it is left out of this "
            "round's parts that this peer aggregates",
            self.where,
            self.sender_ids[sender],
            part_index,
            reason,
        )
