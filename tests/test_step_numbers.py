"""Gradient rounds are keyed by global step, and their members report their step in the all-gather
(step_numbers.py): a peer whose step the swarm has taken without it leaves its round at once, and one that still
finds its group ahead downloads the swarm's state."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from conftest import node_optimizers, swarm_nodes

from p2ptrain.train.step_numbers import group_epoch, swarm_epoch
from p2ptrain.train.stopping import stop_optimizer


def test_one_step_ahead_is_taken_and_more_only_as_far_as_the_progress_records_say():
    reports = {"a": {"epoch": 7}, "b": {"epoch": 8}, "c": None}
    assert group_epoch(reports, own=7, plausible=8) == 8
    assert group_epoch(reports, own=7, plausible=7) == 8  # one ahead: the records lag behind the round
    assert group_epoch(reports, own=8, plausible=9) is None  # nobody ahead of this peer
    assert group_epoch({"a": {"epoch": 10**9}}, own=7, plausible=9) is None
    assert group_epoch({"a": {"epoch": 9}, "b": {"epoch": 12}}, own=7, plausible=9) == 9
    # what other versions or liars put there is ignored
    odd = {"a": {"epoch": "8"}, "b": {"epoch": 8.0}, "c": {"epoch": True}, "d": [8], "e": {"report": {}}}
    assert group_epoch(odd, own=7, plausible=9) is None


@pytest.fixture
def nodes(tmp_path):
    started = swarm_nodes(tmp_path, 2)
    yield started
    for node in started:
        node.shutdown()


def test_gradient_rounds_of_different_global_steps_never_meet(nodes, manifest, tmp_path):
    """Two real peers' optimizers at the same global step meet in a gradient round, and each learns the other's
    step; at steps 5 and 6 (as their progress records say), looking for a round at the same moment, each finds
    nobody (its step's key is its own), where one key for every step had them average gradients of two steps."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 2) for _ in nodes]
    opts = node_optimizers(tmp_path, nodes, models, manifest)
    try:
        for opt in opts:
            opt.resume_at(6)
            opt.tracker.report_local_progress(6, 1)  # hivemind publishes a record once it has samples
        for opt, model in zip(opts, models, strict=True):
            for param in model.parameters():
                param.grad = torch.ones_like(param)
            opt.grad_averager.accumulate_grads_(batch_size=16)

        def rounds() -> list:
            controls = [opt.grad_averager.step(wait=False, timeout=10) for opt in opts]
            outcomes = []
            for control in controls:
                try:
                    outcomes.append(sorted(r.get("epoch") for r in control.result(30).values()))
                except Exception as e:  # noqa: BLE001 - hivemind's "could not find a group", as each peer sees it
                    outcomes.append(repr(e))
            return outcomes

        assert rounds() == [[6, 6], [6, 6]]
        opts[0].resume_at(5)
        apart = rounds()
        assert all("could not find a group" in str(outcome) for outcome in apart), apart
    finally:
        for opt in opts:
            stop_optimizer(opt, step_running=False)


def test_a_round_of_a_step_the_swarm_has_taken_is_left_at_once(nodes, manifest, tmp_path):
    """The other peer's progress record says global step 6; this one, at 5, looks for its step's round: the swarm
    took that step without it, so it leaves the round within a second or two (not after the averaging timeout, alone),
    and marks the step to 6 as taken behind the swarm: the trainer downloads the swarm's state."""
    models = [torch.nn.Linear(4, 2) for _ in nodes]
    opts = node_optimizers(tmp_path, nodes, models, manifest)
    behind, ahead = opts
    try:
        for opt, epoch in ((behind, 5), (ahead, 6)):
            opt.resume_at(epoch)
            opt.tracker.report_local_progress(epoch, 1)  # hivemind publishes a record once it has samples
        deadline = time.monotonic() + 30
        while swarm_epoch(behind.tracker) != 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert swarm_epoch(behind.tracker) == 6, "the records never showed the other peer's step"
        for param in models[0].parameters():
            param.grad = torch.ones_like(param)
        behind.grad_averager.accumulate_grads_(batch_size=16)
        control = behind.grad_averager.step(wait=False, timeout=behind.averaging_timeout)
        started = time.monotonic()
        behind.use_averaged_gradients(control)
        assert time.monotonic() - started < min(5.0, behind.averaging_timeout / 2)
        assert control.cancelled() and behind.behind_group_at(6) and behind.last_group is None
        assert behind.round_log.last[-1]["reason"] == "behind the swarm"
    finally:
        for opt in opts:
            stop_optimizer(opt, step_running=False)


def test_a_peer_behind_its_group_downloads_the_state_without_publishing_its_sketch(tmp_path, caplog, monkeypatch):
    """Its parameters miss the group's last steps: a sketch of them under the group's step number would only put
    one more camp in the others' check."""
    caplog.set_level(logging.INFO)
    from types import SimpleNamespace

    from p2ptrain.status import StatusWriter
    from p2ptrain.train.keeping_up import FallingBehind
    from p2ptrain.train.trainer import Trainer

    downloads = []
    opt = SimpleNamespace(
        local_epoch=7,
        behind_group_at=lambda epoch: epoch == 7,
        tracker=SimpleNamespace(global_epoch=9),
        shared_params=lambda: [],
        learning_rate=lambda: 0.1,
    )
    opt.load_state_from_peers = lambda: (downloads.append(opt.local_epoch), setattr(opt, "local_epoch", 9))
    monkeypatch.setattr("p2ptrain.train.trainer.swarm_epoch", lambda tracker: tracker.global_epoch)
    trainer = Trainer.__new__(Trainer)  # the check's bookkeeping only: no model, no swarm
    trainer.opt, trainer.lock, trainer.status = opt, threading.Lock(), StatusWriter(tmp_path / "status.json")
    published = []  # the state taken is checked one step later; the parameters before it are not
    trainer._param_check = SimpleNamespace(
        after_step=lambda *args: pytest.fail("published a sketch of the parameters behind"),
        publish=lambda epoch, *args: published.append(epoch),
        poll=lambda epoch: None,
    )
    trainer._behind = FallingBehind()
    trainer._compare_params(7)
    assert downloads == [7] and opt.local_epoch == 9 and published == [9]
    assert "the swarm took a step without this peer" in caplog.text and "now at global step 9" in caplog.text
