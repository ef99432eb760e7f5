"""The per-step parameter check (param_check): sketches, agreement, and who resynchronises."""

from __future__ import annotations

import numpy as np
import torch

from p2ptrain.train.param_check import (
    SKETCH_SIZE,
    agree,
    camps,
    encode_sketch,
    judge,
    positions,
    read_sketches,
    sketch,
    sketch_key,
)

LR = 1e-3


def test_every_peer_samples_the_same_coordinates_and_a_new_set_each_step():
    assert np.array_equal(positions("run", 5, 10_000), positions("run", 5, 10_000))
    assert not np.array_equal(positions("run", 5, 10_000), positions("run", 6, 10_000))
    assert len(positions("run", 5, 100)) == 100  # a model smaller than the sketch: every coordinate
    params = [torch.arange(6.0).reshape(2, 3), torch.arange(6.0, 10.0)]
    values = sketch(params, "run", 1)
    flat = torch.cat([p.reshape(-1) for p in params]).numpy()
    assert np.array_equal(values, flat[positions("run", 1, 10)])


def test_rounding_agrees_a_peer_that_took_its_own_gradients_does_not():
    rng = np.random.default_rng(0)
    base = rng.normal(size=SKETCH_SIZE).astype(np.float32)
    assert agree(base, base.copy(), LR)  # what peers that averaged together hold: the same bits
    rounded = base + rng.normal(scale=1e-5 * LR, size=SKETCH_SIZE).astype(np.float32)  # other hardware's rounding
    rounded[:2] += 0.1 * LR  # a stray coordinate or two
    assert agree(base, rounded, LR)
    own_part = base.copy()
    own_part[: SKETCH_SIZE // 4] += rng.choice([-1, 1], SKETCH_SIZE // 4) * 0.1 * LR  # one part of 4 was its own
    assert not agree(base, own_part, LR)
    assert not agree(base, np.full_like(base, np.nan), LR)


ME = "m"  # our peer id in these verdicts


def test_who_resynchronises():
    rng = np.random.default_rng(1)
    swarm = rng.normal(size=SKETCH_SIZE).astype(np.float32)
    near = {p: swarm + rng.normal(scale=1e-5 * LR, size=SKETCH_SIZE).astype(np.float32) for p in "abc"}
    gone = swarm + rng.normal(scale=0.1 * LR, size=SKETCH_SIZE).astype(np.float32)
    assert judge(gone, near, LR, 7, False, ME).left  # none agrees with us, they agree among themselves
    assert not judge(near["a"], {"b": near["b"], "x": gone}, LR, 7, False, ME).left  # one agrees: we are fine
    assert not judge(gone, {}, LR, 7, False, ME).left  # alone: nothing to compare
    # two peers that disagree: the one whose last update was its own goes
    assert judge(gone, {"a": near["a"]}, LR, 7, True, ME).left
    assert not judge(near["a"], {"x": gone}, LR, 7, False, ME).left
    # everybody apart from everybody: camps of one; the smallest peer id's state wins, the others take it
    apart = {p: swarm + rng.normal(scale=0.1 * LR, size=SKETCH_SIZE).astype(np.float32) for p in "de"}
    ours = judge(gone, apart, LR, 7, False, me="b", everyone=apart)
    assert ours.lead and not ours.left and ours.camps == 3
    theirs = judge(gone, apart, LR, 7, False, me="f", everyone=apart)
    assert theirs.left and not theirs.lead and "3 camps" in theirs.reason()


def test_camps_left_by_split_rounds_join_the_largest():
    """Two rounds in one step, {m, a} and {b, c, d}: each round's members agree, so the round check passes in both
    camps; the camp rule sends the smaller one to the larger's state, and the larger offers it. Between equal camps
    the one with the smallest peer id wins, on every member alike."""
    rng = np.random.default_rng(2)
    noise = lambda: rng.normal(scale=1e-5 * LR, size=SKETCH_SIZE).astype(np.float32)  # noqa: E731 - rounding
    x = rng.normal(size=SKETCH_SIZE).astype(np.float32)
    y = x + rng.choice([-1, 1], SKETCH_SIZE).astype(np.float32) * 0.1 * LR  # a step apart
    small, large = {"a": x + noise()}, {p: y + noise() for p in "bcd"}
    assert [sorted(c) for c in camps({"m": x, **small, **large}, LR)] == [["b", "c", "d"], ["a", "m"]]
    ours = judge(x, small, LR, 9, False, ME, everyone={**small, **large})
    assert ours.left and ours.camps == 2 and "2 camps" in ours.reason()
    theirs = judge(y + noise(), {p: large[p] for p in "cd"}, LR, 9, False, "b", everyone={"m": x, **small, **large})
    assert theirs.lead and not theirs.left and theirs.camps == 2
    assert not judge(x, small, LR, 9, False, ME, everyone=small).left  # camps count only the peers read
    # equal camps: {a, m} against {b, c}: the camp with "a" wins, on both sides
    pair = {p: y + noise() for p in "bc"}
    assert judge(x, small, LR, 9, False, ME, everyone={**small, **pair}).lead
    assert judge(y, {"c": pair["c"]}, LR, 9, False, "b", everyone={"m": x, **small, **pair}).left
    # ... and when each side's read missed one member of the other camp, each finds its own the larger (2 against
    # 1): the peers read at a recent check but not now count against ours, and only the camp with "a" leads
    assert judge(y, pair, LR, 9, False, "b", everyone={**small, "c": pair["c"]}).lead  # without: both lead
    missed = judge(y, pair, LR, 9, False, "b", everyone={**small, "c": pair["c"]}, unread=frozenset({"m"}))
    assert missed.left and not missed.lead and "1 peer(s) read before but not now" in missed.reason()
    kept = judge(x, small, LR, 9, False, ME, everyone={**small, "b": pair["b"]}, unread=frozenset({"c"}))
    assert kept.lead and not kept.left


def test_only_peers_met_in_rounds_count_in_camps(tmp_path):
    """Sketches are cheap to publish under new peer ids: a camp of ids never met in a round cannot outvote the
    peers we average with (it would send us to download a state those ids vouch for). Five members on real DHT
    nodes, each publishing its signed sketch: m and a hold the swarm's parameters, three fresh ids another."""
    import time

    from conftest import swarm_node

    from p2ptrain.train.param_check import ParamCheck

    def verdict_of(check: ParamCheck, epoch: int):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # every member's sketch stored (each store is a background one)
            found = check.dht.get(sketch_key("run", epoch), latest=True)
            if found is not None and len(found.value) == 5:
                break
            time.sleep(0.1)
        while time.monotonic() < deadline:
            verdict = check.poll(epoch)
            if verdict is not None:
                return verdict
            time.sleep(0.05)
        raise AssertionError(f"no verdict within 20 s (last: {check.last})")

    rng = np.random.default_rng(3)
    params = [torch.tensor(rng.normal(size=300).astype(np.float32))]
    forged = [params[0] + 1.0]
    nodes = [swarm_node(tmp_path / "m", "run")]
    nodes += [swarm_node(tmp_path / name, "run", nodes[0].get_visible_maddrs()) for name in ("a", "s1", "s2", "s3")]
    try:
        m, a, *sybils = (ParamCheck(node, "run") for node in nodes)
        ids = [check.own for check in (m, a, *sybils)]
        a.after_step(4, params, LR, own_update=False, group=ids[:2])
        for sybil in sybils:
            sybil.after_step(4, forged, LR, own_update=False, group=ids[2:])
        m.after_step(4, params, LR, own_update=False, group=ids[:2])
        verdict = verdict_of(m, 4)
        assert not verdict.left and verdict.camps == 1 and verdict.agreeing == 1  # the three never met us
        m.after_step(5, params, LR, own_update=False, group=ids)  # now they averaged with us
        verdict = verdict_of(m, 4)
        assert verdict.left and verdict.camps == 2  # and, three against two, they are the swarm
    finally:
        for node in nodes:
            node.shutdown()


def test_malformed_sketches_from_the_network_are_skipped():
    good = encode_sketch(23, np.zeros(SKETCH_SIZE, dtype=np.float32))
    entry = lambda value: type("E", (), {"value": value})()  # noqa: E731 - hivemind's ValueWithExpiration
    records = {"me": good, "ok": good, "short": b"\x00" * 8, "text": "x", 3: good, "bare": good[8:]}
    records["older"] = encode_sketch(7, np.zeros(SKETCH_SIZE, dtype=np.float32))  # the same key, 16 steps before
    found = entry({peer: entry(value) for peer, value in records.items()})
    assert set(read_sketches(found, own="me", epoch=23)) == {"ok"}
    assert read_sketches(entry(["not", "a", "dict"]), own="me", epoch=7) == {}


def test_a_resync_moves_the_step_loop_on_so_it_stops_at_the_last_step(tmp_path):
    """Seen in CI: a peer resynchronised at step 5 to the swarm's last step 8, then trained one step more (9) and
    could not take the final state ("peer's epoch is behind our local epoch")."""
    from types import SimpleNamespace

    from p2ptrain.settings import PeerSettings
    from p2ptrain.status import StatusWriter
    from p2ptrain.train.keeping_up import StuckRounds
    from p2ptrain.train.round_log import RoundLog
    from p2ptrain.train.trainer import Trainer

    opt = SimpleNamespace(
        local_epoch=5,
        tracker=SimpleNamespace(global_progress=SimpleNamespace(num_peers=3)),
        own_update_at=lambda epoch: False,
        behind_group_at=lambda epoch: False,
        round_log=RoundLog(),
    )
    trainer = Trainer.__new__(Trainer)  # the step bookkeeping only: no model, no swarm
    trainer.opt, trainer._stuck, trainer._on_stuck, trainer._save = opt, StuckRounds(), None, lambda: None
    trainer.status = StatusWriter(tmp_path / "status.json")
    trainer.settings = PeerSettings(data_dir=tmp_path, validate_every=0, checkpoint_every=100)
    trainer._param_check = object()
    trainer._compare_params = lambda epoch: setattr(opt, "local_epoch", 8)  # the check downloads the swarm's state
    assert trainer._on_global_step(5, 4.2) == 8
    trainer._compare_params = lambda epoch: None
    assert trainer._on_global_step(8, 4.1) == 8


def test_a_peer_read_at_a_recent_check_but_missed_now_counts_against_our_camp():
    """ParamCheck's own bookkeeping, with a stand-in DHT that answers what the test says (a real one cannot be made to
    miss one record on purpose): b's camp {b, c} ties {a, m}, and the camp with "a" wins. When b's read misses m,
    read two steps before, m still counts against b's camp; missed for more than READ_STEPS steps, it no longer
    does."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    from p2ptrain.train.param_check import ParamCheck

    class Dht:
        peer_id = SimpleNamespace(to_base58=lambda: "b")
        answer: dict = {}

        def store(self, *args, **kwargs) -> None: ...

        def get(self, key, latest, return_future) -> Future:
            future = Future()
            future.set_result(SimpleNamespace(value={p: SimpleNamespace(value=v) for p, v in self.answer.items()}))
            return future

    dht = Dht()
    check = ParamCheck(dht, "run")
    params = [torch.arange(300, dtype=torch.float32)]

    def verdict_at(epoch: int, readers: str):
        check.after_step(epoch, params, LR, own_update=False, group=["a", "c", "m"])
        ours = check._mine[epoch][0]
        other = ours + np.float32(LR)  # a step apart
        dht.answer = {p: encode_sketch(epoch, ours if p == "c" else other) for p in readers}
        check.after_step(epoch + 1, params, LR, own_update=False, group=["a", "c", "m"])
        for _ in range(3):  # a read of another step may be in flight first (it finds no sketch of its step)
            verdict = check.poll(epoch)
            if verdict is not None and verdict.epoch == epoch:
                return verdict
        raise AssertionError(f"no verdict for step {epoch}")

    assert verdict_at(4, "acm").left  # everyone read: {a, m} wins the tie
    missed = verdict_at(6, "ac")  # m read at 4, not now: it still counts
    assert missed.left and missed.unread == 1
    assert verdict_at(12, "ac").lead  # m last read at 4, more than READ_STEPS back: {b, c} against {a}


def test_the_state_a_resync_took_is_checked_against_the_others(tmp_path, monkeypatch):
    """A peer that resynchronises every other step was never checked (a check needs two steps in a row): after a
    download the trainer publishes the state taken and starts reading the others' sketches of its step, so the
    next check judges it. Real DHT nodes; the download is a stand-in that takes the other peer's parameters."""
    import threading
    import time
    from types import SimpleNamespace

    from conftest import swarm_nodes

    from p2ptrain.settings import PeerSettings
    from p2ptrain.status import StatusWriter
    from p2ptrain.train.keeping_up import FallingBehind
    from p2ptrain.train.param_check import ParamCheck
    from p2ptrain.train.trainer import Trainer

    params = [torch.tensor(np.random.default_rng(5).normal(size=300).astype(np.float32))]
    nodes = swarm_nodes(tmp_path, 2, "run")
    try:
        other, ours = (ParamCheck(node, "run") for node in nodes)
        other.after_step(9, params, LR, own_update=False)  # its store runs in the background: wait until ours sees it
        seen_by = time.monotonic() + 20
        while not (found := nodes[1].get(sketch_key("run", 9), latest=True)) and time.monotonic() < seen_by:
            time.sleep(0.1)
        assert found, "the other peer's sketch never reached the DHT"
        held = [params[0] + 1.0]  # ours before the download: a step behind, apart

        def download():
            held[0] = params[0].clone()
            opt.local_epoch = 9

        opt = SimpleNamespace(
            local_epoch=8, tracker=SimpleNamespace(global_epoch=9), load_state_from_peers=download,
            shared_params=lambda: held, learning_rate=lambda: LR,
        )  # fmt: skip
        monkeypatch.setattr("p2ptrain.train.trainer.swarm_epoch", lambda tracker: tracker.global_epoch)
        trainer = Trainer.__new__(Trainer)  # the resync's bookkeeping only: no model, no training
        trainer.opt, trainer.lock, trainer._behind, trainer._param_check = opt, threading.Lock(), FallingBehind(), ours
        trainer.status = StatusWriter(tmp_path / "status.json")
        trainer.settings = PeerSettings(data_dir=tmp_path)
        trainer._resync(8, "a test")
        deadline = time.monotonic() + 20
        verdict = None
        while verdict is None and time.monotonic() < deadline:
            time.sleep(0.1)
            verdict = ours.poll(10)  # what the next step's check does first: the read the resync started
        assert verdict is not None and verdict.epoch == 9 and verdict.agreeing == verdict.others == 1, verdict
    finally:
        for node in nodes:
            node.shutdown()
