"""The end of a run: a peer at the last global step counts the peers still behind it from their progress records
(hivemind's ProgressTracker, on a real DHT) before it leaves."""

from __future__ import annotations

import time

import hivemind
import pytest
import torch
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils.crypto import RSAPrivateKey

from p2ptrain.settings import PeerSettings
from p2ptrain.training import TRACKER_OPTS, make_optimizer, other_epochs

RUN = "finish-test"
KEY = f"{RUN}_progress"


@pytest.fixture
def nodes():
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    others = [
        hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
        for _ in range(2)
    ]
    yield [first, *others]
    for node in (first, *others):
        node.shutdown()


def wait_until(condition, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_other_epochs_come_from_progress_records_and_forget_peers_that_left(nodes):
    keys = [RSAPrivateKey() for _ in nodes]  # one identity per peer, as in separate processes
    trackers = [
        ProgressTracker(node, RUN, 64, start=True, private_key=key, **TRACKER_OPTS)
        for node, key in zip(nodes, keys, strict=True)
    ]
    try:
        for tracker, epoch in zip(trackers, (40, 40, 37), strict=True):
            with tracker.pause_updates():
                tracker.update_epoch(epoch)
            tracker.report_local_progress(epoch, 8)  # hivemind publishes a peer's record once it has samples
        me = nodes[0].peer_id.to_bytes()
        assert wait_until(lambda: sorted(other_epochs(nodes[0], KEY, me)) == [37, 40])  # not its own record

        trackers[2].shutdown(5)  # the laggard leaves: its record becomes empty
        assert wait_until(lambda: other_epochs(nodes[0], KEY, me) == [40])
    finally:
        for tracker in trackers:
            tracker.shutdown(5)


def test_no_records_means_nobody_behind(nodes):
    assert other_epochs(nodes[0], "nothing-here_progress", nodes[0].peer_id.to_bytes()) == []


def test_an_update_from_local_gradients_alone_is_remembered(nodes, manifest, tmp_path):
    """A lone peer's round finds nobody: hivemind updates from its own gradients, and the optimizer says so."""
    model = torch.nn.Linear(4, 2)
    opt = make_optimizer(nodes[0], model, manifest, PeerSettings(data_dir=tmp_path, batch_size=16))
    try:
        assert opt.local_step_epoch == -1
        deadline = time.monotonic() + 60
        while opt.local_epoch == 0 and time.monotonic() < deadline:
            model(torch.randn(16, 4)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        assert opt.local_epoch == 1 and opt.local_step_epoch == 0
    finally:
        opt.shutdown()
