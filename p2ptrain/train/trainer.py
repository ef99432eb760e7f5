"""The training loop: batches → forward/backward → ``hivemind.Optimizer.step()``, plus validation.

hivemind's Optimizer accumulates gradients until the swarm has processed ``target_batch_size``
samples; then peers form groups, average their (compressed) gradients and every peer applies the
same AdamW update: one *global step*, called an epoch in hivemind's logs and in ``opt.local_epoch``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict
from typing import Protocol

import hivemind
import torch

from p2ptrain.gate import Gate, Verdict
from p2ptrain.settings import PeerSettings
from p2ptrain.status import StatusWriter
from p2ptrain.swarm import discovery
from p2ptrain.swarm.losses import publish_losses
from p2ptrain.swarm.manifest import SwarmManifest
from p2ptrain.train import end_of_run, param_check
from p2ptrain.train.data import Corpus
from p2ptrain.train.keeping_up import FallingBehind, StuckRounds
from p2ptrain.train.models import autocast_for, evaluate, lm_loss
from p2ptrain.train.optimizers import PeerOptimizer
from p2ptrain.train.param_check import ParamCheck
from p2ptrain.train.step_numbers import swarm_epoch

logger = logging.getLogger(__name__)


AGREE_ATTEMPTS = 3  # downloads of the run's final state at the end: each takes the peer sharing it first


class StepObserver(Protocol):
    """Told of every step and of every start and stop of training (the energy ledger is one); must take µs, no I/O."""

    def on_step(self, samples: int, tokens: int, compute_s: float) -> None: ...

    def set_active(self, active: bool) -> None: ...


class Trainer:
    """Runs steps until ``stop`` is set or ``settings.max_steps`` is reached. One thread, owned by the peer."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: PeerOptimizer,
        corpus: Corpus,
        manifest: SwarmManifest,
        settings: PeerSettings,
        device: torch.device,
        status: StatusWriter,
        save_checkpoint: Callable[[], None],
        local_steps: int = 0,
        gates: list[Gate] = (),
        observers: Sequence[StepObserver] = (),
        on_stuck: Callable[[str], None] | None = None,
    ):
        self.model, self.opt, self.corpus, self.manifest = model, optimizer, corpus, manifest
        self.settings, self.device, self.status, self._save = settings, device, status, save_checkpoint
        self.local_steps = local_steps
        self.gates = list(gates)  # pauses: the volunteer daemon's idle policy, the network's (no relay); none: train
        self.observers = list(observers)  # the energy ledger: told of every step and every pause
        self.compute_s = 0.0  # seconds in forward/backward (compute utilization = compute_s / wall)
        self.val_s = 0.0  # seconds measuring the held-out loss
        self._val_blocks = corpus.val_blocks()
        self._autocast = autocast_for(device) or nullcontext
        self.lock = threading.Lock()  # held while parameters change; the checkpoint writer takes it
        # another peer announced the run's last step (--max-steps): we are behind, finish() takes the swarm's state
        key = discovery.finishing_key(manifest.run_id)
        self._finished = end_of_run.FinishWatch(optimizer.tracker.dht, key, settings.max_steps or 0)
        # peers that average their parameters check after each global step that they still hold the same ones
        comparable = optimizer.shared_params() is not None
        self._param_check = ParamCheck(optimizer.tracker.dht, manifest.run_id) if comparable else None
        self._stuck = StuckRounds()
        self._behind = FallingBehind(manifest.averaging.matchmaking_time_s)
        self._on_stuck = on_stuck  # asks the peer to rejoin the swarm, with new averagers

    def catch_up(self) -> None:
        """Download the swarm's current state if it is ahead of ours (a late joiner, or a restart)."""
        self.opt.tracker.fetched_global_progress_this_epoch.wait(timeout=10)
        if self.opt.tracker.global_epoch > self.opt.local_epoch:
            before = self.opt.local_epoch
            logger.info(
                "Swarm is at step %d, we are at %d: downloading state from peers", self.opt.tracker.global_epoch, before
            )
            self._download()
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
        publish_losses(self.opt.tracker.dht, self.manifest.run_id, epoch, val, self.status.status.loss)  # health page
        return val

    def run(self, stop: threading.Event) -> None:
        if stop.is_set():  # stopped while starting up: do not download state just to leave
            return
        self.model.train()
        self.catch_up()
        if self.settings.validate_every:
            logger.info("Held-out loss at global step %d: %.4f", self.opt.local_epoch, self.validate())
        self._set_active(True)
        try:
            self._loop(stop)
        finally:
            self._set_active(False)
        if self.settings.max_steps and not stop.is_set():
            if self.opt.local_epoch >= self.settings.max_steps or self._finished.done:
                self.finish(stop, max(30.0, 2 * self.manifest.averaging.averaging_timeout_s))

    def finish(self, stop: threading.Event, timeout_s: float) -> None:
        """The run's last global step is reached: end with the swarm's final parameters, and help stragglers do the
        same (end_of_run.py says how)."""
        tracker, epoch = self.opt.tracker, self.settings.max_steps
        dht, finishing = tracker.dht, discovery.finishing_key(self.manifest.run_id)
        self.status.update(force=True, state="finishing")
        comparable = self.opt.shared_params() is not None
        if self.opt.local_epoch < epoch:
            why = f"we are at {self.opt.local_epoch}"
        elif self.opt.own_update_at(self.opt.local_epoch):
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
                    self.opt.land_state_round()
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
                self.opt.offer_state_first(epoch)
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
        params = self.opt.shared_params()
        if params is None:
            params = list(self.model.parameters())
        with self.lock:
            return end_of_run.state_digest(params)

    def _loop(self, stop: threading.Event) -> None:
        epoch, loss_ema, rate_ema, samples = self.opt.local_epoch, None, 0.0, 0
        self.status.update(training_since=time.time())
        while not stop.is_set() and not (self.settings.max_steps and epoch >= self.settings.max_steps):
            if self.settings.max_steps and self._finished.poll():
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
            for observer in self.observers:
                observer.on_step(len(blocks), blocks[:, 1:].numel(), step_s)  # tokens predicted: B × T
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
                optimizer_s=self.opt.inner_step_s,
                peers=max(1, self.opt.tracker.global_progress.num_peers),  # 0 until the first fetch
            )
            if self.opt.local_epoch != epoch:
                epoch = self._on_global_step(self.opt.local_epoch, loss_ema)

    # pausing for the volunteer (gate.py) ------------------------------------------------------------

    def _pause(self, verdict: Verdict) -> None:
        """Step aside: land or cancel averaging rounds, give the GPU's memory back, say why."""
        logger.info("Paused: %s", "; ".join(verdict.reasons))
        self._set_active(False)
        self.opt.pause(self.manifest.averaging.averaging_timeout_s)
        with self.lock:
            self.move_to(torch.device("cpu"))
        self.status.update(state="paused", paused_reasons=list(verdict.reasons), paused_since=time.time())

    def _resume(self, paused_s: float) -> None:
        with self.lock:
            self.move_to(self.device)
        self._idle(paused_s)
        self._set_active(True)
        logger.info("Resumed after %.0f s paused", paused_s)
        self.status.update(state="training", paused_reasons=[], paused_since=None)
        self.catch_up()

    def _set_active(self, active: bool) -> None:
        for observer in self.observers:
            observer.set_active(active)

    def _idle(self, seconds: float) -> None:
        if seconds:
            self.opt.mark_idle(seconds)

    def move_to(self, device: torch.device) -> None:
        """Move the model and the inner optimizer's state; on leaving a GPU, return its cached memory."""
        if self.device.type != "cuda":
            return  # nothing to give back on a CPU peer
        self.model.to(device)
        inner = self.opt.inner_optimizer()
        for state in inner.state.values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    state[key] = value.to(device)
        if device.type == "cpu":
            torch.cuda.empty_cache()

    def _compare_params(self, epoch: int) -> None:
        """Publish our parameters' sketch for this step; resynchronise if the last verdict says we left the swarm's
        parameters (``param_check``)."""
        if self.opt.behind_group_at(epoch):  # its sketch would not be of the others' step: not published
            self._resync(epoch, "the swarm took a step without this peer")
            return
        own = self.opt.own_update_at(epoch)
        if not own:
            self._behind.kept_up()
            if self.status.status.falling_behind:
                logger.info("Caught up with the swarm: a global step with this peer's group")
                self.status.update(force=True, falling_behind=None)
        lr = self.opt.learning_rate()
        group = None if own else self.opt.last_group
        with self.lock:
            verdict = self._param_check.after_step(epoch, self.opt.shared_params(), lr, own, group)
        if verdict is None:
            return
        self._record(verdict)
        if verdict.lead:
            whose = f"{verdict.camps} camps of peers differ" if verdict.camps > 1 else "every peer's differ"
            logger.info("Parameters at global step %d: %s; the others take ours", verdict.epoch, whose)
            self.opt.offer_state_first(epoch)
        if verdict.left:
            self._resync(verdict.epoch, verdict.reason())

    def _record(self, verdict: param_check.Verdict) -> None:
        entry = [verdict.epoch, verdict.agreeing, verdict.others, verdict.left]
        self.status.update(param_history=[*self.status.status.param_history, entry][-100:])

    def _resync(self, epoch: int, reason: str) -> None:
        """Download the swarm's state; say so if this peer keeps parting from the swarm (``keeping_up``)."""
        logger.warning("Parameters at global step %d differ from the swarm's (%s): downloading the swarm's state",
                       epoch, reason)  # fmt: skip
        started = time.monotonic()
        downloads = self._download()
        ended = time.monotonic()
        logger.info("Resynchronised with the swarm: now at global step %d", self.opt.local_epoch)
        self.status.update(force=True, epoch=self.opt.local_epoch, resynced_at=self.opt.local_epoch)
        with self.lock:  # the state taken is checked as a step's is: its sketch published, the others' read
            self._param_check.publish(self.opt.local_epoch, self.opt.shared_params(), self.opt.learning_rate())
            verdict = self._param_check.poll(self.opt.local_epoch)
        if verdict is not None:  # an earlier step's, read meanwhile: on record, but this download is its answer
            self._record(verdict)
        lag = self._behind.after_download(ended, self.opt.tracker.global_epoch, (ended - started) / downloads)
        if lag is not None:
            logger.warning("Falling behind: %s", lag.message())
            self.status.update(force=True, falling_behind=asdict(lag))

    def _download(self) -> int:
        """Download the swarm's state; once more at once if the swarm took a step meanwhile (its progress records,
        read now, are past the state's step): a step's round forms over the matchmaking time before the step, so a
        peer a step behind would only find its step taken without it, and download then. Returns how many."""
        with self.lock:
            self.opt.load_state_from_peers()
        swarm = swarm_epoch(self.opt.tracker)
        if swarm is None or swarm <= self.opt.local_epoch:
            return 1
        logger.info("The swarm is at global step %d, past the state downloaded (%d): downloading again", swarm,
                    self.opt.local_epoch)  # fmt: skip
        with self.lock:
            self.opt.load_state_from_peers()
        return 2

    def _on_global_step(self, epoch: int, loss: float | None) -> int:
        """After reaching global step ``epoch``; returns the step this peer is at now: later, if the parameter check
        resynchronised it from the swarm (the loop then stops at the run's last step, not one past it)."""
        late = self.opt.behind_group_at(epoch)  # its round was not stuck: the swarm took the step before it came
        if self._param_check is not None:
            self._compare_params(epoch)
            epoch = self.opt.local_epoch
        peers = max(1, self.opt.tracker.global_progress.num_peers)
        own = self.opt.own_update_at(epoch) and not late
        if self._stuck.after(own, peers) and self._on_stuck is not None:
            self._on_stuck(
                f"no gradient round of the last {self._stuck.limit} global steps found a group, with {peers} peers "
                "in the swarm (this peer's averager is stuck: new ones)"
            )
        self.status.update(**self.opt.round_log.as_status())
        message = f"Global step {epoch}: loss {loss:.4f}, {peers} peer(s) in the swarm"
        if self.settings.validate_every and epoch % self.settings.validate_every == 0:
            message += f", held-out loss {self.validate():.4f}"
        logger.info(message)
        if epoch % self.settings.checkpoint_every == 0:
            self._save()
        return epoch
