"""Members of a gradient round report their global step in its all-gather (step_numbers.py): one that finds its
group ahead downloads the swarm's state."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from conftest import node_optimizers, swarm_nodes

from p2ptrain.train.step_numbers import group_epoch
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


def test_a_member_behind_its_group_knows_it(nodes, manifest, tmp_path):
    """Two real peers' optimizers, at global steps 5 and 6 (as their progress records say), average their gradients
    in one round: the first learns that its step to 6 applied a group's round of step 6, so it missed a step."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 2) for _ in nodes]
    opts = node_optimizers(tmp_path, nodes, models, manifest)
    try:
        for opt, epoch in zip(opts, (5, 6), strict=True):
            opt.resume_at(epoch)
            opt.tracker.report_local_progress(epoch, 1)  # hivemind publishes a record once it has samples
        deadline = time.monotonic() + 30
        while opts[0].tracker.global_epoch < 6 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert opts[0].tracker.global_epoch == 6, "the first peer's tracker never read the second's progress record"
        for opt, model in zip(opts, models, strict=True):
            for param in model.parameters():
                param.grad = torch.ones_like(param)
            opt.grad_averager.accumulate_grads_(batch_size=16)
        controls = [opt.grad_averager.step(wait=False, timeout=30) for opt in opts]
        results = [control.result(60) for control in controls]
        assert [sorted(r.get("epoch") for r in result.values()) for result in results] == [[5, 6], [5, 6]]
        used = [
            threading.Thread(target=opt.use_averaged_gradients, args=(control,))
            for opt, control in zip(opts, controls, strict=True)
        ]
        for thread in used:
            thread.start()
        for thread in used:
            thread.join(30)
        assert [opt.local_epoch for opt in opts] == [5, 6]  # the step each takes next: to 6 and to 7
        # the first missed the step the second took to 6: after its own step to 6 it downloads the state (Trainer)
        assert [opt.behind_group_at(6) for opt in opts] == [True, False]
        assert [opt.behind_group_at(7) for opt in opts] == [False, False]
        assert [opt.last_group is not None for opt in opts] == [True, True]
    finally:
        for opt in opts:
            stop_optimizer(opt, step_running=False)


def test_a_peer_behind_its_group_downloads_the_state_without_publishing_its_sketch(tmp_path, caplog):
    """Its parameters miss the group's last steps: a sketch of them under the group's step number would only put
    one more camp in the others' check."""
    caplog.set_level(logging.INFO)
    from types import SimpleNamespace

    from p2ptrain.status import StatusWriter
    from p2ptrain.train.keeping_up import FallingBehind
    from p2ptrain.train.trainer import Trainer

    downloads = []
    opt = SimpleNamespace(
        local_epoch=7, behind_group_at=lambda epoch: epoch == 7, tracker=SimpleNamespace(global_epoch=9)
    )
    opt.load_state_from_peers = lambda: (downloads.append(opt.local_epoch), setattr(opt, "local_epoch", 9))
    trainer = Trainer.__new__(Trainer)  # the check's bookkeeping only: no model, no swarm
    trainer.opt, trainer.lock, trainer.status = opt, threading.Lock(), StatusWriter(tmp_path / "status.json")
    trainer._param_check = SimpleNamespace(after_step=lambda *args: pytest.fail("published a sketch"))
    trainer._behind = FallingBehind()
    trainer._compare_params(7)
    assert downloads == [7] and opt.local_epoch == 9
    assert "its round's group was ahead" in caplog.text and "now at global step 9" in caplog.text
