"""The local-update optimizer alone: outer step arithmetic, checkpoint round trip, refusing bad peer state."""

from __future__ import annotations

import dataclasses
import time
from functools import partial

import hivemind
import pytest
import torch
from conftest import node_optimizers, swarm_nodes

from p2ptrain.train.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from p2ptrain.train.local_updates import LocalUpdateOptimizer
from p2ptrain.train.optimizers import TRACKER_OPTS
from p2ptrain.train.state_download import check_state
from p2ptrain.train.stopping import stop_optimizer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def dht():
    node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


@pytest.fixture
def dht2():  # one optimizer per DHT, as in a peer (a second one on a DHT whose first has stopped can stall)
    node = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    yield node
    node.shutdown()


def make(dht, model, outer_lr=1.0, momentum=0.0, run_id="local-test") -> LocalUpdateOptimizer:
    return LocalUpdateOptimizer(
        dht=dht,
        run_id=run_id,
        param_groups=[{"params": list(model.parameters())}],
        inner=partial(torch.optim.SGD, lr=0.1),
        scheduler=partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda _: 1.0),
        outer_lr=outer_lr,
        outer_momentum=momentum,
        target_batch_size=4,
        batch_size_per_step=2,
        level=None,
        budget=0.5,
        matchmaking_time=0.5,
        averaging_timeout=2.0,
        request_timeout=0.25,
        tracker_opts=TRACKER_OPTS,
    )


def train_step(model, opt):
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    opt.zero_grad()


def test_alone_an_outer_step_with_lr_1_lands_where_the_local_steps_went(dht):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = make(dht, model)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # 2 x 2 samples = the target batch: the round begins
        train_step(model, opt)
    assert opt.local_epoch == 1 and opt.scheduled_grads is not None
    opt.wait_for_round(timeout=10)  # alone: no group, so the peer applies its own pseudo-gradient
    moved = [p.detach().clone() for p in model.parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(start, moved, strict=True))
    # outer SGD with lr 1 and no momentum: anchor - 1 * (anchor - θ) = θ, and nothing happened meanwhile
    for anchor, param in zip(opt.anchor, model.parameters(), strict=True):
        torch.testing.assert_close(anchor, param.detach())
    opt.shutdown()


@pytest.mark.parametrize("shutdown", ["between steps", "while a step waits for the round"])
def test_at_shutdown_a_step_lands_the_cancelled_round_without_waiting_for_the_averager(dht, shutdown):
    """The averager's process holds its tensors' lock for as long as a round it runs lasts (on a slow link, up to
    the averaging timeout): a step that lands a cancelled round applies its own update without that lock, and
    begins no new round, so the peer's last checkpoint is not held up."""
    import threading

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = make(dht, model)
    for _ in range(2):  # the round begins
        train_step(model, opt)
    assert opt.scheduled_grads is not None
    sent = [s.clone() for s in opt._sent]  # θ_sent: the parameters this round's pseudo-gradient was taken at
    held, release = threading.Event(), threading.Event()
    if shutdown == "while a step waits for the round":
        wait = opt.wait_for_round
        opt.wait_for_round = lambda timeout: (opt.cancel_rounds(), wait(timeout))

    def averager_in_a_round() -> None:
        with opt.averager.get_tensors():
            held.set()
            release.wait(30)

    holder = threading.Thread(target=averager_in_a_round, daemon=True)
    holder.start()
    try:
        assert held.wait(10)
        if shutdown == "between steps":
            opt.cancel_rounds()  # what the peer's shutdown does
        started = time.monotonic()
        for _ in range(2):  # lands the cancelled round; the next round would be due
            train_step(model, opt)
        assert time.monotonic() - started < 3
        assert opt.scheduled_grads is None and opt.round_log.failed  # own update applied, no new round
        for anchor, at, param in zip(opt.anchor, sent, model.parameters(), strict=True):
            assert torch.allclose(anchor, at)  # outer lr 1, its own update: the anchor went to θ_sent
            assert not torch.equal(param.detach(), at)  # and θ kept the steps taken since
    finally:
        release.set()
        holder.join(10)
        opt.shutdown()


def test_a_peer_behind_the_swarm_takes_the_swarms_number_for_its_round(tmp_path, manifest):
    """A peer whose round begins after another's began (the other's progress record is a step ahead) labels it with
    the swarm's step, so that the two agree on which rounds average parameters (``sync_every``)."""
    nodes = swarm_nodes(tmp_path, 2)
    local = dataclasses.replace(manifest.averaging, mode="local", sync_every=3)
    model = torch.nn.Linear(3, 2)
    behind, ahead = node_optimizers(
        tmp_path, nodes, [model, torch.nn.Linear(3, 2)], dataclasses.replace(manifest, averaging=local)
    )
    try:
        ahead.tracker.report_local_progress(3, 1)  # it began the swarm's step 2: it is at 3, with a sample
        deadline = time.monotonic() + 30
        while behind.tracker.global_epoch < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert behind.tracker.global_epoch == 3
        train_step(model, behind)  # the swarm is ahead: the round begins at once
        assert behind.scheduled_grads is not None and behind.local_epoch == 3
        assert behind._syncing  # step 2 is a parameter round with sync_every 3, for both
    finally:
        for opt in (behind, ahead):
            stop_optimizer(opt, step_running=False)
        for node in nodes:
            node.shutdown()


def test_checkpoint_round_trip_keeps_anchor_and_outer_momentum(dht, dht2, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = make(dht, model, outer_lr=0.7, momentum=0.9)
    for _ in range(2):
        train_step(model, opt)
    opt.wait_for_round(timeout=10)
    train_step(model, opt)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt.state_dict(), CheckpointInfo(opt.local_epoch, 3, "ab" * 32, {}))
    anchors, momenta = [a.clone() for a in opt.anchor], [m.clone() for m in opt._momenta()]
    opt.shutdown()

    restored_model = torch.nn.Linear(3, 2)
    restored = make(dht2, restored_model, outer_lr=0.7, momentum=0.9, run_id="local-restored")
    info, state = load_checkpoint(path, restored_model, "ab" * 32)
    restored.load_state_dict(state)
    for a, b in zip(anchors, restored.anchor, strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(momenta, restored._momenta(), strict=True):
        torch.testing.assert_close(a, b)
    assert info.epoch >= 1 and any(torch.count_nonzero(m) for m in momenta)
    restored.shutdown()


def test_state_from_a_peer_is_checked_before_use():
    ours = [torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 3), torch.zeros(2)]  # anchors, then momenta
    good = [t.clone() + 1 for t in ours]
    assert check_state({"epoch": 3}, good, ours) == 3
    bad_cases = [
        ({"epoch": -1}, good, "metadata"),
        ({"epoch": "3"}, good, "metadata"),
        ({"epoch": 3}, good[:-1], "expected"),
        ({"epoch": 3}, [torch.zeros(5), *good[1:]], "shape"),
        ({"epoch": 3}, [good[0].double(), *good[1:]], "dtype"),
        ({"epoch": 3}, [torch.full_like(good[0], float("nan")), *good[1:]], "finite"),
    ]
    for metadata, tensors, message in bad_cases:
        with pytest.raises(ValueError, match=message):
            check_state(metadata, tensors, ours)


@pytest.mark.parametrize("poison", ["nan", "shape", None])
def test_a_late_joiner_in_gradient_mode_refuses_a_poisoned_state(dht, poison, caplog):
    """A peer serves its state (a liar runs the same code with other values); a late joiner downloads it. A NaN in
    it, or a parameter of another shape (hivemind would broadcast a (1,) tensor into every value), is refused: the
    joiner keeps its own parameters. An honest state is loaded."""
    from p2ptrain.train.optimizers import StateRounds

    served = [torch.nn.Parameter(torch.full((2, 3), 0.5)), torch.nn.Parameter(torch.zeros(2))]
    if poison == "nan":
        served[0].data[0, 0] = float("nan")
    if poison == "shape":
        served[0] = torch.nn.Parameter(torch.ones(1))
    server = StateRounds(
        dht=dht, optimizer=partial(torch.optim.SGD, lr=0.1), params=served, prefix="poison", start=True
    )
    server.local_epoch = 5
    joiner_dht = hivemind.DHT(start=True, initial_peers=dht.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    own = torch.nn.Linear(3, 2)
    before = own.weight.detach().clone()
    joiner = StateRounds(
        dht=joiner_dht, optimizer=partial(torch.optim.SGD, lr=0.1), params=own.parameters(), prefix="poison", start=True
    )
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:  # until the server has declared its state in the DHT and was asked
            joiner.load_state_from_peers(timeout=5)
            if joiner.local_epoch == 5 or "Ignoring the state a peer sent" in caplog.text:
                break
            time.sleep(0.5)
        if poison is None:
            assert torch.equal(own.weight, torch.full((2, 3), 0.5)) and joiner.local_epoch == 5
        else:
            assert torch.equal(own.weight, before) and joiner.local_epoch == 0
            assert (
                "Ignoring the state a peer sent: "
                + ("tensor 0 is not finite" if poison == "nan" else "tensor 0 does not match ours")
                in caplog.text
            )
    finally:
        joiner.shutdown()
        server.shutdown()
        joiner_dht.shutdown()


def test_what_the_codec_took_from_a_pseudo_gradient_stays_in_the_parameters(tmp_path, manifest):
    """Two real peers average 2-bit pseudo-gradients. Afterwards (no local step meanwhile) each peer's next
    pseudo-gradient, anchor − θ, is exactly what the codec took from its last one (its ``feedback``): 0 on the part
    it aggregated itself, the 2-bit rounding elsewhere. Both anchors moved by the same average."""
    nodes = swarm_nodes(tmp_path, 2)
    local = dataclasses.replace(manifest.averaging, mode="local", compression="int2", matchmaking_time_s=1.0)
    adam = dataclasses.replace(manifest.optimizer, lr=0.01, warmup_epochs=0)  # steps far above float32's rounding
    torch.manual_seed(0)
    models = [torch.nn.Linear(300, 300) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())  # one swarm, one starting point
    two_batches = dataclasses.replace(manifest, averaging=local, optimizer=adam, target_batch_size=32)
    opts = node_optimizers(tmp_path, nodes, models, two_batches)
    try:
        start = [p.detach().clone() for p in models[0].parameters()]
        for _ in range(2):  # two batches each: a whole target batch, the round begins
            for i, (model, opt) in enumerate(zip(models, opts, strict=True)):
                model(torch.randn(16, 300) + i).pow(2).sum().backward()
                opt.step()
                opt.zero_grad()
        for opt in opts:
            opt.wait_for_round(timeout=30)
            assert opt.round_log.ok == 1, opt.round_log.failed
        for a, b in zip(opts[0].anchor, opts[1].anchor, strict=True):
            assert torch.equal(a, b)
        assert not all(torch.equal(a, s) for a, s in zip(opts[0].anchor, start, strict=True))
        for model, opt in zip(models, opts, strict=True):
            kept = torch.cat(
                [(a - p.detach()).reshape(-1) for a, p in zip(opt.anchor, model.parameters(), strict=True)]
            )
            lost = torch.cat([f.reshape(-1) for f in opt.feedback])
            assert float((kept - lost).norm()) < 1e-3 * float(lost.norm()), (kept.norm(), lost.norm())
            assert 0.2 < float((lost == 0).float().mean()) < 0.8 and float(lost.norm()) > 0
    finally:
        for opt in opts:
            stop_optimizer(opt, step_running=False)
        for node in nodes:
            node.shutdown()
