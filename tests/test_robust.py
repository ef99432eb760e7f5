"""Robust aggregation of a part (train/robust.py): the checks, the rules, and the reducer in a real round."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from p2ptrain.train.robust import AGGREGATIONS, NORM_BOUND, RobustPartReducer, check_contributions, reduce_parts

SHAPE = torch.Size([1000])


def honest(n: int, seed: int = 0, noise: float = 1.0) -> list[torch.Tensor]:
    """``n`` noisy copies of one true vector (what honest members' gradients look like)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(SHAPE, generator=g)
    return [true + noise * torch.randn(SHAPE, generator=g) for _ in range(n)]


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
    # two members: nobody can say which one is off, so the norm is not judged
    assert check_contributions([parts[0], parts[0] * 1e6], [1.0, 1.0], SHAPE)[0] == [0, 1]


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
