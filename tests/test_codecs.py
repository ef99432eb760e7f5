"""Codecs round-trip within their error bounds; error feedback loses nothing; every member picks the same level."""

from __future__ import annotations

import random

import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ptrain.train.averaging import payload_bytes
from p2ptrain.train.codecs import DENSE, LADDER, MAX_PART_BYTES, Level, densify, part_size, shared_indices, sparsify_
from p2ptrain.train.policy import RoundReport, choose_level


@pytest.mark.parametrize(
    "codec, bound",
    [("none", 0.0), ("fp16", 1e-3), ("int8", 0.03)],  # relative RMS error
)
def test_dense_codecs_round_trip_within_their_bounds(codec, bound):
    x = torch.randn(100_000) * 3
    wire = DENSE[codec]().compress(x, CompressionInfo.from_tensor(x))
    y = deserialize_torch_tensor(wire)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float((y - x).norm()) <= bound * float(x.norm())
    assert len(wire.buffer) <= Level(codec).bytes_for(x.numel()) * 1.01 + 4096  # bytes as the policy assumes


def test_int8_decoder_refuses_malformed_input():
    x = torch.randn(1000)
    wire = DENSE["int8"]().compress(x, CompressionInfo.from_tensor(x))
    wire.buffer = wire.buffer[:-1]
    with pytest.raises(ValueError, match="does not match"):
        deserialize_torch_tensor(wire)
    wire.buffer = (17).to_bytes(8, "little") + wire.buffer[8:]
    with pytest.raises(ValueError, match="codebook"):
        deserialize_torch_tensor(wire)


def test_shared_indices_are_deterministic_sorted_unique_and_about_the_ratio():
    a = shared_indices(b"group-1", 1_000_000, 0.01)
    assert torch.equal(a, shared_indices(b"group-1", 1_000_000, 0.01))  # every member derives the same mask
    assert not torch.equal(a, shared_indices(b"group-2", 1_000_000, 0.01))  # a new group, new coordinates
    assert torch.all(a[1:] > a[:-1]) and 0 <= int(a[0]) and int(a[-1]) < 1_000_000
    assert 0.0099 * 1_000_000 < len(a) <= 0.01 * 1_000_000


@settings(max_examples=40, deadline=None)
@given(
    rounds=st.lists(st.integers(0, 2**31), min_size=1, max_size=8),
    ratio=st.sampled_from([0.01, 0.1, 0.5]),
    numel=st.integers(1, 2000),
)
def test_error_feedback_keeps_everything_not_yet_sent(rounds, ratio, numel):
    """Σ inputs = Σ sent (densified) + residual, after any sequence of rounds."""
    residual = torch.zeros(numel, dtype=torch.float64)
    total_in = torch.zeros(numel, dtype=torch.float64)
    total_sent = torch.zeros(numel, dtype=torch.float64)
    for seed in rounds:
        flat = torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        indices = shared_indices(seed.to_bytes(8, "little"), numel, ratio)
        values = sparsify_(flat, residual, indices)
        total_in += flat
        total_sent += densify(values, indices, numel)
        assert torch.all(residual[indices] == 0)
    torch.testing.assert_close(total_sent + residual, total_in)


def test_sparse_average_of_a_group_equals_the_average_at_the_shared_coordinates():
    """What the all-reduce computes on the selected values is the true average there."""
    numel, group = 5000, b"group"
    peers = [torch.randn(numel) for _ in range(3)]
    indices = shared_indices(group, numel, 0.1)
    sent = [sparsify_(p, torch.zeros(numel), indices) for p in peers]
    average = densify(sum(sent) / 3, indices, numel)
    torch.testing.assert_close(average[indices], (sum(peers) / 3)[indices])
    assert torch.count_nonzero(average) <= len(indices)


def test_payload_of_a_butterfly_all_reduce():
    assert payload_bytes(Level("fp16"), 1000, 1) == 0
    assert payload_bytes(Level("fp16"), 1000, 2) == 2000  # half out, half back, 2 bytes each
    assert payload_bytes(Level("int8", 0.1), 1000, 4) == pytest.approx(2 * 100 * 3 / 4)


@pytest.mark.parametrize("codec, numel, group", [("int8", 470_528, 4), ("fp16", 470_528, 4), ("int8", 470_528, 8),
                                                  ("none", 5_000_000, 4), ("int8", 124_000_000, 16)])  # fmt: skip
def test_every_member_aggregates_a_share_of_the_vector(codec, numel, group):
    """hivemind gives each member whole parts: with its 512 kB parts gpt2-tiny's vector in int8 was one part, which
    one member aggregated alone (4x payload ÷ link). With ``part_size`` every member gets its share, within a part."""
    vector = torch.zeros(numel)
    compression = DENSE[codec]()
    info = (CompressionInfo.from_tensor(vector, key=0),)
    size = part_size(Level(codec).bytes_for(numel), group)
    container = TensorPartContainer([vector], [1.0] * group, compression=compression, part_size_bytes=size,
                                    tensor_infos=info)  # fmt: skip
    parts = container.num_parts_by_peer
    assert min(parts) >= 1 and max(parts) - min(parts) <= 1, parts
    assert size <= MAX_PART_BYTES
    if codec == "int8" and numel == 470_528:  # what hivemind's own size did to it
        default = TensorPartContainer([vector], [1.0] * group, compression=compression, tensor_infos=info)
        assert sorted(default.num_parts_by_peer) == [0] * (group - 1) + [1]


# -- the adaptive policy ----------------------------------------------------------------------------

N = 10_000_000  # coordinates (bytes scale linearly; only ratios matter)


def test_no_history_starts_at_the_most_compressed_level():
    assert choose_level([None, RoundReport(None, 0.0, 2.0)], N, 0.5) == len(LADDER) - 1


def test_a_fast_link_is_probed_two_levels_at_a_time():
    report = RoundReport(level=5, round_s=0.01, compute_s=2.0)
    assert choose_level([report, report], N, 0.5) == 3
    slow_enough = RoundReport(level=5, round_s=0.3, compute_s=2.0)
    assert choose_level([slow_enough], N, 0.5) == 4  # 0.3 s x 2 = 0.6 s fits in 1 s; x 5 = 1.5 s does not


def test_a_level_near_the_limit_is_kept_rather_than_toggled():
    near = RoundReport(level=4, round_s=0.39, compute_s=2.0)  # level 3 (2.5x the bytes): 0.98 s of 1 s allowed
    assert choose_level([near], N, 0.5) == 4
    assert choose_level([RoundReport(level=4, round_s=0.27, compute_s=2.0)], N, 0.5) == 3  # 0.68 s: loosen
    over = RoundReport(level=4, round_s=1.2, compute_s=2.0)  # the current level no longer fits: tighten
    assert choose_level([over], N, 0.5) == 5


def test_a_slower_link_is_followed_at_once():
    # last round at level 1 (int8 dense) took 8 s; 1 s is allowed → must shrink ~8x: level 4 (10%)
    report = RoundReport(level=1, round_s=8.0, compute_s=2.0)
    level = choose_level([report], N, 0.5)
    assert LADDER[level].bytes_for(N) * 8.0 / LADDER[1].bytes_for(N) <= 1.0
    assert LADDER[level - 1].bytes_for(N) * 8.0 / LADDER[1].bytes_for(N) > 1.0


def test_the_slowest_member_decides():
    fast, slow = RoundReport(3, 0.1, 2.0), RoundReport(3, 4.0, 2.0)
    assert choose_level([fast, slow], N, 0.5) > choose_level([fast, fast], N, 0.5)


def test_every_member_derives_the_same_level_from_the_same_reports():
    rng = random.Random(7)
    for _ in range(200):
        reports = [
            RoundReport(rng.choice([None, *range(len(LADDER))]), rng.uniform(0, 5), rng.uniform(0, 5))
            for _ in range(rng.randint(1, 6))
        ]
        wire = [r.to_wire() for r in reports]
        decisions = {choose_level([RoundReport.from_wire(w) for w in wire], N, 0.5) for _member in reports}
        assert len(decisions) == 1


@pytest.mark.parametrize(
    "raw",
    [
        None,
        [],
        {"level": 99, "round_s": 1.0, "compute_s": 1.0},
        {"level": 1, "round_s": float("nan"), "compute_s": 1},
        {"level": 1, "round_s": -1.0, "compute_s": 1.0},
        {"level": "1", "round_s": 1.0, "compute_s": 1.0},
        {"level": 1, "round_s": 1e12, "compute_s": 1.0},
    ],
)
def test_malformed_reports_count_as_no_history(raw):
    assert RoundReport.from_wire(raw) is None


def test_time_that_bytes_do_not_buy_is_not_scaled_with_the_payload():
    # 0.9 s rounds of which 0.85 s is the floor (latency, scheduling): bigger payloads cost little more
    with_floor = RoundReport(level=5, round_s=0.9, compute_s=4.0, floor_s=0.85)
    without = RoundReport(level=5, round_s=0.9, compute_s=4.0)
    assert choose_level([with_floor], N, 0.5) == 3 < choose_level([without], N, 0.5)
    assert RoundReport.from_wire(with_floor.to_wire()) == with_floor
