"""A peer whose state downloads outlast the swarm's global steps says it cannot catch up (train/keeping_up.py)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import pytest

from p2ptrain.settings import PeerSettings
from p2ptrain.status import StatusWriter
from p2ptrain.train import trainer as trainer_module
from p2ptrain.train.keeping_up import FallingBehind, Lag
from p2ptrain.train.param_check import Verdict
from p2ptrain.train.trainer import Trainer


@pytest.fixture(autouse=True)
def records_say_the_trackers_step(monkeypatch):
    """The stand-in trackers' ``global_epoch`` is what the swarm's progress records say when read."""
    monkeypatch.setattr(trainer_module, "swarm_epoch", lambda tracker: tracker.global_epoch)


def test_three_downloads_in_a_row_that_end_behind_measure_the_download_and_the_step():
    behind = FallingBehind(matchmaking_s=5.0, limit=3)
    assert behind.after_download(10.0, 20, 3.0) is None
    assert behind.after_download(14.0, 22, 3.5) is None
    lag = behind.after_download(18.0, 24, 4.0)
    assert lag == Lag(downloads=3, download_s=3.5, step_s=2.0, matchmaking_s=5.0)
    assert "a download takes 3.5 s, the swarm steps every 2.0 s and forms each round's group over the 5 s" in (
        lag.message()
    )
    assert behind.after_download(22.0, 26, 3.0) is None  # counts anew
    behind.kept_up()
    assert behind.after_download(30.0, 30, 3.0) is None and behind.after_download(31.0, 31, 3.0) is None


def test_the_trainer_reports_a_peer_that_falls_behind_after_every_download_and_clears_it_once_caught_up(
    tmp_path, caplog
):
    """The trainer's step bookkeeping with a stand-in optimizer whose downloads take 0.2 s while the swarm steps
    twice during each: the peer's round after every download is the swarm's next step."""
    swarm = SimpleNamespace(global_epoch=10)
    behind = {"now": True}

    def download():
        time.sleep(0.2)
        opt.local_epoch = swarm.global_epoch  # the state it gets is the one served when it asked
        swarm.global_epoch += 2  # ... and the swarm stepped on meanwhile

    opt = SimpleNamespace(
        local_epoch=10,
        tracker=swarm,
        behind_group_at=lambda epoch: behind["now"],
        load_state_from_peers=download,
        learning_rate=lambda: 0.1,
        own_update_at=lambda epoch: False,
        last_group=None,
        shared_params=lambda: [],
        offer_state_first=lambda epoch: None,
    )
    trainer = Trainer.__new__(Trainer)  # the step bookkeeping only: no model, no swarm
    trainer.opt, trainer._behind, trainer.lock = opt, FallingBehind(), threading.Lock()
    trainer.status = StatusWriter(tmp_path / "status.json")
    trainer.settings = PeerSettings(data_dir=tmp_path)
    trainer._param_check = SimpleNamespace(
        after_step=lambda *args: None, publish=lambda *args: None, poll=lambda epoch: None
    )
    with caplog.at_level(logging.INFO, logger="p2ptrain.train.trainer"):
        for _ in range(3):
            trainer._compare_params(opt.local_epoch + 1)
    lag = trainer.status.status.falling_behind
    assert lag["downloads"] == 3 and 0.2 <= lag["download_s"] < 1.0 and 0.1 <= lag["step_s"] < 0.5, lag
    # each state came a step behind the swarm's records: downloaded again at once, not after a round left
    assert caplog.text.count("past the state downloaded") == 3
    assert "Falling behind: this peer took no global step with the swarm between its last 3 state downloads" in (
        caplog.text
    )
    behind["now"] = False  # a global step with its own group: caught up
    with caplog.at_level(logging.INFO, logger="p2ptrain.train.trainer"):
        trainer._compare_params(opt.local_epoch + 1)
    assert trainer.status.status.falling_behind is None and "Caught up with the swarm" in caplog.text


def test_a_peer_whose_round_after_each_download_finds_nobody_falls_behind(tmp_path, caplog):
    """Back from a download, the peer's round finds its step's group gone (rounds are keyed by step), it steps on its
    own gradients, and the parameter check sends it to download again. A global step with a group ends the chain."""
    swarm = SimpleNamespace(global_epoch=10)
    rounds = {"fail": True}

    def download():
        time.sleep(0.1)
        opt.local_epoch = swarm.global_epoch
        swarm.global_epoch += 1

    opt = SimpleNamespace(
        local_epoch=10,
        tracker=swarm,
        behind_group_at=lambda epoch: False,
        load_state_from_peers=download,
        learning_rate=lambda: 0.1,
        own_update_at=lambda epoch: rounds["fail"],
        last_group=None,
        shared_params=lambda: [],
        offer_state_first=lambda epoch: None,
    )
    left = Verdict(epoch=0, others=1, agreeing=0, left=True)  # the one peer of our round differs; our update was ours
    trainer = Trainer.__new__(Trainer)
    trainer.opt, trainer._behind, trainer.lock = opt, FallingBehind(), threading.Lock()
    trainer.status = StatusWriter(tmp_path / "status.json")
    trainer.settings = PeerSettings(data_dir=tmp_path)
    check = lambda epoch, *args: replace(left, epoch=epoch) if rounds["fail"] else None  # noqa: E731
    trainer._param_check = SimpleNamespace(after_step=check, publish=lambda *args: None, poll=lambda epoch: None)
    with caplog.at_level(logging.INFO, logger="p2ptrain.train.trainer"):
        for _ in range(2):
            trainer._compare_params(opt.local_epoch + 1)
        assert trainer.status.status.falling_behind is None  # two downloads: not yet
        rounds["fail"] = False  # a step with a group between them: the chain starts anew
        trainer._compare_params(opt.local_epoch + 1)
        rounds["fail"] = True
        for _ in range(2):
            trainer._compare_params(opt.local_epoch + 1)
        assert trainer.status.status.falling_behind is None
        trainer._compare_params(opt.local_epoch + 1)
    assert trainer.status.status.falling_behind["downloads"] == 3
    assert "Falling behind: this peer took no global step with the swarm" in caplog.text


def test_steps_the_swarm_took_without_this_peer_do_not_count_as_a_stuck_averager(tmp_path):
    """A late peer's round is left, not stuck: its steps taken behind the swarm never make it rejoin with new
    averagers, while as many own updates with a group to be had do."""
    from p2ptrain.train.keeping_up import STUCK_STEPS, StuckRounds
    from p2ptrain.train.round_log import RoundLog

    asked = []
    late = {"now": True}
    opt = SimpleNamespace(
        local_epoch=5,
        tracker=SimpleNamespace(global_progress=SimpleNamespace(num_peers=3)),
        own_update_at=lambda epoch: True,
        behind_group_at=lambda epoch: late["now"],
        round_log=RoundLog(),
    )
    trainer = Trainer.__new__(Trainer)  # the step bookkeeping only: no model, no swarm
    trainer.opt, trainer._stuck, trainer._on_stuck, trainer._save = opt, StuckRounds(), asked.append, lambda: None
    trainer.status = StatusWriter(tmp_path / "status.json")
    trainer.settings = PeerSettings(data_dir=tmp_path, validate_every=0, checkpoint_every=100)
    trainer._param_check = None
    for epoch in range(6, 6 + 2 * STUCK_STEPS):
        trainer._on_global_step(epoch, 4.0)
    assert asked == []
    late["now"] = False
    for epoch in range(20, 20 + STUCK_STEPS):
        trainer._on_global_step(epoch, 4.0)
    assert len(asked) == 1 and "this peer's averager is stuck" in asked[0]
