"""The swarm's progress read without believing one record (train/progress.py): the rules, and a forged record
published with hivemind's own API into a real DHT."""

from __future__ import annotations

import time

import pytest
from hivemind.optim.progress_tracker import LocalTrainingProgress, ProgressTracker
from hivemind.p2p import PeerID
from hivemind.utils import ValueWithExpiration
from hivemind.utils.crypto import RSAPrivateKey

from p2ptrain.local_swarm import loopback_dhts
from p2ptrain.train.progress import EPOCH_SLACK, RATE_BOUND, CheckedProgressTracker, plausible

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
