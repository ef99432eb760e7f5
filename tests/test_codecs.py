"""Codecs round-trip within their error bounds; error feedback loses nothing; every member picks the same level."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionInfo, Uniform8BitQuantization, deserialize_torch_tensor
from hivemind.proto import runtime_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from p2ptrain.swarm.manifest import COMPRESSIONS, AveragingSpec
from p2ptrain.train.averaging import payload_bytes
from p2ptrain.train.codecs import (
    DENSE,
    LADDER,
    MAX_PART_BYTES,
    Level,
    codec_loss,
    densify,
    pack,
    part_size,
    shared_indices,
    sparsify_,
    unpack,
)
from p2ptrain.train.optimizers import fixed_level, manifest_codec
from p2ptrain.train.policy import RoundReport, choose_level


@pytest.mark.parametrize(
    "codec, bound",
    [("none", 0.0), ("fp16", 1e-3), ("int8", 0.03), ("int4", 0.11), ("int2", 0.36)],  # relative RMS error
)
def test_dense_codecs_round_trip_within_their_bounds(codec, bound):
    x = torch.randn(100_000) * 3
    wire = DENSE[codec]().compress(x, CompressionInfo.from_tensor(x))
    y = deserialize_torch_tensor(wire)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert float((y - x).norm()) <= bound * float(x.norm())
    assert len(wire.buffer) <= Level(codec).bytes_for(x.numel()) * 1.01 + 4096  # bytes as the policy assumes


@pytest.mark.parametrize("codec", ["int8", "int4", "int2"])
def test_quantized_decoder_refuses_malformed_input(codec):
    x = torch.randn(1001)
    wire = DENSE[codec]().compress(x, CompressionInfo.from_tensor(x))
    wire.buffer = wire.buffer[:-1]
    with pytest.raises(ValueError, match="does not match"):
        deserialize_torch_tensor(wire)
    wire.buffer = (17).to_bytes(8, "little") + wire.buffer[8:]
    with pytest.raises(ValueError, match="codebook"):
        deserialize_torch_tensor(wire)


def test_int8_is_hiveminds_uniform_8bit_byte_for_byte():
    x = torch.randn(3000) * 2 + 0.5
    ours = DENSE["int8"]().compress(x, CompressionInfo.from_tensor(x))
    assert ours.buffer == Uniform8BitQuantization().compress(x, CompressionInfo.from_tensor(x)).buffer
    assert ours.compression == runtime_pb2.UNIFORM_8BIT


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([8, 4, 2]), codes=st.lists(st.integers(0, 255), max_size=50))
def test_codes_pack_and_unpack_to_themselves(bits, codes):
    codes = np.asarray([c % 2**bits for c in codes], dtype=np.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == -(-codes.size * bits // 8)
    assert np.array_equal(unpack(packed, bits, codes.size), codes)


def test_two_bit_bins_are_symmetric_and_keep_the_mean():
    """Mid-rise bins: a symmetric input gets a symmetric codebook; the bucket means keep the part's mean."""
    x = torch.randn(100_000)
    x = torch.cat([x, -x])
    wire = DENSE["int2"]().compress(x, CompressionInfo.from_tensor(x))
    codebook = np.frombuffer(wire.buffer, offset=8, count=4, dtype=np.float32)
    np.testing.assert_allclose(codebook, -codebook[::-1], atol=1e-3)
    assert abs(float(deserialize_torch_tensor(wire).mean() - x.mean())) < 1e-4


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
                                                  ("none", 5_000_000, 4), ("int8", 124_000_000, 16),
                                                  ("int4", 470_528, 4), ("int2", 470_528, 8)])  # fmt: skip
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


@pytest.mark.parametrize("codec", ["int8", "int4", "int2"])
def test_codec_loss_is_what_hiveminds_parts_lose_on_the_wire(codec):
    """``codec_loss`` against the bytes hivemind's own part container sends to each aggregator: the values minus
    the loss are what the aggregators decode, exactly; the parts this member aggregates lose nothing."""
    torch.manual_seed(1)
    values, fractions, own = torch.randn(300_000), [1.0, 0.0, 2.0, 1.0], 2
    compression, size = DENSE[codec](), part_size(Level(codec).bytes_for(300_000), 4)
    lost = codec_loss(values, fractions, compression, size, own)

    async def decoded_by_each_aggregator() -> list[torch.Tensor]:
        info = (CompressionInfo.from_tensor(values, key=0),)
        container = TensorPartContainer([values], fractions, compression=compression, part_size_bytes=size,
                                        tensor_infos=info)  # fmt: skip
        out = []
        for member in range(len(fractions)):
            async for wire in container.iterate_input_parts_for(member):
                decoded = deserialize_torch_tensor(wire)
                out.append(torch.zeros_like(decoded) if member == own else decoded)
        return out

    parts = asyncio.run(decoded_by_each_aggregator())
    received = torch.cat(parts)
    own_parts = lost == 0
    assert 0.4 < float(own_parts.float().mean()) < 0.6  # fractions: this member aggregates half the vector
    torch.testing.assert_close((values - lost)[~own_parts], received[~own_parts], rtol=0, atol=1e-6)
    assert float(lost[~own_parts].norm()) > 0


@pytest.mark.parametrize("codec", ["int4", "int2"])
def test_a_round_hands_each_member_what_the_codec_took_from_it(codec):
    """Three real averagers, 4- or 2-bit values, one member behind a symmetric NAT (it aggregates nothing). Each
    member's feedback is 0 on the parts it aggregated, and what the aggregators decoded (values − feedback)
    averages, through the codec once more on the way back, to the round's result: the same bits for every member."""
    from test_group_rounds import average_once

    from p2ptrain.train.averaging import PseudoGradientAverager

    torch.manual_seed(2)
    vectors, feedback = [torch.randn(50_000) for _ in range(3)], []

    def averager(tensors, **kwargs):
        feedback.append([torch.zeros_like(t).share_memory_() for t in tensors])
        own = feedback[-1]
        return PseudoGradientAverager(tensors, level=Level(codec), budget=1, aggregation="mean", feedback=own, **kwargs)

    results = average_once(averager, vectors, kinds=["direct", "direct", "symmetric-nat"])
    lost = [f[0] for f in feedback]
    assert float((lost[2] == 0).float().mean()) < 0.01  # it aggregated nothing: every part went through the codec
    for member in (0, 1):
        assert 0.3 < float((lost[member] == 0).float().mean()) < 0.7  # about half the vector is its own share
    decoded_mean = torch.stack([v - f for v, f in zip(vectors, lost, strict=True)]).mean(0)
    size = part_size(Level(codec).bytes_for(50_000), 3)
    expected = decoded_mean - codec_loss(decoded_mean, [1.0], DENSE[codec](), size, own=-1)
    for result in results:  # the same bits for all, whoever aggregated the part
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-5)


def test_every_rung_of_the_ladder_can_be_a_swarms_fixed_codec():
    """bench_wan compares the adaptive policy with each rung it chooses from, run as a fixed codec."""
    for level in LADDER:
        compression, sparsity = manifest_codec(level)
        spec = AveragingSpec(compression=compression, sparsity=sparsity or 0.1, mode="local")
        assert compression in COMPRESSIONS and fixed_level(spec) == level, (compression, level)
    assert fixed_level(AveragingSpec(compression="randk-int4", sparsity=0.3)) == Level("int4", 0.3)
