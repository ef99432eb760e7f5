"""Every touch of hivemind's private names, and the one version of hivemind they were written against.

hivemind has no public hook for what p2ptrain changes in it: the codec a received tensor is decoded with, the
libp2p daemon it launches, who aggregates which part of a round and what members receive, how the swarm's progress
records are read, what its Optimizer does when a gradient round succeeds or fails, and how a group whose members
are known meets (``compat/matchmaking.py``). Each of those is reached here, through a function or a base class with
a public name; the rest of p2ptrain uses only those names (``tests/test_layout.py`` checks), so a hivemind upgrade
is reviewed in these two files, and ``check_version`` refuses to start with any other version.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import multiprocessing.process
import time
from collections.abc import Callable, Iterable, Sequence
from importlib.resources import path as resource_path
from typing import Any

import hivemind
import hivemind.optim.progress_tracker as progress_tracker
import hivemind.p2p.p2p_daemon as p2p_daemon
import torch
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import CompressionBase
from hivemind.compression import serialization as hivemind_serialization
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import aenumerate, as_aiter, azip
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.mpfuture import MPFuture, SharedBytes

from p2ptrain.compat.matchmaking import KnownGroups
from p2ptrain.errors import ConfigError

SUPPORTED = "1.1.12"  # pyproject.toml pins it; the names below are read from its source


def check_version(installed: str | None = None) -> None:
    """Refuse to run on a hivemind whose internals this module was not written for.

    Raises:
        ConfigError: another version is installed (the message names the supported one and the fix)."""
    installed = installed or importlib.metadata.version("hivemind")
    if installed != SUPPORTED:
        raise ConfigError(
            f"hivemind {installed} is installed; p2ptrain supports hivemind {SUPPORTED} only (it changes hivemind's "
            f"averaging from inside: p2ptrain/compat/hivemind.py). Reinstall p2ptrain: ./scripts/setup.sh"
        )


# -- codecs -----------------------------------------------------------------------------------------------------------


def register_codec(compression_type: str, codec: CompressionBase) -> None:
    """Decode every received tensor of ``compression_type`` (a ``runtime_pb2.CompressionType`` name) with ``codec``:
    hivemind decodes by the type on the wire, with the object in its registry, not the sender's."""
    hivemind_serialization._BASE_COMPRESSION_TYPES[compression_type] = codec


# -- the libp2p daemon ------------------------------------------------------------------------------------------------

DAEMON_FILENAME = p2p_daemon.P2PD_FILENAME


def set_daemon_launcher(launcher: Callable[[object, str], Any] | None) -> None:
    """hivemind finds its daemon with ``importlib.resources.path(hivemind_cli, "p2pd")``, looked up at each start
    in its module ``p2p_daemon``; ``launcher`` (the same signature, a context manager) replaces that look-up for
    every daemon this process starts from now on. None: hivemind's bundled Go daemon again."""
    p2p_daemon.path = launcher or resource_path


def daemon_launcher() -> Callable[[object, str], Any]:
    return p2p_daemon.path


async def disconnect(p2p: P2P, peer_id: PeerID) -> None:
    """Close every connection to ``peer_id`` (hivemind's P2P has no public disconnect; its daemon client has)."""
    await p2p._client.disconnect(peer_id)


# -- tasks ------------------------------------------------------------------------------------------------------------


class TaskHolder:
    """A task factory that keeps every task it makes until the task ends (``hold_tasks_until_done``)."""

    def __init__(self, previous: Callable | None) -> None:
        self.previous, self.tasks = previous, set()

    def keep(self, task: asyncio.Task) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def __call__(self, loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task:
        task = self.previous(loop, coro, **kwargs) if self.previous else asyncio.Task(coro, loop=loop, **kwargs)
        self.keep(task)
        return task


def hold_tasks_until_done() -> None:
    """Keep every task of the running event loop, those pending now and every later one, until it ends.

    hivemind's DHT and averager processes start a task for each request and drop it, and asyncio refers to tasks
    weakly. A task whose pending wait is on an ``MPFuture`` (a DHT call, a step's trigger) is then held only by a
    reference cycle (the future's event wakes the task, whose frame holds the future), and the garbage collector
    destroys it mid-way ("Task was destroyed but it is pending!"): its ``finally`` clauses never finish. In
    matchmaking that leaves the search and declare locks of ``PotentialLeaders`` held for good, and the averager
    never finds a group again ("could not find a group" after every round's full timeout); a DHT call fails with
    ``GeneratorExit``. Idempotent."""
    loop = asyncio.get_running_loop()
    if isinstance(loop.get_task_factory(), TaskHolder):
        return
    holder = TaskHolder(loop.get_task_factory())
    for task in asyncio.all_tasks(loop):
        holder.keep(task)
    loop.set_task_factory(holder)


async def hold_dht_tasks(_dht: hivemind.DHT, _node: Any) -> None:
    """``hold_tasks_until_done`` in a DHT's process: ``dht.run_coroutine(hold_dht_tasks)``."""
    hold_tasks_until_done()


# -- averagers --------------------------------------------------------------------------------------------------------


class AveragerHooks(KnownGroups):
    """Mixin for ``hivemind.averaging.DecentralizedAverager`` subclasses: public names for the two private methods
    p2ptrain changes. Mixins that override them (``aggregate_with_group``, ``run_allreduce_inplace``) derive from
    this class and call ``super()``; Python's method order puts this class after all of them and before hivemind's,
    so the chain ends in hivemind's own code."""

    async def _aggregate_with_group(self, group_info: GroupInfo, *args: Any, **kwargs: Any) -> Any:
        return await self.aggregate_with_group(group_info, *args, **kwargs)

    async def aggregate_with_group(self, group_info: GroupInfo, *args: Any, **kwargs: Any) -> Any:
        """Run one round with a formed group (hivemind: ``DecentralizedAverager._aggregate_with_group``)."""
        return await super()._aggregate_with_group(group_info, *args, **kwargs)

    def run_in_background(self, *args: Any, **kwargs: Any) -> None:
        """hivemind's, then ``hold_tasks_until_done`` in the averager's process (its first request)."""
        super().run_in_background(*args, **kwargs)
        self._outer_pipe.send(("_hold_tasks_until_done", [], {}))

    async def _hold_tasks_until_done(self) -> None:
        hold_tasks_until_done()

    @property
    def p2p(self) -> P2P:
        """The averager's connection to the libp2p daemon (in its own process, once started)."""
        return self._p2p

    async def _run_allreduce_inplace_(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, *args, **kwargs):
        return await self.run_allreduce_inplace(tensors, group_info, *args, **kwargs)

    async def run_allreduce_inplace(self, tensors: Sequence[torch.Tensor], group_info: GroupInfo, *args, **kwargs):
        """All-reduce ``tensors`` in place with the group (hivemind: ``_run_allreduce_inplace_``; ``*args``: the
        group id, which PowerSGD's averager passes for each of its two rounds)."""
        return await super()._run_allreduce_inplace_(tensors, group_info, *args, **kwargs)

    async def _shutdown(self, timeout: float | None) -> None:
        """hivemind's, for a round in flight too: hivemind 1.1 calls ``finalize`` on the future of each running group
        instead of on its runner (an AttributeError in the averager's thread at every stop during a round)."""
        if not self.client_mode:
            await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().finalize(cancel=True)
            else:
                future.cancel()

    def terminate(self) -> None:
        """Terminate the averager's process (as hivemind's shutdown does past its grace period) without leaving the
        peer's futures locked: ``terminate_processes``."""
        terminate_processes([self])


class RunnerHooks:
    """Mixin for ``hivemind.averaging.allreduce.AllReduceRunner`` subclasses: public names for the prefix and the two
    private methods p2ptrain changes: the messages a member sends to an aggregator, and how an aggregator reads a
    sender's stream."""

    @property
    def prefix(self) -> str | None:
        return self._prefix

    def _generate_input_for_peer(self, peer_index: int) -> Any:
        return self.generate_input_for_peer(peer_index)

    def generate_input_for_peer(self, peer_index: int) -> Any:
        """The ``AveragingData`` messages this member sends to the aggregator ``peer_index``."""
        return super()._generate_input_for_peer(peer_index)

    def _accumulate_parts_streaming(self, stream: Any, sender_index: int) -> Any:
        return self.accumulate_parts_streaming(stream, sender_index)

    def accumulate_parts_streaming(self, stream: Any, sender_index: int) -> Any:
        """Reduce the parts that ``sender_index`` streams in, answering each with its average."""
        return super()._accumulate_parts_streaming(stream, sender_index)


async def allreduce_to_values(
    averager: Any,
    runner_type: type[AllReduceRunner],
    tensors: Sequence[torch.Tensor],
    group_info: GroupInfo,
    group_id: bytes | None = None,
    refusal: Callable[[int, torch.Tensor], str] | None = None,
    **kwargs: Any,
) -> AllReduceRunner:
    """hivemind's ``DecentralizedAverager._run_allreduce_inplace_`` with a runner of ``runner_type`` that yields
    each tensor's *average* (not, as hivemind's, the difference to add): the tensors become it (or move towards it
    by the averager's alpha). Returns the runner, finished, for the caller to check.

    ``refusal(index, average)``: why tensor ``index``'s average must not be taken ("" if it may); from the first
    refused one on, the tensors keep their values, the round runs to its end (this member still serves the parts it
    aggregates) and then raises."""
    group_id = group_info.group_id if group_id is None else group_id
    runner = runner_type(
        p2p=averager._p2p,
        servicer_type=type(averager),
        prefix=averager.prefix,
        tensors=tensors,
        group_id=group_id,
        ordered_peer_ids=group_info.peer_ids,
        **kwargs,
    )
    if group_id not in averager._running_groups:
        raise AllreduceException(f"group {group_id!r} was not registered")
    averager._running_groups[group_id].set_result(runner)
    alpha = averager._averaging_alpha
    if runner.modes[group_info.peer_ids.index(averager.peer_id)] != AveragingMode.AUX:
        refused = ""
        async for index, (tensor, average) in aenumerate(azip(as_aiter(*tensors), runner)):
            refused = refused or (refusal(index, average) if refusal is not None else "")
            if refused:
                continue
            tensor.lerp_(average, alpha) if alpha != 1 else tensor.copy_(average)
            averager.last_updated = get_dht_time()
            averager._state_updated.set()
        if refused:
            raise AllreduceException(refused)
    else:
        async for _ in runner:
            raise AllreduceException("aux peers should not receive averaged tensors")
    return runner


def input_part(container: Any, peer_index: int, part_index: int) -> tuple[torch.Tensor, Any]:
    """The part ``part_index`` a ``TensorPartContainer`` sent to member ``peer_index``, with its ``CompressionInfo``."""
    return container._input_parts_by_peer[peer_index][part_index]


def record_signing_key(der: bytes) -> RSAPrivateKey:
    """hivemind's ``RSAPrivateKey`` holding a given DER RSA key (hivemind makes only fresh ones, or unpickles)."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key.__setstate__({"_private_key": der})
    return key


# -- processes --------------------------------------------------------------------------------------------------------


def terminate_processes(processes: Iterable[multiprocessing.process.BaseProcess], wait_s: float = 0.5) -> None:
    """Terminate hivemind's child processes (averagers, a DHT) without leaving the peer's futures locked.

    Every process forked from this one shares three locks of hivemind's cross-process futures (creating one, sending
    its result). A process terminated inside one leaves it held for good, and every later future in every process
    of the peer waits on it (seen: a shutdown hung 600 s). So the locks are held here while the processes die:
    none of them can be inside. Each gets SIGTERM, then SIGKILL after ``wait_s``; locks another process holds
    longer than that are left alone."""
    processes = [process for process in processes if process.is_alive()]
    locks = [SharedBytes._lock, MPFuture._initialization_lock, MPFuture._update_lock]
    deadline = time.monotonic() + wait_s
    with contextlib.ExitStack() as held:
        for lock in locks:
            if lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                held.callback(lock.release)
        for process in processes:
            multiprocessing.process.BaseProcess.terminate(process)  # not an override of it, which calls this function
        deadline = time.monotonic() + wait_s
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()


class ProgressTracker(progress_tracker.ProgressTracker):
    """hivemind's ``ProgressTracker`` with a public name for how it reads the swarm's progress records."""

    def _parse_swarm_progress_data(self, metadata: Any) -> progress_tracker.GlobalTrainingProgress:
        return self.swarm_progress(metadata)

    def swarm_progress(self, metadata: Any) -> progress_tracker.GlobalTrainingProgress:
        """The swarm's progress from the records read under ``<run>_progress`` (hivemind: ``_parse_swarm_…``)."""
        return super()._parse_swarm_progress_data(metadata)


class Optimizer(hivemind.Optimizer):
    """``hivemind.Optimizer`` with public names for the three private methods p2ptrain changes, and the class of its
    progress tracker as ``progress_tracker_type`` (hivemind names its own class inside ``_make_progress_tracker``)."""

    progress_tracker_type: type[ProgressTracker] = ProgressTracker

    def _make_progress_tracker(self, target_batch_size: int, **kwargs: Any) -> ProgressTracker:
        # hivemind's body (optimizer.py), with the subclass's tracker
        return self.progress_tracker_type(
            dht=self.dht,
            prefix=self.run_id,
            target_batch_size=target_batch_size,
            client_mode=self.client_mode,
            status_loglevel=self.status_loglevel,
            start=True,
            **kwargs,
        )

    def _make_state_averager(self, **kwargs: Any) -> Any:
        return self.make_state_averager(**kwargs)

    def make_state_averager(self, **kwargs: Any) -> Any:
        """The ``TrainingStateAverager`` that hivemind's ``__init__`` creates (hivemind: ``_make_state_averager``)."""
        return super()._make_state_averager(**kwargs)

    def _load_local_gradients_into_optimizer(self) -> None:
        self.use_own_gradients()

    def use_own_gradients(self) -> None:
        """The gradient round failed: this step applies this peer's own (hivemind: ``_load_local_gradients_…``)."""
        super()._load_local_gradients_into_optimizer()

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control: Any) -> None:
        self.use_averaged_gradients(maybe_step_control)

    def use_averaged_gradients(self, maybe_step_control: Any) -> None:
        """Wait for the gradient round and apply its average (hivemind: ``_average_gradients_and_load_…``); on
        failure hivemind calls ``use_own_gradients``."""
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
