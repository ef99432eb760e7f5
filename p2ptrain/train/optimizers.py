"""The optimizers a peer trains with: hivemind's Optimizer in the swarm's averaging mode, and its averagers.

``make_optimizer`` builds from the manifest either ``SwarmOptimizer`` (hivemind.Optimizer: gradients averaged every
global step, compressed by ``averaging.py``'s averagers) or ``LocalUpdateOptimizer`` (``local_updates.py``: local
steps, then averaged pseudo-gradients); ``stopping.py`` ends either within a bounded time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

import hivemind
import torch
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.compression import Float16Compression
from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager

from p2ptrain.compat import hivemind as compat
from p2ptrain.settings import PeerSettings
from p2ptrain.swarm.admission import Admission
from p2ptrain.swarm.manifest import AveragingSpec, SwarmManifest
from p2ptrain.train.averaging import CompressedGradientAverager, payload_bytes
from p2ptrain.train.codecs import BYTES_PER_VALUE, DENSE, Level
from p2ptrain.train.group_rounds import GroupRounds
from p2ptrain.train.local_updates import LocalUpdateOptimizer
from p2ptrain.train.progress import CheckedProgressTracker, signs_with
from p2ptrain.train.round_log import RoundLog
from p2ptrain.train.shares import take_measurements
from p2ptrain.train.signed_parts import PartSigner
from p2ptrain.train.state_download import CheckedStateDownload, WholeStepState
from p2ptrain.train.step_numbers import NO_GROUP_YET, EpochReports, group_epoch, leave_if_passed, swarm_epoch

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


class GradientRounds(EpochReports, GroupRounds, GradientAverager):
    """hivemind's gradient averager (codecs none, fp16) with p2ptrain's group rules (``group_rounds``)."""


class PowerSGDRounds(EpochReports, GroupRounds, PowerSGDGradientAverager):
    """hivemind's PowerSGD gradient averager with p2ptrain's group rules."""


class StateRounds(GroupRounds, WholeStepState, TrainingStateAverager, CheckedStateDownload):
    """hivemind's parameter and optimizer-state averager with p2ptrain's group rules, checked downloads, and a state
    served from between two steps."""


NEVER = 2**62  # hivemind's average_state_every for "no state rounds": it averages when the step is a multiple


def make_optimizer(
    dht: hivemind.DHT,
    model: torch.nn.Module,
    manifest: SwarmManifest,
    settings: PeerSettings,
    reach_kind: str = "unknown",
    admission: Admission | None = None,
    identity: rsa.RSAPrivateKey | None = None,
) -> PeerOptimizer:
    """hivemind's Optimizer (mode "gradients") or our DiLoCo optimizer (mode "local"), per the manifest.
    ``reach_kind``: this peer's reachability (``reachability.Kind``), which decides what it aggregates;
    ``admission``: a private swarm's, which every averager applies to its group's members;
    ``identity``: this peer's libp2p key, which signs its progress record; with it, the progress tracker reads only
    records signed by the peers they name (and, in a private swarm, by admitted ones: ``progress.bound_to_signers``),
    and it certifies the key with which the averagers sign their parts (``signed_parts.PartSigner``)."""
    spec, avg = manifest.optimizer, manifest.averaging
    request_timeout = min(3.0, avg.matchmaking_time_s / 2)
    inner = partial(torch.optim.AdamW, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps)
    scheduler = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=WarmupSchedule(spec.warmup_epochs))
    groups = param_groups(model, spec.weight_decay)
    tracker = dict(signs_with(identity), bound=True, admission=admission) if identity is not None else {}
    signer = PartSigner(identity) if identity is not None else None
    common = dict(  # what both optimizers take
        dht=dht,
        run_id=manifest.run_id,
        target_batch_size=manifest.target_batch_size,
        batch_size_per_step=settings.batch_size,
        scheduler=scheduler,
        matchmaking_time=avg.matchmaking_time_s,
        averaging_timeout=avg.averaging_timeout_s,
        tracker_opts={**TRACKER_OPTS, **tracker},
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
            aggregation=avg.aggregation,
            admission=admission,
            signer=signer,
            group_size=avg.group_size,
            sync_every=avg.sync_every,
        )
    # hivemind warns (and may deadlock) unless a request times out faster than matchmaking lasts. Its
    # averager_opts reach only the state averager (optimizer.py:263), so the gradient averager gets it here.
    if avg.compression == "powersgd":
        grad_averager = partial(PowerSGDRounds, averager_rank=avg.powersgd_rank)
    elif avg.compression in ("int8", "int4", "int2", *RANDOM_K):
        grad_averager = partial(CompressedGradientAverager, level=fixed_level(avg))
    else:
        grad_averager = GradientRounds
    # parameters and optimizer state are averaged in int8 at the least (they carry no error feedback)
    dense = DENSE["int8"] if avg.compression in ("int4", "int2") else DENSE.get(avg.compression, Float16Compression)
    return SwarmOptimizer(
        **common,
        params=groups,
        optimizer=inner,
        average_state_every=avg.average_state_every or NEVER,
        grad_compression=dense(),
        state_averaging_compression=dense(),
        averager_opts={"request_timeout": request_timeout},
        grad_averager_factory=partial(
            grad_averager,
            request_timeout=request_timeout,
            reach_kind=reach_kind,
            aggregation=avg.aggregation,
            admission=admission,
            signer=signer,
        ),
        grad_codec=avg.compression if avg.compression in DENSE or avg.compression == "powersgd" else "fp16",
        shutdown_timeout=2.0,
        verbose=False,
        reach_kind=reach_kind,
        aggregation=avg.aggregation,
        admission=admission,
        signer=signer,
        # hivemind's default (None) is meant to follow the DHT, but its test is inverted (optimizer.py:205): the
        # Optimizer then thinks it serves its state while its averagers, in client mode, refuse to
        client_mode=dht.client_mode,
    )


class PeerOptimizer(Protocol):
    """What the trainer and the peer use of an optimizer, in either averaging mode: ``SwarmOptimizer`` (hivemind's,
    gradients averaged each global step) or ``LocalUpdateOptimizer`` (local steps, averaged pseudo-gradients)."""

    tracker: ProgressTracker  # the swarm's progress: global step, peers, samples
    last_group: list[str] | None  # peer ids of the last gradient round's group (None: it failed, or no such round)
    round_log: RoundLog  # the gradient (or outer) rounds' outcomes, bytes and the last few
    on_links: Callable[[dict[str, float]], None] | None  # told each round's per-link rates (``shares.py``)
    inner_step_s: float  # seconds in the optimizer's own update, all told (training compute, not communication)

    @property
    def local_epoch(self) -> int: ...  # global steps this peer has completed

    def step(self) -> None: ...

    def zero_grad(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, saved: dict) -> None: ...

    def resume_at(self, epoch: int) -> None:
        """After a checkpoint's state is loaded: this peer is at global step ``epoch``."""

    def learning_rate(self) -> float: ...

    def shared_params(self) -> list[torch.Tensor] | None:
        """The parameters every member holds the same after a global step (None: the mode has none to compare)."""

    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer whose state lives beside the model (moved with it off and onto the GPU)."""

    def own_update_at(self, epoch: int) -> bool:
        """Did the step to ``epoch`` apply this peer's own gradients alone (its round failed)?"""

    def behind_group_at(self, epoch: int) -> bool:
        """Was the step to ``epoch`` taken behind the swarm (its round's group ahead, or the step taken without us)?"""

    def pause(self, timeout_s: float) -> None:
        """Before stepping aside: land the round in flight (at most ``timeout_s``) or cancel the rounds ahead."""

    def mark_idle(self, seconds: float) -> None:
        """Seconds since the last step not spent computing (paused, or resting for the duty cycle)."""

    def cancel_rounds(self, forget: bool = False) -> None:
        """Cancel the averaging rounds arranged ahead; ``forget`` them so the shutdown does not again."""

    def offer_state_first(self, epoch: int) -> None:
        """Peers downloading the state now should take ours (the one the swarm agreed on for ``epoch``)."""

    def land_state_round(self) -> None:
        """Wait for a state-averaging round running in the background to be applied."""

    def load_state_from_peers(self) -> None: ...

    def shutdown(self) -> None: ...


class SwarmOptimizer(compat.Optimizer):
    """hivemind's Optimizer, reading the swarm's progress through ``progress.plausible``, with three changes for a
    peer that falls behind:

    - it remembers in ``local_step_epoch`` the last epoch it updated from its own gradients alone (the averaging
      round failed): at the end of a run such a straggler takes the swarm's state instead (``Trainer.finish``);
    - before downloading the swarm's state it drops the gradient round it scheduled if that round has not formed a
      group yet. hivemind joins it with zero weight so as not to disturb a group already formed; but a peer that is
      behind is usually alone in that round (the others are a step ahead), and waited the whole averaging timeout
      before its download began (15 s at each catch-up in the swarm test; the last peers had left by then);
    - a gradient round still looking for its group when the swarm has taken its step without it is cancelled, and
      the step marked as behind the swarm (``behind_at``): the trainer downloads the swarm's state
      (``step_numbers.leave_if_passed``).
    """

    progress_tracker_type = CheckedProgressTracker
    local_step_epoch = -1
    behind_at = -1  # the last step taken behind the swarm: its round's group was ahead, or it was held without us
    on_links: Callable[[dict[str, float]], None] | None = None  # per-link rates of each round (shares.py)
    last_group: list[str] | None = None  # peer ids of the last gradient round's group (None: it failed)
    inner_step_s = 0.0  # hivemind updates inside step(), after the round, in one call: not told apart (< 2 % here)

    def __init__(
        self,
        *args: Any,
        reach_kind: str = "unknown",
        aggregation: str = "centered_clip",
        admission: Admission | None = None,
        signer: PartSigner | None = None,
        grad_codec: str = "fp16",
        **kwargs: Any,
    ):
        self.reach_kind = reach_kind  # all four read by make_state_averager, which hivemind's __init__ calls
        self.aggregation = aggregation
        self.admission, self.signer = admission, signer
        self.round_log, self.grad_codec = RoundLog(), grad_codec  # grad_codec: the gradient rounds' unless they say
        super().__init__(*args, **kwargs)
        if isinstance(self.grad_averager, EpochReports):
            self.grad_averager.epoch_of = lambda: self.local_epoch

    def make_state_averager(self, **kwargs: Any) -> TrainingStateAverager:
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
            aggregation=self.aggregation,
            admission=self.admission,
            signer=self.signer,
            run_id=self.run_id,  # served states are checked against the members' parameter sketches
            **kwargs,
        )

    def use_own_gradients(self) -> None:
        self.local_step_epoch = self.local_epoch
        if self.behind_at == self.local_epoch + 1:
            logger.info("Global step %d: the swarm took it without this peer", self.local_epoch)
        elif self.tracker.global_progress.num_peers > 1:  # alone, there is nobody to average with: nothing to say
            logger.warning(
                "Global step %d: the gradient round failed; this step uses this peer's own gradients", self.local_epoch
            )
        super().use_own_gradients()

    def use_averaged_gradients(self, maybe_step_control: Any) -> None:
        self.last_group = None
        control = maybe_step_control
        read = partial(swarm_epoch, self.tracker)
        if control is not None and leave_if_passed(control, self.local_epoch, read, self.averaging_timeout):
            self.behind_at = self.local_epoch + 1  # before hivemind applies our own gradients: use_own_gradients
        super().use_averaged_gradients(maybe_step_control)
        if control is None:  # alone: no round
            return
        if control.done() and not control.cancelled() and control.exception() is None:
            outcome = control.result()
            self.last_group = [peer.to_base58() for peer in outcome]
            epoch = group_epoch(outcome, self.local_epoch, self.tracker.global_epoch)
            if epoch is not None:  # its parameters miss the group's last steps: the trainer downloads the state
                logger.info("Global step %d: the round's group was at %d", self.local_epoch, epoch)
                self.behind_at = self.local_epoch + 1  # the step this one takes
            self._log_round(outcome)
        elif self.behind_at == self.local_epoch + 1:
            self.round_log.failed_with(self.local_epoch, "the swarm took this step without this peer")
        elif control.done():
            self.round_log.failed_with(self.local_epoch, "cancelled" if control.cancelled() else control.exception())
        else:
            self.round_log.failed_with(self.local_epoch, "timeout: the round did not end within averaging_timeout")

    def _log_round(self, outcome: Any) -> None:
        peers = len(outcome)
        take_measurements(self.grad_averager, outcome, self.on_links)
        if outcome.codec:  # the compressed averagers measure their payload
            self.round_log.succeeded(self.local_epoch, peers, outcome.codec, outcome.bytes_sent, outcome.round_s)
            return
        numel = sum(p.numel() for group in self.param_groups for p in group["params"])
        dense = self.grad_codec in BYTES_PER_VALUE  # hivemind's dense codecs; PowerSGD's size is its own
        payload = payload_bytes(Level(self.grad_codec), numel, peers) if dense else None
        self.round_log.succeeded(self.local_epoch, peers, self.grad_codec, payload, outcome.round_s)

    # PeerOptimizer, beyond what hivemind.Optimizer has
    def resume_at(self, epoch: int) -> None:
        self.state_averager.local_epoch = epoch

    def learning_rate(self) -> float:
        return float(self.param_groups[0]["lr"])

    def shared_params(self) -> list[torch.Tensor]:
        return [param for group in self.state_averager.optimizer.param_groups for param in group["params"]]

    def inner_optimizer(self) -> torch.optim.Optimizer:
        return self.state_averager.optimizer

    def own_update_at(self, epoch: int) -> bool:
        return self.local_step_epoch == epoch - 1

    def behind_group_at(self, epoch: int) -> bool:
        return self.behind_at == epoch

    def pause(self, timeout_s: float) -> None:
        self.cancel_rounds(forget=True)

    def mark_idle(self, seconds: float) -> None:
        pass  # hivemind's Optimizer measures the swarm's throughput, not this peer's compute time

    def cancel_rounds(self, forget: bool = False) -> None:
        for name in ("scheduled_grads", "scheduled_state"):
            control = getattr(self, name)
            if control is not None and not control.done():
                control.cancel()
            if forget:
                setattr(self, name, None)

    def offer_state_first(self, epoch: int) -> None:
        if not self.state_averager.client_mode:  # a client serves no state
            self.state_averager.state_sharing_priority = epoch + 0.5

    def land_state_round(self) -> None:
        self.state_averager.step(wait_for_delayed_updates=True)

    def load_state_from_peers(self, **kwargs: Any) -> None:
        control = self.scheduled_grads
        if control is not None and not control.done() and control.stage in NO_GROUP_YET:
            control.cancel()
            self.scheduled_grads = None
        super().load_state_from_peers(**kwargs)


RANDOM_K = {"randk": "int8", "randk-int4": "int4", "randk-int2": "int2"}  # the codec of each random-k's values


def fixed_level(avg: AveragingSpec) -> Level:
    """The manifest's fixed codec as a ladder level: random-k at ``sparsity``, or a dense codec."""
    if avg.compression in RANDOM_K:
        return Level(RANDOM_K[avg.compression], avg.sparsity)
    return Level(avg.compression)


def manifest_codec(level: Level) -> tuple[str, float | None]:
    """The manifest's ``compression`` and ``sparsity`` (None: dense) that ``fixed_level`` reads as ``level``."""
    if level.ratio >= 1.0:
        return level.codec, None
    return next(name for name, codec in RANDOM_K.items() if codec == level.codec), level.ratio
