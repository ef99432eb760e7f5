"""Local-update mode (DiLoCo): many cheap local steps, one compressed exchange per global step.

Every peer runs its inner optimizer (AdamW) on every batch. When the swarm has processed
``target_batch_size`` samples since the last global step (hivemind's ``ProgressTracker`` — the same
signal hivemind's Optimizer uses), each peer computes its *pseudo-gradient* Δ = θ_anchor − θ (how far
its local steps moved it from the last agreed parameters), the group averages Δ — compressed, and
weighted by samples — and every peer applies the average to θ_anchor with the outer optimizer
(SGD, Nesterov momentum). Then θ = the new θ_anchor, less what the codec took from this peer's Δ
(error feedback: the next Δ carries it).

Communication overlaps computation: the round runs in the averager process while the peer keeps
taking local steps; when it lands, the local progress made meanwhile (θ − θ_sent) is kept on top of
the new anchor. So a round costs no compute time unless it outlasts a whole global step; then the
peer waits for it before the next one (so that all peers meet in the next matchmaking).

Late joiners download θ_anchor, the outer momentum and the global step from a peer (the averager's
state sharing); everything downloaded is checked against our own tensors before use.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import InvalidStateError
from typing import Any

import torch
from hivemind.averaging.control import StepControl
from hivemind.dht import DHT

from p2ptrain.swarm.admission import Admission
from p2ptrain.swarm.grouping import Group
from p2ptrain.train.codecs import Level
from p2ptrain.train.group_rounds import RoundOutcome
from p2ptrain.train.level_rounds import LevelRounds
from p2ptrain.train.outer_step import averaged_masks, outer_step_
from p2ptrain.train.policy import RoundReport
from p2ptrain.train.progress import CheckedProgressTracker
from p2ptrain.train.round_log import RoundLog
from p2ptrain.train.shares import take_measurements
from p2ptrain.train.signed_parts import PartSigner
from p2ptrain.train.state_download import StateSharingAverager, check_state

logger = logging.getLogger(__name__)
REPORT_EVERY_S = 0.5  # progress reports to the swarm, at most this often


class LocalUpdateOptimizer:
    """Inner/outer optimizer pair behind the interface the trainer uses (``optimizers.PeerOptimizer``)."""

    def __init__(
        self,
        *,
        dht: DHT,
        run_id: str,
        param_groups: list[dict],
        inner: Callable[[list[dict]], torch.optim.Optimizer],
        scheduler: Callable[[torch.optim.Optimizer], Any],
        outer_lr: float,
        outer_momentum: float,
        target_batch_size: int,
        batch_size_per_step: int,
        level: Level | None,
        budget: float,
        matchmaking_time: float,
        averaging_timeout: float,
        request_timeout: float,
        tracker_opts: dict[str, float],
        reach_kind: str = "unknown",
        aggregation: str = "centered_clip",
        admission: Admission | None = None,
        signer: PartSigner | None = None,
        group_size: int = 0,
        sync_every: int = 0,
    ):
        """``group_size``: a grouped swarm's (``level_rounds``); its rounds run over ``passes`` once the peer sets it
        (this peer's groups at every level, read at each round's start). ``sync_every``: every that many global
        steps the round averages the parameters themselves, exactly, and every member takes the average as its anchor
        (a round that failed or split leaves anchors apart, and averaging pseudo-gradients never joins them again)."""
        self.sync_every, self._syncing, self._stopping = sync_every, False, False
        self.passes: Callable[[], list[Group]] | None = None
        self.params = [p for group in param_groups for p in group["params"]]
        self.inner = inner(param_groups)
        self.scheduler = scheduler(self.inner)
        self.anchor = [p.detach().to("cpu", copy=True) for p in self.params]  # θ_anchor, the agreed parameters
        self.momentum = [torch.zeros_like(a) for a in self.anchor]  # the outer optimizer's
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.batch_size, self.averaging_timeout = batch_size_per_step, averaging_timeout
        self.local_epoch = 0
        self.samples = 0  # since the last global step
        self.compute_s = 0.0  # between step() calls since the last round: the peer's forward/backward time
        self.recent: list[tuple[int, float]] = []  # (level, round seconds) of the last rounds, newest last
        self.scheduled_grads: StepControl | LevelRounds | None = None  # the round in flight
        self._state_lock = threading.Lock()  # a served state's anchor, momentum and step are of one moment
        self._sent: list[torch.Tensor] = []
        self._left_step_at: float | None = None
        self._reported_at = -math.inf
        self._idle_s = 0.0
        self.round_log = RoundLog()
        # what the codec took from this peer's last pseudo-gradient, written by the averager's process: the
        # parameters keep it, so the next pseudo-gradient sends it (grouped rounds chain levels: none there)
        self.feedback = None if group_size > 0 else [torch.zeros_like(a).share_memory_() for a in self.anchor]
        self.tracker = CheckedProgressTracker(dht, run_id, target_batch_size, start=True, **tracker_opts)
        self.averager = StateSharingAverager(
            [torch.zeros_like(a) for a in self.anchor],
            owner=self,
            level=level,
            budget=budget,
            dht=dht,
            prefix=f"{run_id}_outer",
            min_matchmaking_time=matchmaking_time,
            request_timeout=request_timeout,
            allreduce_timeout=averaging_timeout,
            allow_state_sharing=not dht.client_mode,  # a client cannot serve its state
            reach_kind=reach_kind,
            aggregation=aggregation,
            admission=admission,
            signer=signer,
            dense=group_size > 0,
            feedback=self.feedback,
            start=True,
        )

    # the interface the Trainer uses -------------------------------------------------------------

    def step(self) -> None:
        now = time.perf_counter()
        if self._left_step_at is not None:
            self.compute_s += max(0.0, now - self._left_step_at - self._idle_s)
        self._idle_s = 0.0
        self.inner.step()
        self.inner_step_s += time.perf_counter() - now
        self.samples += self.batch_size
        unreported = self.samples - self.tracker.local_progress.samples_accumulated
        completes = self.tracker.global_progress.samples_accumulated + unreported >= self.tracker.target_batch_size
        if completes or now - self._reported_at >= REPORT_EVERY_S:  # a report is a DHT store: not one per batch
            self.tracker.report_local_progress(self.local_epoch, self.samples)
            self._reported_at = now
        if self.scheduled_grads is not None and self.scheduled_grads.done():
            self._finish_round()
        if self.tracker.ready_to_update_epoch and not self._stopping:
            # A round still in flight when the next is due is waited for: starting late would make us
            # miss the others' matchmaking. The wait is not compute time, so the policy sees it.
            self.wait_for_round(timeout=self.averaging_timeout)
            if not self._stopping:  # a shutdown during the wait: no new round
                self._begin_round()
        self._left_step_at = time.perf_counter()

    def mark_idle(self, seconds: float) -> None:
        """The trainer paused or rested this long since the last step: not compute time for the policy."""
        self._idle_s += seconds

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def load_state_from_peers(self) -> None:
        loaded = self.averager.load_state_from_peers(timeout=max(30.0, self.averaging_timeout))
        if loaded is None:
            logger.warning("No peer sent its state; continuing from ours")
            return
        metadata, tensors = loaded
        try:
            epoch = check_state(metadata, tensors, [*self.anchor, *self._momenta()])
        except ValueError as e:
            logger.warning("Ignoring the state a peer sent: %s", e)
            return
        n = len(self.anchor)
        with self._state_lock, torch.no_grad():
            self.local_epoch, self.samples = epoch, 0
            for anchor, param, momentum, value, buffer in zip(
                self.anchor, self.params, self._momenta(), tensors[:n], tensors[n:], strict=True
            ):
                anchor.copy_(value)
                param.copy_(value)
                momentum.copy_(buffer)
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.local_epoch)

    def state_dict(self) -> dict:
        """The inner optimizer's state, then one entry per parameter with its anchor and outer momentum."""
        inner = self.inner.state_dict()
        state = dict(inner["state"])
        for i, (anchor, momentum) in enumerate(zip(self.anchor, self._momenta(), strict=True)):
            state[len(self.params) + i] = {"anchor": anchor, "outer_momentum": momentum}
        return {"state": state, "param_groups": inner["param_groups"]}

    def load_state_dict(self, saved: dict) -> None:
        n = len(self.params)
        state = saved["state"]
        outer = {i - n: state[i] for i in list(state) if isinstance(i, int) and i >= n}
        inner = {i: v for i, v in state.items() if not (isinstance(i, int) and i >= n)}
        self.inner.load_state_dict({"state": inner, "param_groups": saved["param_groups"]})
        if len(outer) != n:
            raise ValueError(f"checkpoint holds {len(outer)} anchors for {n} parameters")
        with torch.no_grad():
            for i, (anchor, momentum) in enumerate(zip(self.anchor, self._momenta(), strict=True)):
                anchor.copy_(outer[i]["anchor"])
                momentum.copy_(outer[i]["outer_momentum"])

    # PeerOptimizer (optimizers.py) -------------------------------------------------------------------

    last_group: list[str] | None = None  # rounds average pseudo-gradients; the parameters are not compared
    on_links: Callable[[dict[str, float]], None] | None = None  # per-link rates of each round (shares.py)
    inner_step_s = 0.0  # in the inner optimizer's steps, all told: training compute, as forward/backward is

    def resume_at(self, epoch: int) -> None:
        self.local_epoch = epoch

    def learning_rate(self) -> float:
        return float(self.inner.param_groups[0]["lr"])

    def shared_params(self) -> None:
        return None  # members hold different parameters between outer steps

    def inner_optimizer(self) -> torch.optim.Optimizer:
        return self.inner

    def own_update_at(self, epoch: int) -> bool:
        return False

    def behind_group_at(self, epoch: int) -> bool:
        return False

    def pause(self, timeout_s: float) -> None:
        self.wait_for_round(timeout=timeout_s)

    def cancel_rounds(self, forget: bool = False) -> None:
        """At shutdown: the round in flight fails (our own update is applied when the step lands it), and no
        new one begins."""
        self._stopping = True
        control = self.scheduled_grads
        if control is not None and not control.done():
            control.cancel()

    def offer_state_first(self, epoch: int) -> None:
        pass  # state is shared on request, by whoever is asked first

    def land_state_round(self) -> None:
        pass  # no state averaging in the background

    def shutdown(self) -> None:
        control, self.scheduled_grads = self.scheduled_grads, None
        if control is not None and not control.done():
            with contextlib.suppress(InvalidStateError):  # already cancelled by the peer's shutdown
                control.cancel()
        self.averager.shutdown()
        self.tracker.shutdown()

    # the rounds ---------------------------------------------------------------------------------

    def _begin_round(self) -> None:
        if (step := self._next_round()) > self.local_epoch:
            logger.info("Global step %d: the swarm is at step %d; this round is its", self.local_epoch, step)
            self.local_epoch = step
        self._syncing = self.sync_every > 0 and (self.local_epoch + 1) % self.sync_every == 0
        with torch.no_grad(), self.averager.get_tensors() as buffers:
            for buffer, anchor, param in zip(buffers, self.anchor, self.params, strict=True):
                if self._syncing:  # the parameters themselves
                    buffer.copy_(param.detach().cpu())
                else:  # the pseudo-gradient
                    buffer.copy_(anchor).sub_(param.detach().cpu())
        self._sent = [p.detach().to("cpu", copy=True) for p in self.params]
        gather, weight = {"report": self._report().to_wire(), "params": self._syncing}, float(self.samples)
        if self.passes is None:
            control = self.averager.step(gather=gather, weight=weight, timeout=self.averaging_timeout, wait=False)
        else:
            limit = 2.0 * self.tracker.target_batch_size  # the samples a whole step of the swarm stands for, and more
            control = LevelRounds(
                self.averager, self.passes, gather=gather, weight=weight, timeout=self.averaging_timeout,
                max_weight=limit, epoch=self.local_epoch,
            )  # fmt: skip
        with self._state_lock:
            self.scheduled_grads = control
            self.local_epoch += 1
        self.compute_s, self.samples = 0.0, 0
        with self.tracker.pause_updates():
            self.tracker.update_epoch(self.local_epoch)

    def _finish_round(self) -> None:
        outcome: RoundOutcome | None = None
        try:
            outcome = self.scheduled_grads.result(timeout=0)
        except BaseException as e:  # noqa: BLE001 - any failure means: apply our own pseudo-gradient
            logger.info("Global step %d: averaging failed (%s); applying our own update", self.local_epoch, e)
            self.round_log.failed_with(self.local_epoch, e)
        masks = None if outcome is None else averaged_masks(outcome.group_id, outcome.ratio, self.anchor)
        # A failed round's update is our own pseudo-gradient, anchor − θ_sent: not read from the averager's
        # tensors, whose lock its process holds until a round it still runs ends (up to the averaging timeout).
        averaged = self.averager.get_tensors() if outcome is not None else contextlib.nullcontext(None)
        with self._state_lock, torch.no_grad(), averaged as buffers:
            self.scheduled_grads = None
            deltas = buffers if buffers is not None else [a - s for a, s in zip(self.anchor, self._sent, strict=True)]
            for i, (anchor, momentum, delta, param, sent) in enumerate(
                zip(self.anchor, self.momentum, deltas, self.params, self._sent, strict=True)
            ):
                if self._syncing and outcome is not None:  # the members' average parameters: everybody's anchor
                    anchor.copy_(delta)
                else:
                    outer_step_(anchor, momentum, delta, self.outer_lr, self.outer_momentum, masks and masks[i])
                new = anchor + (param.detach().cpu() - sent)  # θ = anchor + the progress made during the round
                if outcome is not None and self.feedback is not None:  # + what the codec did not carry
                    new -= self.feedback[i]
                if masks is None:
                    param.copy_(new)
                else:  # elsewhere θ keeps its local progress: the next pseudo-gradient carries it
                    param.copy_(torch.where(masks[i], new, param.detach().cpu()))
        self.scheduler.step()
        if outcome is not None:
            self.round_log.succeeded(
                self.local_epoch, outcome.group_size, outcome.codec, outcome.bytes_sent, outcome.round_s, outcome.levels
            )
            if not self._syncing:  # a sync round's codec is not the policy's
                self.recent = [*self.recent, (outcome.level, outcome.round_s)][-8:]
            take_measurements(self.averager, outcome, self.on_links)
            rate = outcome.bytes_sent / outcome.round_s if outcome.round_s > 0 else math.inf
            plan = outcome.plan
            why = ""
            if plan is not None and plan.allowed_s is not None:
                why = f" (predicted {plan.predicted_s:.2f} s, allowed {plan.allowed_s:.2f} s)"
            logger.info(
                "Round %d: %d peers, codec %s, %.0f kB sent, %.2f s, %.2f MB/s%s",
                self.local_epoch, outcome.group_size, outcome.codec, outcome.bytes_sent / 1e3, outcome.round_s,
                rate / 1e6, why,
            )  # fmt: skip

    def wait_for_round(self, timeout: float) -> None:
        """Land the round in flight, giving up on it (our own update is applied) after ``timeout`` s."""
        if self.scheduled_grads is not None:
            try:
                self.scheduled_grads.result(timeout=timeout)
            except BaseException:  # noqa: BLE001 - _finish_round reports it
                if not self.scheduled_grads.done():
                    self.scheduled_grads.cancel()
            self._finish_round()

    # helpers ------------------------------------------------------------------------------------

    def _next_round(self) -> int:
        """The step the next round stands for: ours, or the swarm's when a peer began it already (its tracker record
        is a step ahead), as hivemind's Optimizer takes. Members of a group must agree on it (a parameter round comes
        every ``sync_every`` steps), and an offset between peers that average together would never close."""
        return max(self.local_epoch, self.tracker.global_epoch - 1)

    def _report(self) -> RoundReport:
        """What the next group learns about us: our level, typical and shortest round time, compute time."""
        if not self.recent or self.recent[-1][0] < 0:
            return RoundReport(None, 0.0, self.compute_s)
        level = self.recent[-1][0]
        same_level = [t for lvl, t in self.recent[-3:] if lvl == level]
        return RoundReport(level, statistics.median(same_level), self.compute_s, min(t for _, t in self.recent))

    def _momenta(self) -> list[torch.Tensor]:
        return self.momentum

    def current_state(self) -> tuple[dict, list[torch.Tensor]]:
        """A copy of the anchor and outer momentum, and the global step they are at: one before ours while a round
        is in flight (the step counts from the round's start, the anchor moves at its end). hivemind reads each
        tensor it serves when its turn in the stream comes: the live ones would be read across an outer step."""
        with self._state_lock:
            epoch = self.local_epoch - (self.scheduled_grads is not None)
            return {"epoch": epoch}, [t.clone() for t in (*self.anchor, *self._momenta())]
