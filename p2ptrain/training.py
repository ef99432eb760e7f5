"""The training loop: batches → forward/backward → ``hivemind.Optimizer.step()``, plus validation.

hivemind's Optimizer accumulates gradients until the swarm has processed ``target_batch_size``
samples; then peers form groups, average their (compressed) gradients and every peer applies the
same AdamW update: one *global step*, called an epoch in hivemind's logs and in ``opt.local_epoch``.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any

import hivemind
import torch
import torch.nn.functional as F
from hivemind.averaging.control import AveragingStage
from hivemind.compression import Float16Compression
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.optim.state_averager import TrainingStateAverager

from p2ptrain import end_of_run
from p2ptrain.averaging import CompressedGradientAverager
from p2ptrain.codecs import DENSE, Level
from p2ptrain.data import Corpus
from p2ptrain.gate import Gate
from p2ptrain.group_rounds import GroupRounds
from p2ptrain.idle_policy import Verdict
from p2ptrain.ledger import Accountant
from p2ptrain.local_updates import LocalUpdateOptimizer
from p2ptrain.manifest import AveragingSpec, SwarmManifest
from p2ptrain.param_check import ParamCheck
from p2ptrain.settings import PeerSettings
from p2ptrain.status import StatusWriter

logger = logging.getLogger(__name__)


class WarmupSchedule:
    """Linear learning-rate warm-up over ``warmup`` global steps, then constant (a picklable callable)."""

    def __init__(self, warmup: int):
        self.warmup = warmup

    def __call__(self, epoch: int) -> float:
        return 1.0 if self.warmup == 0 else min(1.0, (epoch + 1) / self.warmup)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only; biases and LayerNorm gains are not decayed (as in GPT-2/nanoGPT)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# hivemind's tracker publishes a peer's progress only after its first sample and re-reads the swarm's
# every ≤10 s; until it does, each peer counts itself alone and takes solo global steps. Re-reading
# every ≤2 s (one DHT get per peer) keeps a swarm's first steps and joiners in step.
TRACKER_OPTS = {"min_refresh_period": 0.5, "max_refresh_period": 2.0, "default_refresh_period": 1.0}


class GradientRounds(GroupRounds, GradientAverager):
    """hivemind's gradient averager (codecs none, fp16) with p2ptrain's group rules (``group_rounds``)."""


class PowerSGDRounds(GroupRounds, PowerSGDGradientAverager):
    """hivemind's PowerSGD gradient averager with p2ptrain's group rules."""


class StateRounds(GroupRounds, TrainingStateAverager):
    """hivemind's parameter and optimizer-state averager with p2ptrain's group rules."""


def make_optimizer(
    dht: hivemind.DHT,
    model: torch.nn.Module,
    manifest: SwarmManifest,
    settings: PeerSettings,
    reach_kind: str = "unknown",
) -> hivemind.Optimizer | LocalUpdateOptimizer:
    """hivemind's Optimizer (mode "gradients") or our DiLoCo optimizer (mode "local"), per the manifest.
    ``reach_kind``: this peer's reachability (``reachability.Kind``), which decides what it aggregates."""
    spec, avg = manifest.optimizer, manifest.averaging
    request_timeout = min(3.0, avg.matchmaking_time_s / 2)
    inner = partial(torch.optim.AdamW, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps)
    scheduler = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=WarmupSchedule(spec.warmup_epochs))
    groups = param_groups(model, spec.weight_decay)
    common = dict(  # what both optimizers take
        dht=dht,
        run_id=manifest.run_id,
        target_batch_size=manifest.target_batch_size,
        batch_size_per_step=settings.batch_size,
        scheduler=scheduler,
        matchmaking_time=avg.matchmaking_time_s,
        averaging_timeout=avg.averaging_timeout_s,
        tracker_opts=TRACKER_OPTS,
    )
    if avg.mode == "local":
        return LocalUpdateOptimizer(
            **common,
            param_groups=groups,
            inner=inner,
            outer_lr=avg.outer_lr,
            outer_momentum=avg.outer_momentum,
            level=None if avg.compression == "adaptive" else fixed_level(avg),
            budget=avg.comm_budget,
            request_timeout=request_timeout,
            reach_kind=reach_kind,
        )
    # hivemind warns (and may deadlock) unless a request times out faster than matchmaking lasts. Its
    # averager_opts reach only the state averager (optimizer.py:263), so the gradient averager gets it here.
    if avg.compression == "powersgd":
        grad_averager = partial(PowerSGDRounds, averager_rank=avg.powersgd_rank)
    elif avg.compression in ("randk", "int8"):
        grad_averager = partial(CompressedGradientAverager, level=fixed_level(avg))
    else:
        grad_averager = GradientRounds
    dense = DENSE.get(avg.compression, Float16Compression)
    return SwarmOptimizer(
        **common,
        params=groups,
        optimizer=inner,
        average_state_every=avg.average_state_every,
        grad_compression=dense(),
        state_averaging_compression=dense(),
        averager_opts={"request_timeout": request_timeout},
        grad_averager_factory=partial(grad_averager, request_timeout=request_timeout, reach_kind=reach_kind),
        shutdown_timeout=2.0,
        verbose=False,
        reach_kind=reach_kind,
        # hivemind's default (None) is meant to follow the DHT, but its test is inverted (optimizer.py:205): the
        # Optimizer then thinks it serves its state while its averagers, in client mode, refuse to
        client_mode=dht.client_mode,
    )


def shared_params(optimizer: Any) -> list[torch.Tensor] | None:
    """The parameters hivemind's optimizer shares and averages (offloaded: a copy of the model's): peers that
    averaged their state together hold them bit for bit. None for our local-updates optimizer, whose peers each
    keep the progress of their last round on top of the shared anchor."""
    state_averager = getattr(optimizer, "state_averager", None)
    if not isinstance(state_averager, TrainingStateAverager):
        return None
    return [param for group in state_averager.optimizer.param_groups for param in group["params"]]


AGREE_ATTEMPTS = 3  # downloads of the run's final state at the end: each takes the peer sharing it first
NO_GROUP_YET = (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)  # an averaging round's stages


class SwarmOptimizer(hivemind.Optimizer):
    """hivemind's Optimizer, with two changes for a peer that falls behind:

    - it remembers in ``local_step_epoch`` the last epoch it updated from its own gradients alone (the averaging
      round failed): at the end of a run such a straggler takes the swarm's state instead (``Trainer.finish``);
    - before downloading the swarm's state it drops the gradient round it scheduled if that round has not formed a
      group yet. hivemind joins it with zero weight so as not to disturb a group already formed; but a peer that is
      behind is usually alone in that round (the others are a step ahead), and waited the whole averaging timeout
      before its download began (15 s at each catch-up in the swarm test; the last peers had left by then).
    """

    local_step_epoch = -1
    last_group: list[str] | None = None  # peer ids of the last gradient round's group (None: it failed)

    def __init__(self, *args: Any, reach_kind: str = "unknown", **kwargs: Any):
        self.reach_kind = reach_kind  # read by _make_state_averager, which hivemind's __init__ calls
        super().__init__(*args, **kwargs)

    def _make_state_averager(self, **kwargs: Any) -> TrainingStateAverager:
        # hivemind's own (optimizer.py), with p2ptrain's group rules
        return StateRounds(
            dht=self.dht,
            prefix=f"{self.run_id}_state_averager",
            min_matchmaking_time=self.matchmaking_time,
            allreduce_timeout=self.allreduce_timeout,
            shutdown_timeout=self.shutdown_timeout,
            offload_optimizer=self.offload_optimizer,
            custom_gradients=self.offload_optimizer,
            status_loglevel=self.status_loglevel,
            next_chunk_timeout=self.next_chunk_timeout,
            client_mode=self.client_mode,
            auxiliary=self.auxiliary,
            start=True,
            reach_kind=self.reach_kind,
            **kwargs,
        )

    def _load_local_gradients_into_optimizer(self) -> None:
        self.local_step_epoch = self.local_epoch
        if self.tracker.global_progress.num_peers > 1:  # alone, there is nobody to average with: nothing to say
            logger.warning(
                "Global step %d: the gradient round failed; this step uses this peer's own gradients", self.local_epoch
            )
        super()._load_local_gradients_into_optimizer()

    def _average_gradients_and_load_into_optimizer(self, maybe_step_control: Any) -> None:
        self.last_group = None
        super()._average_gradients_and_load_into_optimizer(maybe_step_control)
        control = maybe_step_control
        if control is not None and control.done() and not control.cancelled() and control.exception() is None:
            self.last_group = [peer.to_base58() for peer in control.result()]

    def load_state_from_peers(self, **kwargs: Any) -> None:
        control = self.scheduled_grads
        if control is not None and not control.done() and control.stage in NO_GROUP_YET:
            control.cancel()
            self.scheduled_grads = None
        super().load_state_from_peers(**kwargs)


def fixed_level(avg: AveragingSpec) -> Level:
    """The manifest's fixed codec as a ladder level (random-k values travel as int8)."""
    if avg.compression == "randk":
        return Level("int8", avg.sparsity)
    return Level(avg.compression)


def lm_loss(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; ``blocks`` is (B, T+1): inputs are [:, :-1], targets [:, 1:]."""
    logits = model(input_ids=blocks[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), blocks[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean held-out loss over ``blocks``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start : start + batch_size].to(device)
        total += lm_loss(model, chunk).item() * len(chunk)
        count += len(chunk)
    model.train(was_training)
    return total / max(count, 1)


def autocast_for(device: torch.device):
    """bf16 autocast on GPUs that support it; fp32 elsewhere (CPU, older GPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    return None


class Trainer:
    """Runs steps until ``stop`` is set or ``settings.max_epochs`` is reached. One thread, owned by the peer."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: hivemind.Optimizer,
        corpus: Corpus,
        manifest: SwarmManifest,
        settings: PeerSettings,
        device: torch.device,
        status: StatusWriter,
        save_checkpoint: Callable[[], None],
        local_steps: int = 0,
        gates: list[Gate] = (),
        ledger: Accountant | None = None,
        on_stuck: Callable[[str], None] | None = None,
    ):
        self.model, self.opt, self.corpus, self.manifest = model, optimizer, corpus, manifest
        self.settings, self.device, self.status, self._save = settings, device, status, save_checkpoint
        self.local_steps = local_steps
        self.gates = list(gates)  # pauses: the volunteer daemon's idle policy, the network's (no relay); none: train
        self.ledger = ledger  # the energy ledger: told of every step and every pause (µs, no I/O)
        self.compute_s = 0.0  # seconds in forward/backward (compute utilization = compute_s / wall)
        self.val_s = 0.0  # seconds measuring the held-out loss
        self._val_blocks = corpus.val_blocks()
        self._autocast = autocast_for(device) or nullcontext
        self.lock = threading.Lock()  # held while parameters change; the checkpoint writer takes it
        # another peer announced the run's last step (--max-epochs): we are behind, finish() takes the swarm's state
        key = end_of_run.finishing_key(manifest.run_id)
        self._finished = end_of_run.FinishWatch(optimizer.tracker.dht, key, settings.max_epochs or 0)
        # peers that average their parameters check after each global step that they still hold the same ones
        comparable = shared_params(optimizer) is not None
        self._param_check = ParamCheck(optimizer.tracker.dht, manifest.run_id) if comparable else None
        self._stuck = StuckRounds()
        self._on_stuck = on_stuck  # asks the peer to rejoin the swarm, with new averagers

    def catch_up(self) -> None:
        """Download the swarm's current state if it is ahead of ours (a late joiner, or a restart)."""
        self.opt.tracker.fetched_global_progress_this_epoch.wait(timeout=10)
        if self.opt.tracker.global_epoch > self.opt.local_epoch:
            before = self.opt.local_epoch
            logger.info(
                "Swarm is at step %d, we are at %d: downloading state from peers", self.opt.tracker.global_epoch, before
            )
            with self.lock:
                self.opt.load_state_from_peers()
            if self.opt.local_epoch > before:
                logger.info("Caught up: now at global step %d", self.opt.local_epoch)
                self.status.update(
                    force=True, epoch=self.opt.local_epoch, loaded_state_from_peers_at=self.opt.local_epoch
                )

    def validate(self) -> float:
        started = time.perf_counter()
        val = evaluate(self.model, self._val_blocks, self.settings.batch_size, self.device)
        self.val_s += time.perf_counter() - started
        epoch = self.opt.local_epoch  # measured again at the same step (a download at the end): the new value
        history = [*(h for h in self.status.status.val_history if h[0] != epoch), (epoch, val)][-200:]
        self.status.update(force=True, val_loss=val, val_history=history, val_s=self.val_s)
        return val

    def run(self, stop: threading.Event) -> None:
        if stop.is_set():  # stopped while starting up: do not download state just to leave
            return
        self.model.train()
        self.catch_up()
        if self.settings.validate_every:
            logger.info("Held-out loss at global step %d: %.4f", self.opt.local_epoch, self.validate())
        if self.ledger is not None:
            self.ledger.set_active(True)
        try:
            self._loop(stop)
        finally:
            if self.ledger is not None:
                self.ledger.set_active(False)
        if self.settings.max_epochs and not stop.is_set():
            if self.opt.local_epoch >= self.settings.max_epochs or self._finished.done:
                self.finish(stop, max(30.0, 2 * self.manifest.averaging.averaging_timeout_s))

    def finish(self, stop: threading.Event, timeout_s: float) -> None:
        """The run's last global step is reached: end with the swarm's final parameters, and help stragglers do the
        same (end_of_run.py says how)."""
        tracker, epoch = self.opt.tracker, self.settings.max_epochs
        dht, finishing = tracker.dht, end_of_run.finishing_key(self.manifest.run_id)
        self.status.update(force=True, state="finishing")
        comparable = shared_params(self.opt) is not None
        if self.opt.local_epoch < epoch:
            why = f"we are at {self.opt.local_epoch}"
        elif getattr(self.opt, "local_step_epoch", -1) == self.opt.local_epoch - 1:  # SwarmOptimizer knows
            why = "our last update was our own (the round found nobody)"
        else:
            why = None
        mine = None
        if why and (
            self._finished.done or max(end_of_run.other_epochs(dht, tracker.training_progress_key), default=-1) >= epoch
        ):
            logger.info("The swarm is at its last step %d and %s: downloading its state", epoch, why)
            # from a peer that has announced it: its last state-averaging round has landed (see below)
            end_of_run.wait_until_finished(dht, finishing, epoch, stop, timeout_s)
            self._take_swarm_state(dht, finishing, epoch, timeout_s)
        else:
            # hivemind averages the last step's state in the background: a straggler downloading before that round
            # lands would take parameters the others no longer hold (seen: 2.3e-3 apart). Land it, then announce.
            if comparable:
                with self.lock:
                    self.opt.state_averager.step(wait_for_delayed_updates=True)
            self._save()
            if not dht.client_mode:  # a client cannot serve the state it would announce
                mine = end_of_run.announce_final(dht, finishing, epoch, self._digest(), 2 * timeout_s)
        if comparable:
            self._agree(stop, dht, finishing, epoch, timeout_s, mine)
        end_of_run.wait_for_stragglers(
            dht, tracker.training_progress_key, finishing, epoch, stop, timeout_s, one_state=comparable
        )

    def _agree(
        self,
        stop: threading.Event,
        dht: hivemind.DHT,
        key: str,
        epoch: int,
        timeout_s: float,
        mine: end_of_run.Final | None,
    ) -> None:
        """Take the run's final state (the one announced first) if ours differs: an averaging round that did not
        include every peer parts them, and only a later state-averaging round that groups them joins them again
        (seen: two peers that both averaged to the last step, 5.4e-3 apart)."""
        stop.wait(end_of_run.SETTLE_S)  # announcements made at the same moment as ours: both are seen
        for _ in range(AGREE_ATTEMPTS):
            if stop.is_set():
                return
            final = end_of_run.final_state(end_of_run.finals(dht, key, epoch, mine))
            if final is None:
                return
            if final.peer == dht.peer_id.to_base58():
                self.opt.state_averager.state_sharing_priority = epoch + 0.5  # peers downloading it take ours first
                return
            if final.digest == self._digest():
                return
            logger.info("Our parameters differ from the final state %s announced: downloading it", final.peer)
            self._take_swarm_state(dht, key, epoch, timeout_s)
            mine = None  # announced with the downloaded state's digest
        logger.warning("Leaving with parameters that differ from the run's final state (%d downloads)", AGREE_ATTEMPTS)

    def _take_swarm_state(self, dht: hivemind.DHT, key: str, epoch: int, timeout_s: float) -> None:
        with end_of_run.announced_download(dht, key, epoch, 2 * timeout_s, self._digest):
            with self.lock:
                self.opt.load_state_from_peers()
        self.status.update(force=True, epoch=self.opt.local_epoch)
        if self.settings.validate_every and self.opt.local_epoch % self.settings.validate_every == 0:
            logger.info("Held-out loss at global step %d: %.4f", self.opt.local_epoch, self.validate())
        self._save()

    def _digest(self) -> str:
        params = shared_params(self.opt)
        if params is None:
            params = list(self.model.parameters())
        with self.lock:
            return end_of_run.state_digest(params)

    def _loop(self, stop: threading.Event) -> None:
        epoch, loss_ema, rate_ema, samples = self.opt.local_epoch, None, 0.0, 0
        self.status.update(training_since=time.time())
        while not stop.is_set() and not (self.settings.max_epochs and epoch >= self.settings.max_epochs):
            if self.settings.max_epochs and self._finished.poll():
                break
            for gate in self.gates:
                gate.pass_through(stop, self._pause, self._resume)
            if stop.is_set():
                break
            started = time.perf_counter()
            blocks = self.corpus.train_batch(self.local_steps, self.settings.batch_size).to(self.device)
            with self._autocast():
                loss = lm_loss(self.model, blocks)
            loss.backward()
            if self.manifest.optimizer.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.manifest.optimizer.clip_grad_norm)
            step_s = time.perf_counter() - started
            self.compute_s += step_s
            for gate in self.gates:
                self._idle(gate.rest(step_s, stop))
            with self.lock:
                self.opt.step()
                self.opt.zero_grad()
            self.local_steps += 1
            samples += len(blocks)
            if self.ledger is not None:
                self.ledger.on_step(len(blocks), blocks[:, 1:].numel(), step_s)  # tokens predicted: B × T
            value = loss.item()
            if not math.isfinite(value):
                logger.warning(
                    "Non-finite training loss at local step %d; the update was still averaged", self.local_steps
                )
            loss_ema = value if loss_ema is None else 0.9 * loss_ema + 0.1 * value
            rate_ema = 0.9 * rate_ema + 0.1 * len(blocks) / max(time.perf_counter() - started, 1e-9)
            self.status.update(
                epoch=self.opt.local_epoch,
                local_steps=self.local_steps,
                samples=samples,
                loss=loss_ema,
                samples_per_s=rate_ema,
                compute_s=self.compute_s,
                peers=max(1, self.opt.tracker.global_progress.num_peers),  # 0 until the first fetch
            )
            if self.opt.local_epoch != epoch:
                epoch = self.opt.local_epoch
                self._on_global_step(epoch, loss_ema)

    # pausing for the volunteer (gate.py) ------------------------------------------------------------

    def _pause(self, verdict: Verdict) -> None:
        """Step aside: land or cancel averaging rounds, give the GPU's memory back, say why."""
        logger.info("Paused: %s", "; ".join(verdict.reasons))
        if self.ledger is not None:
            self.ledger.set_active(False)
        if hasattr(self.opt, "wait_for_round"):
            self.opt.wait_for_round(timeout=self.manifest.averaging.averaging_timeout_s)
        else:
            cancel_rounds(self.opt, forget=True)
        with self.lock:
            self.move_to(torch.device("cpu"))
        self.status.update(state="paused", paused_reasons=list(verdict.reasons), paused_since=time.time())

    def _resume(self, paused_s: float) -> None:
        with self.lock:
            self.move_to(self.device)
        self._idle(paused_s)
        if self.ledger is not None:
            self.ledger.set_active(True)
        logger.info("Resumed after %.0f s paused", paused_s)
        self.status.update(state="training", paused_reasons=[], paused_since=None)
        self.catch_up()

    def _idle(self, seconds: float) -> None:
        if seconds and hasattr(self.opt, "mark_idle"):
            self.opt.mark_idle(seconds)

    def move_to(self, device: torch.device) -> None:
        """Move the model and the inner optimizer's state; on leaving a GPU, return its cached memory."""
        if self.device.type != "cuda":
            return  # nothing to give back on a CPU peer
        self.model.to(device)
        inner = getattr(self.opt, "inner", None) or self.opt.state_averager.optimizer
        for state in inner.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(device)
        if device.type == "cpu":
            torch.cuda.empty_cache()

    def _check_params(self, epoch: int) -> None:
        """Publish our parameters' sketch for this step; resynchronise if the last verdict says we left the swarm's
        parameters (``param_check``)."""
        lr = float(self.opt.param_groups[0]["lr"])
        own = getattr(self.opt, "local_step_epoch", -1) == epoch - 1
        group = None if own else getattr(self.opt, "last_group", None)
        with self.lock:
            verdict = self._param_check.after_step(epoch, shared_params(self.opt), lr, own, group)
        if verdict is None:
            return
        entry = [verdict.epoch, verdict.agreeing, verdict.others, verdict.left]
        self.status.update(param_history=[*self.status.status.param_history, entry][-100:])
        if verdict.lead and not self.opt.state_averager.client_mode:
            logger.info("Parameters at global step %d: every peer's differ; the others take ours", verdict.epoch)
            self.opt.state_averager.state_sharing_priority = epoch + 0.5  # peers downloading now take ours first
        if not verdict.left:
            return
        if verdict.apart:
            why = ", nor with each other: the state of the smallest peer id wins"
        else:
            why = ", they agree among themselves" if verdict.others > 1 else "; our last update was our own"
        logger.warning(
            "Parameters at global step %d differ from the swarm's (none of %d peers of our last round agrees with "
            "ours%s): downloading the swarm's state",
            verdict.epoch,
            verdict.others,
            why,
        )
        with self.lock:
            self.opt.load_state_from_peers()
        logger.info("Resynchronised with the swarm: now at global step %d", self.opt.local_epoch)
        self.status.update(force=True, epoch=self.opt.local_epoch, resynced_at=self.opt.local_epoch)

    def _on_global_step(self, epoch: int, loss: float | None) -> None:
        if self._param_check is not None:
            self._check_params(epoch)
        peers = max(1, self.opt.tracker.global_progress.num_peers)
        own = getattr(self.opt, "local_step_epoch", -1) == epoch - 1  # SwarmOptimizer knows
        if self._stuck.after(own, peers) and self._on_stuck is not None:
            self._on_stuck(
                f"no gradient round of the last {self._stuck.limit} global steps found a group, with {peers} peers "
                "in the swarm (this peer's averager is stuck: new ones)"
            )
        message = f"Global step {epoch}: loss {loss:.4f}, {peers} peer(s) in the swarm"
        if self.settings.validate_every and epoch % self.settings.validate_every == 0:
            message += f", held-out loss {self.validate():.4f}"
        logger.info(message)
        if epoch % self.settings.checkpoint_every == 0:
            self._save()


STUCK_STEPS = 6  # global steps in a row from our own gradients, with others in the swarm, before rejoining


@dataclass
class StuckRounds:
    """Tells when this peer's gradient rounds have failed ``limit`` global steps in a row while other peers train:
    its averager is stuck (seen: after a round cancelled at the wrong moment inside hivemind's matchmaking, every
    later round of that peer found no group, and it trained on alone while the swarm went on without it)."""

    limit: int = STUCK_STEPS
    in_a_row: int = 0

    def after(self, own_update: bool, peers: int) -> bool:
        """After a global step: was its update our own (the round failed), with ``peers`` in the swarm?"""
        self.in_a_row = self.in_a_row + 1 if own_update and peers > 1 else 0
        if self.in_a_row < self.limit:
            return False
        self.in_a_row = 0
        return True


def cancel_rounds(optimizer: Any, forget: bool = False) -> None:
    """Cancel the averaging rounds a hivemind Optimizer arranged ahead; ``forget`` them so shutdown does not again."""
    for name in ("scheduled_grads", "scheduled_state"):
        control = getattr(optimizer, name, None)
        if control is not None and not control.done():
            control.cancel()
        if forget:
            setattr(optimizer, name, None)


GOODBYE_S = 3.0  # hivemind's graceful shutdown of the averagers, at most; then they are terminated


def stop_optimizer(optimizer: Any, step_running: bool, goodbye_s: float = GOODBYE_S) -> None:
    """Stop the optimizer's averager processes: hivemind's own shutdown (goodbye to the swarm, each averager given
    its grace period) or, while a training step is still running inside hivemind (holding its locks, its round
    cancelled but not returned), terminate them outright. The graceful way would race with that step: seen taking
    6.8 s and failing with "Set changed size during iteration"; the progress record it would clear expires alone.

    The goodbye gets ``goodbye_s`` in all: it first waits for a state-averaging round running in the background
    (hivemind's ``delay_state_averaging``), up to the averaging timeout; seen taking 7.8 s of a SIGTERMed peer's
    12.3 s. Cut short, that round fails for its group as if this peer had dropped out; this peer loses nothing (its
    result would have been applied at the next step)."""
    if not step_running:
        # a round the last step arranged ahead: hivemind's shutdown would join it with zero weight and wait for
        # it (up to the averaging timeout; seen taking > 20 s on slow links); forgotten, so not cancelled twice
        cancel_rounds(optimizer, forget=True)
        goodbye = threading.Thread(target=_say_goodbye, args=(optimizer,), name="goodbye", daemon=True)
        goodbye.start()
        goodbye.join(goodbye_s)
        if not goodbye.is_alive():
            return
        logger.warning(
            "Saying goodbye took over %.0f s (in %s): terminating the averagers", goodbye_s, _where(goodbye.ident)
        )
    for averager in vars(optimizer).values():
        if isinstance(averager, multiprocessing.process.BaseProcess) and averager.is_alive():
            averager.terminate()


def _where(thread_id: int | None) -> str:
    """The innermost calls of a thread outside Python's own library, e.g. ``state_averager.py:400 step``."""
    frame = sys._current_frames().get(thread_id) if thread_id is not None else None
    stdlib = os.path.dirname(threading.__file__)
    calls = [f for f in traceback.extract_stack(frame) if not f.filename.startswith(stdlib)] if frame else []
    return " ← ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in reversed(calls[-2:])) or "?"


def _say_goodbye(optimizer: Any) -> None:
    try:
        optimizer.shutdown()
    except Exception as e:  # noqa: BLE001 - after the deadline, its averagers and DHT stop under it
        logger.debug("Goodbye ended with %r", e)
