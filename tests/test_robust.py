"""Robust aggregation of a part (train/robust.py): the checks, the rules, and the reducer in a real round."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
import torch

from p2ptrain.local_swarm import loopback_dhts
from p2ptrain.train.bans import Bans
from p2ptrain.train.robust import (
    AGGREGATIONS,
    NORM_BOUND,
    AverageBound,
    RobustPartReducer,
    check_contributions,
    median,
    reduce_parts,
)

SHAPE = torch.Size([1000])


def honest(n: int, seed: int = 0, noise: float = 1.0) -> list[torch.Tensor]:
    """``n`` noisy copies of one true vector (what honest members' gradients look like)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(SHAPE, generator=g)
    return [true + noise * torch.randn(SHAPE, generator=g) for _ in range(n)]


def test_the_median_of_an_even_number_is_the_mean_of_the_middle_two():
    assert float(median(torch.tensor([4.0, 1.0, 3.0]))) == 3.0
    assert float(median(torch.tensor([4.0, 1.0, 3.0, 10.0]))) == 3.5
    assert torch.equal(median(torch.tensor([[0.0, 5.0], [2.0, 1.0]])), torch.tensor([1.0, 3.0]))


def test_every_rule_is_the_mean_of_identical_contributions():
    same = [torch.full(SHAPE, 2.5)] * 4
    for rule in AGGREGATIONS:
        assert torch.allclose(reduce_parts(same, [1.0] * 4, rule), same[0]), rule


def test_with_all_members_honest_centered_clip_is_close_to_the_mean():
    parts = honest(4)
    mean = torch.stack(parts).mean(0)
    clipped = reduce_parts(parts, [1.0] * 4, "centered_clip")
    # far closer to the mean than any member is: the rule keeps what averaging is for
    assert (clipped - mean).norm() < 0.1 * min((p - mean).norm() for p in parts)


@pytest.mark.parametrize("rule", ["centered_clip", "trimmed_mean", "median"])
@pytest.mark.parametrize("attack", ["scaled", "flipped", "far"])
def test_one_liar_in_four_moves_a_robust_rule_little_and_the_mean_a_lot(rule, attack):
    parts = honest(3)
    truth = torch.stack(parts).mean(0)
    liar = {"scaled": parts[0] * 1000, "flipped": -50 * truth, "far": truth + 1e3}[attack]
    members = [*parts, liar]
    robust_error = (reduce_parts(members, [1.0] * 4, rule) - truth).norm()
    mean_error = (reduce_parts(members, [1.0] * 4, "mean") - truth).norm()
    spread = max((p - truth).norm() for p in parts)  # how far honest members already are from their mean
    assert robust_error < spread, (rule, attack, robust_error, spread)
    assert mean_error > 10 * spread


def test_a_claimed_huge_weight_counts_as_the_median_weight():
    parts = [torch.zeros(SHAPE), torch.zeros(SHAPE), torch.ones(SHAPE)]
    assert torch.allclose(reduce_parts(parts, [1.0, 1.0, 1e9], "mean"), torch.full(SHAPE, 1 / 3))


def test_the_checks_refuse_what_cannot_be_averaged():
    parts = honest(4)
    bad = {
        "shape": torch.zeros(999),
        "dtype": torch.zeros(SHAPE, dtype=torch.int64),
        "nan": torch.full(SHAPE, float("nan")),
        "inf": parts[0].clone().index_fill_(0, torch.tensor([7]), float("inf")),
        "norm": parts[0] * (NORM_BOUND * 2),
    }
    for name, part in bad.items():
        kept, refused = check_contributions([*parts, part], [1.0] * 5, SHAPE)
        assert kept == [0, 1, 2, 3] and [r.sender for r in refused] == [4], name
    for weight in (0.0, -1.0, float("nan"), float("inf")):
        kept, refused = check_contributions(parts, [1.0, 1.0, 1.0, weight], SHAPE)
        assert kept == [0, 1, 2] and "weight" in refused[0].reason
    # an even number: the bound comes from the lower middle norm, so two huge copies cannot set it themselves
    assert check_contributions([parts[0], parts[0] * 1e6], [1.0, 1.0], SHAPE)[0] == [0]
    assert check_contributions([parts[0], parts[1], parts[0] * 1e6, parts[1] * 1e6], [1.0] * 4, SHAPE)[0] == [0, 1]


def test_a_member_refuses_an_average_far_off_its_own_values():
    big, small = torch.full((100,), 3.0), torch.zeros(4)  # an own tensor of zeros: bounded by its share of the whole
    bound = AverageBound([big, small])
    assert bound.refusal(0, big * 9) == "" and bound.refusal(1, torch.full((4,), 5.0)) == ""
    assert "beyond 10×" in bound.refusal(0, big * 11) and "beyond" in bound.refusal(1, torch.full((4,), 40.0))
    assert "not finite" in bound.refusal(0, big.clone().index_fill_(0, torch.tensor([3]), float("nan")))
    assert AverageBound([torch.zeros(4)]).refusal(0, torch.full((4,), 1e9)) == ""  # nothing to measure against


def test_a_member_outnumbered_by_liars_keeps_its_own_values(tmp_path):
    """Two liars in a group of three set every aggregator's bound and median themselves, so the average is theirs:
    the honest member refuses it, says so, and ends the round with its own values (a real round)."""
    from test_group_rounds import Rounds, average_once

    log = logging.FileHandler(tmp_path / "averagers.log")  # the averagers log in processes forked with it
    logging.getLogger("p2ptrain.train.robust").addHandler(log)
    try:
        h = honest(1)[0]
        results = average_once(Rounds, [h, h * 1000, h * 1000], timeout=8, failing={0})
    finally:
        logging.getLogger("p2ptrain.train.robust").removeHandler(log)
    assert torch.equal(results[0], h)
    assert float(results[1].norm()) > 500 * float(h.norm())  # what the liars made of the round
    said = (tmp_path / "averagers.log").read_text()
    assert "Refused an averaging round with" in said and "keeping this peer's values" in said, said[-2000:]


def test_the_reducer_answers_every_sender_with_the_checked_reduction(caplog):
    """hivemind's runner calls accumulate_part once per sender and part, concurrently; each gets the part's result."""
    parts = honest(4)
    liar = torch.full(SHAPE, float("nan"))

    async def round_() -> list[list[torch.Tensor]]:
        reducer = RobustPartReducer([SHAPE, SHAPE], ["QmA", "QmB", "QmC", "QmLiar"], "centered_clip", "g1")
        senders = [*parts[:3], liar]

        async def send(i: int) -> list[torch.Tensor]:
            return [await reducer.accumulate_part(i, k, senders[i] + k) for k in range(2)]

        results = await asyncio.wait_for(asyncio.gather(*(send(i) for i in range(4))), 10)
        assert reducer.finished.is_set() and set(reducer.refused) == {3}
        return results

    with caplog.at_level(logging.WARNING):
        results = asyncio.run(round_())
    expected = reduce_parts(parts[:3], [1.0] * 3, "centered_clip")
    for answers in results:  # the liar, too, gets the average: it is a member, only its data is left out
        assert torch.allclose(answers[0], expected) and torch.allclose(answers[1], expected + 1)
    assert "refused the contribution of peer QmLiar to part 0 (non-finite values" in caplog.text


def test_a_sender_that_fails_mid_round_is_no_longer_waited_for():
    async def round_() -> torch.Tensor:
        reducer = RobustPartReducer([SHAPE], ["QmA", "QmB", "QmGone"], "median", "g2")
        waiting = [asyncio.ensure_future(reducer.accumulate_part(i, 0, torch.full(SHAPE, float(i)))) for i in (0, 1)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiting)
        reducer.on_sender_failed(2)  # what hivemind's runner does when a sender times out
        first, second = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert torch.equal(first, second)
        return first

    assert torch.allclose(asyncio.run(round_()), torch.full(SHAPE, 0.5))


@pytest.mark.parametrize(("liar", "rule"), [("shifted", "centered_clip"), ("nan", "centered_clip"), ("nan", "mean")])
def test_a_compressed_sparse_round_leaves_the_liar_out(liar, rule):
    """A real round of the local mode's averager (random-k at half the coordinates, int8 on the wire), 4 members,
    one of them lying: every member ends with the honest members' values, not the liar's. The shifted liar passes
    every check (its norm is 3× the others'): only the rule bounds it (the plain mean would be off by 1)."""
    from functools import partial

    from test_group_rounds import average_once

    from p2ptrain.train.averaging import PseudoGradientAverager
    from p2ptrain.train.codecs import Level

    parts = honest(3, noise=0.1)
    lie = parts[0] + 4.0 if liar == "shifted" else torch.full(SHAPE, float("nan"))
    averager = partial(PseudoGradientAverager, level=Level("int8", 0.5), budget=1.0, aggregation=rule)
    results = average_once(averager, [*parts, lie])
    honest_mean = torch.stack(parts).mean(0)
    sent = results[0] != 0  # the shared random-k coordinates; the rest come back as 0
    assert 0.3 < sent.float().mean() < 0.5
    for result in results:
        assert torch.equal(result, results[0])  # one average for all, the liar included
    error = (results[0][sent] - honest_mean[sent]).abs().mean()
    assert error < 0.1, error  # int8 rounding of values about ±3, and the spread of honest members (0.1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_repeated_refusals_ban_a_peer_for_a_cooling_off_time(caplog):
    clock = Clock()
    bans = Bans(strikes=3, window_s=100, cooling_off_s=50, clock=clock)
    assert not bans.strike("QmLiar", b"r1", "nan")
    assert not bans.strike("QmLiar", b"r1", "nan")  # several refused parts of one round are one strike
    clock.now = 10
    assert not bans.strike("QmLiar", b"r2", "nan")
    assert not bans.banned("QmLiar")
    clock.now = 20
    with caplog.at_level(logging.WARNING):
        assert bans.strike("QmLiar", b"r3", "norm 847, beyond 10× the members' median")
    assert bans.banned("QmLiar") and not bans.banned("QmHonest")
    assert "Banned peer QmLiar for 50 s: its contributions were refused in 3 rounds" in caplog.text
    clock.now = 71  # cooling-off over: welcome back, with a clean record
    assert not bans.banned("QmLiar")
    assert not bans.strike("QmLiar", b"r4", "nan")


def test_strikes_spread_wider_than_the_window_do_not_ban():
    clock = Clock()
    bans = Bans(strikes=2, window_s=100, cooling_off_s=50, clock=clock)
    for i in range(5):
        clock.now = i * 150.0
        assert not bans.strike("QmSometimes", bytes([i]), "nan")


def test_a_banned_sender_is_left_out_unchecked():
    bans = Bans(strikes=1, cooling_off_s=60)
    bans.strike("QmLiar", b"earlier", "nan")

    async def round_() -> torch.Tensor:
        reducer = RobustPartReducer([SHAPE], ["QmA", "QmB", "QmLiar"], "mean", "g3", bans, b"now")
        assert reducer.refused == {2: "banned"}
        sent = [torch.zeros(SHAPE), torch.full(SHAPE, 2.0), torch.full(SHAPE, 5.0)]  # the liar's passes the checks
        answers = await asyncio.wait_for(
            asyncio.gather(*(reducer.accumulate_part(i, 0, sent[i]) for i in range(3))), 10
        )
        return answers[0]

    assert torch.allclose(asyncio.run(round_()), torch.full(SHAPE, 1.0))


@pytest.mark.slow(alone=False)  # in-process averagers on a small vector, no training
def test_a_banned_liar_is_left_out_even_when_its_copy_would_pass():
    """Real averagers, 3 honest and a liar (behind a symmetric NAT, so it aggregates nothing and every part is
    judged by an honest member). The liar sends NaN for 2 rounds, is refused, and banned; then it sends copies that
    pass every check (the others' values + 0.5): the honest leaders no longer let it join, and where it is still in
    a group its copy is left out, so the honest members get their own mean (with the liar's copy in it, the result
    would be 0.1 or more off)."""
    from hivemind.compression import Float16Compression
    from test_group_rounds import Rounds

    size = 3 * 2**18  # hivemind's parts are 2**19 bytes, 2**18 fp16 values: one part per honest member
    dhts = loopback_dhts(4)
    averagers = [
        Rounds([torch.zeros(size)], dht=dht, prefix="bans", target_group_size=4, min_matchmaking_time=1.0,
               request_timeout=0.5, allreduce_timeout=10.0, next_chunk_timeout=3.0, compression=Float16Compression(),
               bans=Bans(strikes=2, cooling_off_s=600), reach_kind="symmetric-nat" if i == 3 else "direct",
               start=True)
        for i, dht in enumerate(dhts)
    ]  # fmt: skip
    checked_after_ban, group_sizes = 0, []
    try:
        for round_ in range(6):
            values = [torch.randn(size, generator=torch.Generator().manual_seed(round_ * 4 + i)) for i in range(3)]
            mean = torch.stack(values).mean(0)
            lie = torch.full((size,), float("nan")) if round_ < 2 else values[0] + 0.5
            for averager, value in zip(averagers, [*values, lie], strict=True):
                with averager.get_tensors() as (tensor,):
                    tensor.copy_(value)
            controls = [a.step(wait=False, timeout=15 if i < 3 else 6) for i, a in enumerate(averagers)]
            sizes = []
            for control in controls[:3]:
                try:
                    sizes.append(len(control.result(timeout=30)))
                except Exception:  # noqa: BLE001 - a failed round: the member keeps its values
                    sizes.append(None)
            with contextlib.suppress(Exception):
                controls[3].result(timeout=30)
            group_sizes.append(sizes)
            if round_ >= 2 and None not in sizes and min(sizes) >= 3:  # the three honest members in one group
                for averager in averagers[:3]:
                    with averager.get_tensors() as (tensor,):
                        assert (tensor - mean).abs().mean() < 0.01, group_sizes  # fp16 of values about ±3
                checked_after_ban += 1
        assert checked_after_ban >= 2, group_sizes
        assert any(4 in sizes for sizes in group_sizes[:2]), group_sizes  # the liar took part before its ban
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
