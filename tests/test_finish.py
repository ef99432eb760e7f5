"""The end of a run (end_of_run.py): a peer at the last global step counts the peers still behind it from their
progress records (hivemind's ProgressTracker, on a real DHT) and the stragglers downloading its state before it
leaves."""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import time

import hivemind
import pytest
import torch
from hivemind.averaging.control import AveragingStage
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.mpfuture import MPFuture

from p2ptrain.compat.hivemind import terminate_processes
from p2ptrain.settings import PeerSettings
from p2ptrain.status import StatusWriter
from p2ptrain.swarm.discovery import finishing_key
from p2ptrain.train import end_of_run
from p2ptrain.train.data import InMemoryCorpus
from p2ptrain.train.end_of_run import (
    QUIET_S,
    Final,
    FinishWatch,
    announce_final,
    announced_download,
    final_state,
    finals,
    other_epochs,
    state_digest,
    swarm_finished,
    wait_for_stragglers,
)
from p2ptrain.train.optimizers import TRACKER_OPTS, make_optimizer
from p2ptrain.train.progress import CheckedProgressTracker
from p2ptrain.train.stopping import stop_optimizer
from p2ptrain.train.tokenizer import load_tokenizer
from p2ptrain.train.trainer import Trainer

RUN = "finish-test"
KEY = f"{RUN}_progress"
DIGEST = "ab" * 32  # a state's sha256, as peers announce it


def downloading(node, key) -> int:
    """How many other peers announced a download of a final state that they have not finished."""
    return end_of_run._downloading(end_of_run._records(node, key), node.peer_id.to_base58())


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
        assert wait_until(lambda: sorted(other_epochs(nodes[0], KEY)) == [37, 40])  # not its own record

        trackers[2].shutdown(5)  # the laggard leaves: its record becomes empty
        assert wait_until(lambda: other_epochs(nodes[0], KEY) == [40])
    finally:
        for tracker in trackers:
            tracker.shutdown(5)


def test_no_records_means_nobody_behind(nodes):
    assert other_epochs(nodes[0], "nothing-here_progress") == []


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


def test_a_download_is_announced_until_it_ends_and_malformed_records_are_ignored(nodes):
    key = finishing_key(RUN)
    nodes[2].store(key, "not a record", get_dht_time() + 30, subkey="hostile")
    nodes[2].store(key, {"epoch": 40, "done": "no"}, get_dht_time() + 30, subkey="hostile too")
    with announced_download(nodes[1], key, 40, 30, lambda: DIGEST):
        assert wait_until(lambda: downloading(nodes[0], key) == 1)
        assert downloading(nodes[1], key) == 0  # not its own
    assert wait_until(lambda: downloading(nodes[0], key) == 0)
    assert [(f.peer, f.digest) for f in finals(nodes[0], key, 40)] == [(nodes[1].peer_id.to_base58(), DIGEST)]


def waiter(node, key, timeout_s, one_state=True):
    """``wait_for_stragglers`` for a peer at global step 40 in a thread; how long it stayed."""
    took = []
    stop = threading.Event()

    def run():
        started = time.monotonic()
        wait_for_stragglers(node, KEY, key, 40, stop, timeout_s, one_state)
        took.append(time.monotonic() - started)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, took, stop


def test_a_peer_at_the_last_step_stays_while_a_straggler_downloads_its_state(nodes):
    key = finishing_key(RUN)
    thread, took, _ = waiter(nodes[0], key, 5)
    thread.join(10)
    assert took and took[0] < 2, "nobody behind, nobody downloading: it leaves at once"

    with announced_download(nodes[1], key, 40, 60, lambda: DIGEST):
        thread, took, _ = waiter(nodes[0], key, 60)
        time.sleep(8)
        assert not took, "left while a straggler was downloading its state"
    thread.join(QUIET_S + 10)
    assert took and 8 + QUIET_S <= took[0] < 8 + QUIET_S + 8, took


def test_the_wait_is_bounded_and_a_stop_ends_it(nodes):
    key = finishing_key(RUN)
    nodes[1].store(key, {"epoch": 40, "done": False}, get_dht_time() + 120, subkey="never done")
    thread, took, _ = waiter(nodes[0], key, 4)
    thread.join(20)
    assert took and 8 <= took[0] < 13, took  # a download in progress: twice the bound for peers behind
    thread, took, stop = waiter(nodes[0], key, 60)
    time.sleep(2)
    stop.set()
    thread.join(5)
    assert took and took[0] < 5, took


def test_a_peer_behind_downloads_without_waiting_out_a_round_nobody_joins(nodes, manifest, tmp_path):
    """hivemind first joins the round it scheduled (zero weight); one still looking for a group is dropped."""
    model = torch.nn.Linear(4, 2)
    slow = dataclasses.replace(manifest, averaging=dataclasses.replace(manifest.averaging, averaging_timeout_s=30.0))
    opt = make_optimizer(nodes[0], model, slow, PeerSettings(data_dir=tmp_path, batch_size=16))
    try:
        opt.scheduled_grads = opt.grad_averager.schedule_step(timeout=30)  # a round nobody else will join
        assert wait_until(lambda: opt.scheduled_grads.stage == AveragingStage.LOOKING_FOR_GROUP, 10)
        started = time.monotonic()
        opt.load_state_from_peers()
        assert time.monotonic() - started < 10  # hivemind as released: 30 s (the averaging timeout)
        assert opt.scheduled_grads is None
    finally:
        opt.shutdown()


def test_a_peer_averaging_as_a_client_catches_up_from_a_full_peer(nodes, manifest, tmp_path):
    """Behind NAT with no relay slot, a peer's DHT runs as a client: it downloads the state like any peer (hivemind
    as released raised "averager in client mode cannot share its state" after the download, ending the peer)."""
    client = hivemind.DHT(start=True, client_mode=True, initial_peers=nodes[0].get_visible_maddrs())
    full_model, client_model = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    full = make_optimizer(nodes[0], full_model, manifest, PeerSettings(data_dir=tmp_path / "full", batch_size=16))
    behind = make_optimizer(client, client_model, manifest, PeerSettings(data_dir=tmp_path / "client", batch_size=16))
    try:
        assert behind.client_mode and not full.client_mode
        assert not torch.equal(full_model.weight, client_model.weight)
        behind.load_state_from_peers()
        assert torch.equal(behind.shared_params()[0], full.shared_params()[0])
    finally:
        behind.shutdown()
        full.shutdown()
        client.shutdown()


def test_a_peer_still_training_learns_that_the_swarm_reached_its_last_step(nodes):
    key = finishing_key(RUN)
    nodes[2].store(key, {"epoch": 99, "done": "yes"}, get_dht_time() + 30, subkey="hostile")
    nodes[2].store(key, {"epoch": 99.0, "done": True}, get_dht_time() + 30, subkey="hostile too")
    announce_final(nodes[0], key, 40, DIGEST, 30)
    assert not swarm_finished(nodes[0], key, 40)  # its own announcement
    assert wait_until(lambda: swarm_finished(nodes[1], key, 40))
    assert not swarm_finished(nodes[1], key, 41)
    with announced_download(nodes[2], key, 40, 30, lambda: DIGEST):  # a download in progress is not a final state
        assert wait_until(lambda: downloading(nodes[1], key) == 1)
        assert not swarm_finished(nodes[0], key, 40)
    assert wait_until(lambda: swarm_finished(nodes[0], key, 40))  # done: it holds the final state


def test_a_step_stuck_in_hivemind_does_not_hold_up_the_shutdown(nodes, manifest, tmp_path):
    """SIGTERM while a step is still inside hivemind: its averager processes are terminated at once, not asked to
    shut down beside the running step (seen in the swarm test: 6.8 s, then "Set changed size during iteration")."""
    opt = make_optimizer(nodes[0], torch.nn.Linear(4, 2), manifest, PeerSettings(data_dir=tmp_path, batch_size=16))
    averagers = [opt.state_averager, opt.grad_averager]
    assert all(averager.is_alive() for averager in averagers)
    assert isinstance(opt.tracker, CheckedProgressTracker)  # the swarm's progress, read without believing one record
    started = time.monotonic()
    stop_optimizer(opt, step_running=True)
    assert time.monotonic() - started < 1.0
    assert wait_until(lambda: not any(averager.is_alive() for averager in averagers), 5)
    assert opt.tracker.is_alive()  # hivemind's shutdown (which stops it first) did not run beside the step
    opt.tracker.shutdown(1)


def _make_futures() -> None:
    while True:
        MPFuture()


def test_children_terminated_while_making_futures_leave_the_futures_usable():
    """hivemind's processes share the locks of its futures: one terminated while creating a future must not leave
    the peer's next future waiting forever (seen: the test above hung 600 s in CI at the tracker's shutdown).
    Terminated the plain way, the first round below hangs."""
    fork = multiprocessing.get_context("fork")
    for _ in range(5):
        children = [fork.Process(target=_make_futures, daemon=True) for _ in range(2)]
        for child in children:
            child.start()
        time.sleep(0.1)
        terminate_processes(children)
        assert not any(child.is_alive() for child in children)
        made = threading.Thread(target=MPFuture, daemon=True)
        made.start()
        made.join(5)
        if made.is_alive():
            MPFuture.reset_backend()  # so the tests after this one can make futures
        assert not made.is_alive(), "a terminated child left a lock of hivemind's futures held"


def test_a_goodbye_that_hangs_does_not_hold_up_the_shutdown(nodes, manifest, tmp_path, monkeypatch, caplog):
    """hivemind's graceful shutdown gets a deadline: past it, the averager processes are terminated (seen: 7.8 s
    waiting for a background state-averaging round, over the 10 s a SIGTERMed peer has in all)."""
    opt = make_optimizer(nodes[0], torch.nn.Linear(4, 2), manifest, PeerSettings(data_dir=tmp_path, batch_size=16))
    averagers = [opt.state_averager, opt.grad_averager]
    stuck = threading.Event()
    monkeypatch.setattr(opt.tracker, "shutdown", lambda timeout=None: stuck.wait(30))  # a DHT that never answers
    started = time.monotonic()
    stop_optimizer(opt, step_running=False, goodbye_s=1.0)
    assert time.monotonic() - started < 2.0
    assert wait_until(lambda: not any(averager.is_alive() for averager in averagers), 5)
    assert "Saying goodbye took over 1 s (in test_finish.py:" in caplog.text  # where it hung, outside the stdlib
    stuck.set()
    opt.tracker.shutdown_triggered.set()


def test_a_goodbye_within_its_deadline_stops_the_averagers_gracefully(nodes, manifest, tmp_path, caplog):
    opt = make_optimizer(nodes[0], torch.nn.Linear(4, 2), manifest, PeerSettings(data_dir=tmp_path, batch_size=16))
    stop_optimizer(opt, step_running=False)
    assert not opt.state_averager.is_alive() and not opt.grad_averager.is_alive()
    assert wait_until(lambda: not opt.tracker.is_alive(), 5)
    assert "Saying goodbye took over" not in caplog.text and "terminating it the hard way" not in caplog.text


def test_the_training_loop_polls_for_the_end_without_waiting_on_the_dht(nodes):
    key = finishing_key(RUN)
    announce_final(nodes[0], key, 40, DIGEST, 30)
    assert wait_until(lambda: swarm_finished(nodes[1], key, 40))  # the record is there to be read
    watch = FinishWatch(nodes[1], key, 40)
    # a poll starts a get or reads its answer, it never waits for one (a blocking get took 4-24 ms here, up to
    # the 15 s bound on a slow DHT): so the first poll cannot know yet, although the record is there
    assert not watch.poll()
    deadline = time.monotonic() + 20
    while not watch.poll() and time.monotonic() < deadline:  # the second poll may already know
        time.sleep(0.01)
    assert watch.done, "never saw the announcement"
    assert not FinishWatch(nodes[0], key, 40).poll()  # its own announcement does not count


def test_the_final_state_is_the_one_announced_first_and_malformed_announcements_are_ignored(nodes):
    key, now = finishing_key(RUN), get_dht_time()
    for subkey, value in {
        "no digest": {"epoch": 40, "done": True, "since": now - 9},
        "short digest": {"epoch": 40, "done": True, "digest": "ab", "since": now - 9},
        "not hex": {"epoch": 40, "done": True, "digest": "zz" * 32, "since": now - 9},
        "nan since": {"epoch": 40, "done": True, "digest": DIGEST, "since": float("nan")},
        "int since": {"epoch": 40, "done": True, "digest": DIGEST, "since": 5},
        "other step": {"epoch": 39, "done": True, "digest": DIGEST, "since": now - 9},
        "float step": {"epoch": 40.0, "done": True, "digest": DIGEST, "since": now - 9},
        "downloading": {"epoch": 40, "done": False, "digest": DIGEST, "since": now - 9},
    }.items():
        nodes[2].store(key, value, now + 30, subkey=subkey)
    first = announce_final(nodes[0], key, 40, "01" * 32, 30)
    second = announce_final(nodes[1], key, 40, "02" * 32, 30)
    assert first.since < second.since
    assert wait_until(lambda: len(finals(nodes[2], key, 40)) == 2)
    assert final_state(finals(nodes[2], key, 40)) == first
    # a peer counts its own announcement as it made it (its store may have failed)
    earlier = Final(second.peer, second.digest, first.since - 1)
    assert final_state(finals(nodes[1], key, 40, earlier)) == earlier
    assert final_state([]) is None


def test_a_peer_at_the_last_step_stays_while_another_holds_a_different_state(nodes):
    key = finishing_key(RUN)
    announce_final(nodes[0], key, 40, "01" * 32, 60)
    announce_final(nodes[1], key, 40, "02" * 32, 60)  # announced later: it must take the first state
    thread, took, _ = waiter(nodes[0], key, 60)
    time.sleep(6)
    assert not took, "left while a peer at the last step held a state other than the final one"
    announce_final(nodes[1], key, 40, "01" * 32, 60)  # it downloaded the final state
    thread.join(QUIET_S + 10)
    assert took and 6 + QUIET_S <= took[0] < 6 + QUIET_S + 8, took


def test_a_peer_at_the_last_step_stays_for_one_that_has_not_said_which_state_it_holds(nodes):
    """Seen in the swarm test: a peer's last state-averaging round failed and retried (12 s); the others had left
    by the time it compared states, and it kept parameters that differed from the run's final state."""
    key = finishing_key(RUN)
    keys = [RSAPrivateKey() for _ in nodes]
    trackers = [
        ProgressTracker(node, RUN, 64, start=True, private_key=k, client_mode=(i == 2), **TRACKER_OPTS)
        for i, (node, k) in enumerate(zip(nodes, keys, strict=True))
    ]
    try:
        for tracker in trackers:
            with tracker.pause_updates():
                tracker.update_epoch(40)
            tracker.report_local_progress(40, 8)
        assert wait_until(lambda: sorted(other_epochs(nodes[0], KEY)) == [40, 40])
        announce_final(nodes[0], key, 40, "01" * 32, 60)
        thread, took, _ = waiter(nodes[0], key, 60)
        time.sleep(6)
        assert not took, "left while a peer at the last step (not a client) had not announced its state"
        announce_final(nodes[1], key, 40, "01" * 32, 60)  # its round landed (or it downloaded): the same state
        thread.join(QUIET_S + 10)
        assert took and 6 + QUIET_S <= took[0] < 6 + QUIET_S + 8, took  # the client (nodes[2]) was not waited for
    finally:
        for tracker in trackers:
            tracker.shutdown(5)


def test_in_mode_local_a_peer_does_not_wait_for_others_to_hold_its_state(nodes):
    """Local updates: each peer ends with its own last progress on the shared anchor, digests differ by design
    (seen: the peers at the last step of test_three_peers_converge[local-*] waited out their 60 s bound)."""
    key = finishing_key(RUN)
    announce_final(nodes[0], key, 40, "01" * 32, 60)
    announce_final(nodes[1], key, 40, "02" * 32, 60)
    time.sleep(2)  # both records seen
    thread, took, _ = waiter(nodes[0], key, 30, one_state=False)
    thread.join(15)
    assert took and took[0] < 5, took


def shared_digest(opt) -> str:
    return state_digest(opt.shared_params())


def test_peers_at_the_last_step_end_with_the_state_announced_first(nodes, manifest, tmp_path):
    """Two peers reach the last step by averaging but with different parameters (a round that did not include them
    both): the one that announced later takes the other's state, and the first waits for it to do so."""
    epoch, trainers, opts, saved = 3, [], [], []
    texts = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(200)]
    try:
        for i, node in enumerate(nodes[:2]):
            torch.manual_seed(i)
            model = torch.nn.Linear(4, 2)  # different initial parameters
            settings = PeerSettings(data_dir=tmp_path / f"p{i}", max_steps=epoch, validate_every=0, batch_size=4)
            settings.data_dir.mkdir()
            opt = make_optimizer(node, model, manifest, settings)
            opt.resume_at(epoch)  # both arrived at the last step by averaging
            opts.append(opt)
            corpus = InMemoryCorpus(texts, load_tokenizer("bytes"), 8, 0, node.peer_id.to_bytes())
            status = StatusWriter(settings.data_dir / "status.json")
            trainers.append(
                Trainer(
                    model, opt, corpus, manifest, settings, torch.device("cpu"), status, lambda i=i: saved.append(i)
                )
            )
        assert shared_digest(opts[0]) != shared_digest(opts[1])
        threads = [threading.Thread(target=t.finish, args=(threading.Event(), 20.0)) for t in trainers]
        threads[0].start()
        time.sleep(0.5)  # peer 0 announces first
        threads[1].start()
        for thread in threads:
            thread.join(60)
        assert not any(thread.is_alive() for thread in threads)
        assert shared_digest(opts[1]) == shared_digest(opts[0])
        for mine, final in zip(trainers[1].model.parameters(), opts[0].shared_params(), strict=True):
            assert torch.equal(mine, final)  # the model holds the downloaded state too
        assert opts[1].local_epoch == epoch and trainers[1].status.status.epoch == epoch
        assert saved.count(1) == 2, saved  # after its last step, then after the download
        assert opts[0].state_averager.state_sharing_priority == epoch + 0.5  # shared first
        announced = finals(nodes[2], finishing_key(manifest.run_id), epoch)
        assert {f.digest for f in announced} == {shared_digest(opts[0])}, announced
    finally:
        for opt in opts:
            opt.shutdown()
