"""hivemind's all-reduce runner as p2ptrain's averagers run it: every member ends a round with the same average, or
every member fails it.

Two rules on top of hivemind's code paths (``group_rounds`` says why a group needs them):

1. **One average for all.** The part reducer answers with an average from which hivemind's "average minus the
   sender's part" is the average itself (what goes on the wire, exactly); and this member's container keeps the
   averages it receives (and the one it aggregated itself, after the same compression) as values, which
   ``allreduce_to_values`` copies into the tensors: every member's tensors become the same bits.
2. **A part that lost a member fails the round on every member.** hivemind's aggregator averages a part without a
   sender whose stream failed or never came (``sender_timeout``), answers everybody with that average, and the
   round succeeds for all but the sender, which alone ends the step with other values. Here the aggregator answers
   such a part, and every part after it, with an error instead: every member's result then lacks them, so every
   member fails the round (``check_whole``) and hivemind retries it or reports it failed on all of them alike. A
   sender the aggregator refused on purpose (a part that fails the robust checks, an unsigned part, a banned peer)
   is left out of the average and does not fail the round: a liar must not be able to stop its group's rounds
   more cheaply than by leaving it. What no aggregator can see, an average it sent that never reached a member,
   still fails that member alone; the parameter check after the global step (``param_check``) resynchronises it.

The parts this member aggregates are checked and reduced by the manifest's ``aggregation``
(``robust.RobustPartReducer``) instead of hivemind's plain mean, and each part it sends is signed
(``signed_parts``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator  # noqa: UP035 - hivemind reads handlers' stream types from typing's only

import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import deserialize_torch_tensor
from hivemind.proto import averaging_pb2

from p2ptrain.compat.hivemind import RunnerHooks, input_part
from p2ptrain.train.accusations import Evidence
from p2ptrain.train.bans import Bans
from p2ptrain.train.robust import RobustPartReducer
from p2ptrain.train.shares import TimedSends
from p2ptrain.train.signed_parts import PartSigner, Receipts, Unverified

logger = logging.getLogger(__name__)


class PartLostAMember(AllreduceException):
    """A part's average left out a sender whose stream failed: this member's round fails, and everybody's."""


class SameAverageRunner(TimedSends, RunnerHooks, AllReduceRunner):
    """hivemind's all-reduce with the two rules of the module docstring; ``accuse(peer id, evidence)`` receives the
    evidence against a sender whose part the checks refused (``accusations.py``)."""

    def __init__(
        self, *, aggregation: str, bans: Bans | None = None, signer: PartSigner | None = None, accuse: Any = None,
        **kwargs: Any,
    ):  # fmt: skip
        super().__init__(**kwargs)
        self.signer, self.accuse = signer, accuse
        self.receipts = None if signer is None else Receipts(
            self.prefix, self.group_id, self.peer_id.to_bytes(), self.sender_peer_ids, bans
        )  # fmt: skip
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        where = f"{self.group_id.hex()[:8]} ({len(self.ordered_peer_ids)} peers)"
        reducer = RobustPartReducer(
            shapes, self.sender_peer_ids, aggregation, where, bans, self.group_id, on_refuse=self._evidence
        )  # fmt: skip
        self.tensor_part_reducer.finished.set()  # hivemind's own, unused: finished, it leaves without a warning
        own = self.ordered_peer_ids.index(self.peer_id)
        own_sender = self.sender_peer_ids.index(self.peer_id) if self.peer_id in self.sender_peer_ids else None
        fail_own = lambda: self.tensor_part_container.register_failed_reducer(own)  # noqa: E731
        self.tensor_part_reducer = _AnswerAverage(reducer, own_sender, fail_own)
        _take_averages(self.tensor_part_container, own)

    @property
    def left_out(self) -> list[Any]:
        """The senders whose loss failed this round's parts that this member aggregates (none: nothing failed)."""
        return [self.sender_peer_ids[i] for i in sorted(self.tensor_part_reducer.left_out)]

    async def generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's messages to one aggregator, each part stamped with its signature (``signed_parts.py``)."""
        aggregator, part_index = self.ordered_peer_ids[peer_index].to_bytes(), 0
        async for message in super().generate_input_for_peer(peer_index):
            if self.signer is not None:
                where = (self.prefix, self.group_id, aggregator, part_index, message.tensor_part)  # hashing: ~0.3 ms
                message.peer_id = await asyncio.get_running_loop().run_in_executor(None, self.signer.stamp_part, *where)
            part_index += 1
            yield message

    def accumulate_parts_streaming(self, stream: AsyncIterator[Any], sender_index: int) -> AsyncIterator[Any]:
        if self.receipts is not None:
            stream = self._checked(stream, sender_index)
        return super().accumulate_parts_streaming(stream, sender_index)

    async def _checked(self, stream: AsyncIterator[Any], sender_index: int) -> AsyncIterator[Any]:
        """The sender's stream, each part's stamp checked; a sender with a bad stamp is refused, not lost."""
        try:
            async for message in self.receipts.checked(stream, sender_index):
                yield message
        except Unverified as e:
            self.tensor_part_reducer.refused[sender_index] = f"a part not signed by its key: {e}"
            raise

    def _evidence(self, sender_index: int, part_index: int) -> None:
        """Hand the part of a sender the reducer refused to the averager as evidence (``accusations.py``)."""
        kept = None if self.receipts is None else self.receipts.kept(sender_index, part_index)
        if kept is not None and self.accuse is not None:
            evidence = Evidence(self.prefix, self.group_id, self.peer_id.to_bytes(), *kept).encode()
            self.accuse(str(self.sender_peer_ids[sender_index]), evidence)


class _Average:
    """An averaged part for which ``average - sender_part`` is the average: hivemind computes that difference
    (allreduce.py ``_accumulate_parts_streaming`` and the local part in ``_communicate_with_peer``) and nothing else."""

    def __init__(self, average: torch.Tensor):
        self.average = average

    def __sub__(self, _sender_part: torch.Tensor) -> torch.Tensor:
        return self.average


class _AnswerAverage:
    """A ``TensorPartReducer`` whose ``accumulate_part`` answers with the average itself (``_Average``), or, for a
    part that left out a sender it did not refuse, raises ``PartLostAMember`` (hivemind then answers that sender's
    stream with an error). This member's own part is not a stream: ``fail_own`` registers its loss."""

    def __init__(self, reducer: RobustPartReducer, own_sender: int | None, fail_own: Any):
        self._reducer, self._own_sender, self._fail_own = reducer, own_sender, fail_own
        self.left_out: set[int] = set()  # sender indices: the first part that failed saw them missing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reducer, name)

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor, **kwargs: Any):
        average = await self._reducer.accumulate_part(sender_index, part_index, tensor_part, **kwargs)
        reducer = self._reducer
        lost = {s for s, after in enumerate(reducer.sender_failed_after) if after <= part_index} - set(reducer.refused)
        if lost:
            self.left_out = self.left_out or lost
            if sender_index == self._own_sender:
                self._fail_own()
            raise PartLostAMember(f"part {part_index} lost sender(s) {sorted(lost)}")
        return _Average(average)


def _take_averages(container: Any, own: int) -> None:
    """Make ``container`` (a ``TensorPartContainer``) hold values: each average registered (this member's own part
    after the codec the others received it through), and its own values for a failed aggregator's parts."""
    register = container.register_processed_part
    container.return_deltas = False  # what register_failed_reducer then keeps: the member's own values

    def register_average(peer_index: int, part_index: int, average: torch.Tensor) -> None:
        part, info = input_part(container, peer_index, part_index)
        if peer_index == own and average is not part:  # what the other members receive: the average after the codec
            average = deserialize_torch_tensor(container.compression.compress(average, info))
        register(peer_index, part_index, average.to(part.dtype))

    container.register_processed_part = register_average


def check_whole(runner: Any, group_info: GroupInfo) -> None:
    """Raise if this member's result is missing a part, saying which senders the parts it aggregated lost."""
    container = runner.tensor_part_container
    if runner.left_out:
        raise AllreduceException(
            f"{', '.join(map(str, runner.left_out))} sent nothing in time for the parts this peer aggregates: the "
            f"round with {group_info.group_size} peers fails on every member"
        )
    if container.failed_size:
        raise AllreduceException(
            f"{container.failed_size:,} of {container.total_size:,} values came back from nobody (an aggregating peer "
            f"failed, was unreachable or lost a member's part): the round with {group_info.group_size} peers is "
            f"incomplete"
        )
