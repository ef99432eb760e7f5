"""The swarm's progress read without believing one record (train/progress.py): the rules, and a forged record
published with hivemind's own API into a real DHT."""

from __future__ import annotations

import time
from typing import Any

import hivemind
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.p2p import P2P, PeerID
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from p2ptrain.local_swarm import loopback_dhts
from p2ptrain.swarm.admission import Admission, grant, make_pass
from p2ptrain.swarm.discovery import passes_key
from p2ptrain.swarm.identity import identity_key, p2p_identity_path
from p2ptrain.train.progress import EPOCH_SLACK, RATE_BOUND, CheckedProgressTracker, plausible, signs_with

NOW = 1_000_000.0
TARGET = 256


def record(epoch: int, samples: int = 10, rate: float = 20.0, at: float = NOW - 1, client: bool = False) -> dict:
    peer = PeerID.from_base58("QmNr5AVWEmQ9Zq4Yh6ySqwJjyAovXP3wWqnim2icoNAndY").to_bytes()
    progress = LocalTrainingProgress(
        peer_id=peer, epoch=epoch, samples_accumulated=samples, samples_per_second=rate, time=at, client_mode=client
    )
    return ValueWithExpiration(progress.dict(), NOW + 60)


def read(records: dict) -> tuple[dict, list[str]]:
    return plausible(records, TARGET, max_age_s=60.0, now=NOW)


def test_honest_records_are_read_as_written():
    honest = {b"a": record(50), b"b": record(51, samples=3), b"c": record(50, rate=35.0), b"new": record(0, 0, 0.0)}
    kept, notes = read(honest)
    assert kept == honest and notes == {}
    assert read({b"new": record(0, 0, 0.0), b"a": record(50)})[0].keys() == {b"new", b"a"}  # a new peer catches up


def test_a_record_far_ahead_of_the_others_is_left_out():
    kept, notes = read({b"a": record(50), b"b": record(50), b"liar": record(10**9)})
    assert set(kept) == {b"a", b"b"}
    assert "epoch 1000000000, beyond the records' median 50 + 2" in notes[b"liar"]
    assert "peer QmNr5AVWEmQ9Zq4Yh6ySqwJjyAovXP3wWqnim2icoNAndY (as it says)" in notes[b"liar"]
    assert set(read({b"a": record(50), b"b": record(50 + EPOCH_SLACK)})[0]) == {b"a", b"b"}
    assert set(read({b"a": record(5, client=True), b"b": record(9, client=True)})[0]) == {b"a", b"b"}  # not judged


def test_claims_of_samples_rate_and_age_are_cut_to_the_others():
    liar = record(50, samples=10**9, rate=1e9, at=NOW - 10**6)
    kept, notes = read({b"a": record(50), b"b": record(50), b"liar": liar})
    cut = LocalTrainingProgress.parse_obj(kept[b"liar"].value)
    assert cut.samples_accumulated == max(RATE_BOUND * 10, TARGET // 3)
    assert cut.samples_per_second == RATE_BOUND * 20.0 and cut.time == NOW - 60.0
    assert set(notes) == {b"liar"} and "1000000000 samples at 1e+09/s counted as 100 at 200/s" in notes[b"liar"]
    # a fast honest peer still counts for its share of the batch when the others have just begun
    fast = read({b"a": record(50, samples=0), b"b": record(50, samples=1), b"fast": record(50, samples=120)})[0]
    assert LocalTrainingProgress.parse_obj(fast[b"fast"].value).samples_accumulated == TARGET // 3


def stored(dht) -> dict:
    found = dht.get("run_progress", latest=True)
    return found.value if found is not None and isinstance(found.value, dict) else {}


@pytest.mark.parametrize("checked", [False, True])
def test_a_forged_record_in_a_real_dht_moves_only_hiveminds_stock_tracker(checked, caplog):
    """Two honest peers at epoch 5 and a stranger who signs its own record with hivemind's API: epoch 10⁹ and a
    whole batch at a huge rate. hivemind's tracker believes it (the peer would download state at every step and
    end every global step at once); p2ptrain's keeps the honest step and does not end it early."""
    dhts = loopback_dhts(3)
    opts = dict(
        target_batch_size=TARGET, min_refresh_period=0.2, max_refresh_period=0.5, default_refresh_period=0.5, start=True
    )
    reader_type = CheckedProgressTracker if checked else ProgressTracker
    keys = [RSAPrivateKey() for _ in range(3)]  # as in three processes: hivemind signs with a per-process key
    trackers = [
        reader_type(dhts[0], "run", private_key=keys[0], **opts),
        ProgressTracker(dhts[1], "run", private_key=keys[1], **opts),
    ]
    liar = ProgressTracker(dhts[2], "run", private_key=keys[2], **opts)
    try:
        for tracker in trackers:
            tracker.report_local_progress(5, 1)  # hivemind publishes a record once a peer has a sample
            tracker.performance_ema.samples_per_second = 8.0  # and its rate: the batch is 30 s away
            tracker.report_local_progress(5, 1)
        liar.report_local_progress(10**9, 10**9)  # in no time: a rate of billions
        deadline = time.monotonic() + 20
        while (len(stored(dhts[0])) < 3 or trackers[0].global_progress.num_peers < 2) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(stored(dhts[0])) == 3
        time.sleep(1.5)  # the reader fetches at least every 0.5 s: it has read all three records
        progress = trackers[0].global_progress
        if checked:
            assert progress.num_peers == 2 and progress.epoch == 5 and not trackers[0].ready_to_update_epoch
            assert progress.samples_accumulated == 2
            assert "Left out of the swarm's progress: the progress record of peer" in caplog.text
        else:
            assert progress.num_peers == 3 and progress.epoch == 10**9 and trackers[0].ready_to_update_epoch
    finally:
        for tracker in (*trackers, liar):
            tracker.shutdown()
        for dht in dhts:
            dht.shutdown()


def identified_dhts(tmp_path, n: int) -> list[tuple[hivemind.DHT, Any]]:
    """``n`` DHT nodes on 127.0.0.1, each with an identity file, as a peer's data directory holds: (node, its key)."""
    nodes = []
    for i in range(n):
        data_dir = tmp_path / f"peer{i}"
        data_dir.mkdir()
        P2P.generate_identity(str(p2p_identity_path(data_dir)))
        initial = nodes[0][0].get_visible_maddrs() if nodes else []
        dht = hivemind.DHT(
            start=True,
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            initial_peers=initial,
            identity_path=str(p2p_identity_path(data_dir)),
        )
        nodes.append((dht, identity_key(data_dir)))
    return nodes


@pytest.mark.parametrize("private", [False, True])
def test_records_count_only_when_signed_by_the_peer_they_name(tmp_path, private, caplog):
    """Peers sign their progress record with their identity key (``signs_with``). A stranger with hivemind's stock
    tracker signs with a key of no peer: left out. In a private swarm, a stranger who signs its record properly but
    holds no pass is left out too; the members (passes published, as ``discovery.publish`` does) count."""
    run, author = "run", Ed25519PrivateKey.generate()
    nodes = identified_dhts(tmp_path, 4)
    opts = dict(target_batch_size=TARGET, min_refresh_period=0.2, max_refresh_period=0.5, default_refresh_period=0.5)
    admission = None
    if private:
        token = grant(author, run, 3600)
        for dht, _ in nodes[:2]:  # the members' passes; the stranger (nodes[2]) has none
            own = make_pass(run, dht.peer_id.to_bytes(), token)
            dht.store(passes_key(run), own, get_dht_time() + 60, subkey=dht.peer_id.to_base58())
        admission = Admission(
            run, author.public_key().public_bytes_raw(), make_pass(run, nodes[0][0].peer_id.to_bytes(), token)
        )
    members = [
        CheckedProgressTracker(dht, run, start=True, bound=True, admission=admission, **signs_with(key), **opts)
        for dht, key in nodes[:2]
    ]
    stranger_dht, stranger_key = nodes[2]
    strangers = [ProgressTracker(nodes[3][0], run, start=True, private_key=RSAPrivateKey(), **opts)]
    if private:
        strangers.append(ProgressTracker(stranger_dht, run, start=True, **signs_with(stranger_key), **opts))
    try:
        for tracker in members:
            tracker.report_local_progress(5, 1)
            tracker.report_local_progress(5, 1)
        for tracker in strangers:
            tracker.report_local_progress(6, 1)
            tracker.report_local_progress(6, 1)
        deadline = time.monotonic() + 20
        while len(stored(nodes[0][0])) < 2 + len(strangers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(stored(nodes[0][0])) == 2 + len(strangers)
        time.sleep(1.5)  # read again since
        progress = members[0].global_progress
        assert progress.num_peers == 2 and progress.epoch == 5 and progress.samples_accumulated == 2
        assert f"in the name of peer {nodes[3][0].peer_id}, signed by another key" in caplog.text
        if private:
            assert f"the progress record of peer {stranger_dht.peer_id}, who holds no valid pass" in caplog.text
    finally:
        for tracker in (*members, *strangers):
            tracker.shutdown()
        for dht, _ in nodes:
            dht.shutdown()
