"""hivemind's DHT and averager processes drop the tasks they start; p2ptrain holds them until they end
(``compat.hold_tasks_until_done``), so that the garbage collector cannot destroy one mid-way and leave its locks
held: an averager whose cancelled round was collected so never found a group again."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage
from hivemind.utils.mpfuture import MPFuture

from p2ptrain.compat.hivemind import AveragerHooks
from p2ptrain.settings import PeerSettings
from p2ptrain.swarm import nat, network
from p2ptrain.swarm.identity import ensure_identity


async def wait_for(future: MPFuture) -> None:
    await future


async def a_dropped_task_outlives_a_collection(_dht: hivemind.DHT, _node: object) -> bool:
    """In a DHT's process: a task nobody refers to, waiting on an MPFuture (as a DHT call's task does), and a full
    collection; whether the future (held by the task's frame) is still there to be answered."""
    future = MPFuture()
    asyncio.create_task(wait_for(future))
    alive = weakref.ref(future)
    del future
    await asyncio.sleep(0.05)
    gc.collect()
    survivor = alive()
    if survivor is not None:
        survivor.set_result(None)
    return survivor is not None


def test_the_dht_of_a_peer_holds_its_tasks(tmp_path):
    (tmp_path / "me").mkdir()
    ensure_identity(tmp_path / "me")
    settings = PeerSettings(data_dir=tmp_path / "me", host="127.0.0.1", port=0)
    peer_dht = network.start_dht(settings, tmp_path / "me", [], [], nat.PUBLIC)
    plain = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        assert peer_dht.run_coroutine(a_dropped_task_outlives_a_collection)
        assert not plain.run_coroutine(a_dropped_task_outlives_a_collection)  # what it would be without
    finally:
        peer_dht.shutdown()
        plain.shutdown()


class CollectedAverager(AveragerHooks, DecentralizedAverager):
    """p2ptrain's averager hooks, and a way to run a full collection in the averager's process."""

    def collect_garbage(self) -> None:
        future = MPFuture()
        self._outer_pipe.send(("_collect_garbage", [], dict(future=future)))
        future.result(timeout=10)

    async def _collect_garbage(self, future: MPFuture) -> None:
        gc.collect()
        future.set_result(None)


def test_an_averager_whose_cancelled_round_meets_the_garbage_collector_still_finds_groups():
    """A round cancelled while it looks for a group (p2ptrain cancels the round of a step it will not take), a
    collection in the averager's process while the cancelled search cleans up, then a real round with a second
    averager: three times. Without the held tasks the first or second real round already failed, and every one
    after it ("could not find a group": the search's locks stayed held)."""
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    options = dict(prefix="held", target_group_size=2, min_matchmaking_time=1.0, request_timeout=0.5, start=True)
    ours = CollectedAverager([torch.zeros(16)], first, **options)
    other = CollectedAverager([torch.ones(16)], second, **options)
    try:
        for attempt in range(3):
            cancelled = ours.step(wait=False, timeout=5)
            time.sleep(0.05 + 0.03 * attempt)  # into the search: it has declared itself in the DHT
            cancelled.cancel()
            for _ in range(5):  # the cancelled search's clean-up awaits DHT calls: collect while it does
                ours.collect_garbage()
                time.sleep(0.01)
            deadline = time.monotonic() + 10
            while cancelled.stage != AveragingStage.FINISHED and time.monotonic() < deadline:
                time.sleep(0.05)
            rounds = [ours.step(wait=False, timeout=8), other.step(wait=False, timeout=8)]
            for step in rounds:
                step.result(timeout=15)
            with torch.no_grad(), ours.get_tensors() as (tensor,):
                assert torch.allclose(tensor, torch.full_like(tensor, 0.5)), (attempt, tensor)
                tensor.zero_()
            with torch.no_grad(), other.get_tensors() as (tensor,):
                tensor.fill_(1.0)
    finally:
        for process in (ours, other, first, second):
            process.shutdown()
