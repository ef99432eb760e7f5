"""What goes on the wire when peers average: dense codecs (hivemind's) and shared-mask random-k sparsity.

Dense codecs are hivemind ``CompressionBase`` objects applied to every part of the all-reduce:
``none`` (fp32), ``fp16``, ``int8`` (hivemind's ``Uniform8BitQuantization``: 256 uniform bins).

Random-k keeps a fraction ``ratio`` of the coordinates. Every member of a group draws the *same*
coordinates from a seed they all know (the group id), so the selected values form an ordinary dense
vector that hivemind's partitioned all-reduce averages as usual, and no indices travel. What a peer
did not send stays in its error-feedback residual and is sent in a later round, so nothing is lost,
only delayed (protocols/averaging.md).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import (
    CompressionBase,
    CompressionInfo,
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
)
from hivemind.compression.quantization import average_buckets
from hivemind.proto import runtime_pb2

from p2ptrain.compat.hivemind import register_codec


class UniformQuantization(Uniform8BitQuantization):
    """Uniform quantization with ``bits`` = 8, 4 or 2 per value, in hivemind's uniform 8-bit wire format: int64
    codebook size (256, 16, 4), float32 codebook (the mean of the values in each bin), then the codes, packed
    little-end first (code ``j`` in bits ``(j % per_byte) * bits`` of byte ``j // per_byte``).

    hivemind picks the decoder by the tensor's ``CompressionType``, and an aggregator answers a part with the codec
    registered for the part's type, so each width has a type of its own (``WIRE_TYPES``): 8 bits are hivemind's
    ``UNIFORM_8BIT`` byte for byte, quantized as hivemind does (bins of ``6 σ / 256`` around the mean); 4 and 2
    bits take the types of two hivemind codecs p2ptrain never uses (quantile and blockwise 8-bit), in every
    process that imports this module. They use mid-rise bins (none centred on the mean, so 4 bins are symmetric)
    spanning ``SPAN_IN_SIGMAS[bits]`` standard deviations, outliers in the end bins. The decoder checks the sizes
    (hivemind 1.1.12's trusts the codebook size and fails on numpy ≥ 2.4).
    """

    SPAN_IN_SIGMAS = {8: 6.0, 4: 5.4, 2: 4.0}  # 8: hivemind's RANGE_IN_SIGMAS

    def __init__(self, bits: int = 8):
        if bits not in WIRE_TYPES:
            raise ValueError(f"{bits}-bit codes are not supported")
        self.bits, self.compression_type = bits, runtime_pb2.CompressionType.Value(WIRE_TYPES[bits])

    @property
    def n_bits(self) -> int:
        return self.bits

    def quantize(self, tensor: torch.Tensor, allow_inplace: bool = False) -> tuple[np.ndarray, np.ndarray]:
        if self.bits == 8:
            return super().quantize(tensor, allow_inplace)
        values = tensor.detach().reshape(-1).float()
        centered = values - values.mean()
        scale = self.SPAN_IN_SIGMAS[self.bits] * float(centered.norm()) / math.sqrt(max(values.numel() - 1, 1))
        scale = scale / self.n_bins if scale > 0 else 1.0
        codes = torch.clamp(torch.floor(centered / scale) + self.n_bins // 2, 0, self.n_bins - 1).to(torch.uint8)
        codebook = average_buckets(values, codes, self.n_bins)
        return pack(codes.numpy(), self.bits), np.asarray(codebook, dtype=np.float32)

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer, shape = serialized_tensor.buffer, tuple(serialized_tensor.size)
        numel = math.prod(shape)
        n_bins, bits = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0]) if len(buffer) >= 8 else 0, self.bits
        if n_bins != self.n_bins:
            raise ValueError(f"{bits}-bit tensor with a malformed codebook")
        if len(buffer) != 8 + 4 * n_bins + packed_size(numel, bits) or serialized_tensor.dtype not in FLOATS:
            raise ValueError(f"{bits}-bit tensor of {len(buffer)} bytes does not match its shape {shape}")
        codebook = torch.from_numpy(np.frombuffer(buffer, offset=8, count=n_bins, dtype=np.float32).copy())
        codes = unpack(np.frombuffer(buffer, offset=8 + 4 * n_bins, dtype=np.uint8), bits, numel)
        return (
            codebook[torch.from_numpy(codes.astype(np.int64))]
            .reshape(shape)
            .to(getattr(torch, serialized_tensor.dtype))
        )


FLOATS = ("float32", "float16")


def packed_size(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """uint8 codes below ``2**bits``, ``8 // bits`` to a byte, the first in the lowest bits."""
    per_byte = 8 // bits
    if per_byte == 1:
        return codes.astype(np.uint8, copy=False)
    padded = np.zeros(packed_size(codes.size, bits) * per_byte, dtype=np.uint8)
    padded[: codes.size] = codes
    columns = padded.reshape(-1, per_byte)
    packed = np.zeros(len(columns), dtype=np.uint8)
    for j in range(per_byte):
        packed |= columns[:, j] << np.uint8(j * bits)
    return packed


def unpack(packed: np.ndarray, bits: int, numel: int) -> np.ndarray:
    per_byte = 8 // bits
    if per_byte == 1:
        return packed[:numel]
    shifts = np.arange(per_byte, dtype=np.uint8) * np.uint8(bits)
    return ((packed[:, None] >> shifts) & np.uint8(2**bits - 1)).reshape(-1)[:numel]


WIRE_TYPES = {8: "UNIFORM_8BIT", 4: "QUANTILE_8BIT", 2: "BLOCKWISE_8BIT"}  # bits → runtime_pb2.CompressionType

# Received tensors are decoded, and answered, by the codec registered for their type, not by the sender's object.
for _bits, _type in WIRE_TYPES.items():
    register_codec(_type, UniformQuantization(_bits))

DENSE: dict[str, Callable[[], CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "int8": partial(UniformQuantization, 8),
    "int4": partial(UniformQuantization, 4),
    "int2": partial(UniformQuantization, 2),
}
BYTES_PER_VALUE = {"none": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5, "int2": 0.25}
PARTS_PER_SHARE = 4  # parts in each member's share: it reduces and returns one while the next arrives
MIN_PART_BYTES = 32 * 1024  # smaller parts cost more in messages, signatures and int8 codebooks (1 kB each)
MAX_PART_BYTES = 2**19  # hivemind's own part size
SMALLEST_PART_BYTES = 4096  # below it a part is mostly its message's framing, signature and codebook


def part_size(vector_bytes: float, group_size: int) -> int:
    """The part size (bytes after the codec) for an all-reduce of ``vector_bytes`` among ``group_size`` members.

    hivemind cuts the vector into parts of a fixed size (512 kB) and gives each member whole parts: a vector under
    two parts per member leaves some members nothing to aggregate, and one under a part (gpt2-tiny's in int8,
    470 kB) is aggregated by one member alone, whose link then carries the whole group's traffic (a round took 4x
    payload ÷ link). Parts of a quarter of a share spread the vector evenly and let each aggregator pipeline; they
    are no smaller than ``MIN_PART_BYTES`` unless that would leave a member fewer than two parts (a 4-bit or
    sparse vector), and never under ``SMALLEST_PART_BYTES``."""
    members = max(group_size, 1)
    smallest = max(SMALLEST_PART_BYTES, min(MIN_PART_BYTES, vector_bytes / (2 * members)))
    return int(min(MAX_PART_BYTES, max(smallest, vector_bytes / (members * PARTS_PER_SHARE))))


@dataclass(frozen=True)
class Level:
    """One rung of the compression ladder: a dense codec applied to a ``ratio`` of the coordinates."""

    codec: str  # a key of DENSE
    ratio: float = 1.0  # 1.0 = dense; else the random-k fraction

    def bytes_for(self, numel: int) -> float:
        return BYTES_PER_VALUE[self.codec] * selected_count(numel, self.ratio)

    def describe(self) -> str:
        return self.codec if self.ratio >= 1.0 else f"{self.codec} random-{self.ratio:g}"


# From least to most compressed; each rung roughly halves the bytes of the one before. At 0.1 byte a value and
# below, 2-bit values on 4x the coordinates ended training lower than int8 values on fewer, on every seed
# (bench/codecs.md, bench/codecs-outer-lr-0.35.md; at 0.01 byte 2.81 vs 3.58); at 0.5, int8 on half beat dense
# int4; at 0.25 they tied, and the rung stayed int8.
LADDER: tuple[Level, ...] = (
    Level("fp16"),
    Level("int8"),
    Level("int8", 0.5),
    Level("int8", 0.25),
    Level("int2", 0.4),
    Level("int2", 0.2),
    Level("int2", 0.08),
    Level("int2", 0.04),
)


def selected_count(numel: int, ratio: float) -> int:
    return numel if ratio >= 1.0 else max(1, min(numel, math.ceil(numel * ratio)))


def shared_indices(seed: bytes, numel: int, ratio: float) -> torch.Tensor:
    """Sorted coordinates to send: the same on every machine for the same (seed, numel, ratio).

    Drawn with replacement and deduplicated (cheap even for 10^8 coordinates; slightly fewer than
    ``ratio * numel`` survive). torch's CPU generator is deterministic across platforms.
    """
    generator = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(seed).digest()[:8], "little") >> 1)
    draws = torch.randint(numel, (selected_count(numel, ratio),), generator=generator)
    return torch.unique(draws)  # sorted


def sparsify_(flat: torch.Tensor, residual: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Error feedback: add ``flat`` to ``residual``, take the values at ``indices`` out of it and return them.

    Invariant (tests/test_codecs.py): everything ever added is either returned or still in ``residual``.
    """
    residual.add_(flat)
    values = residual[indices].clone()
    residual[indices] = 0
    return values


def codec_loss(
    values: torch.Tensor, fractions: Sequence[float], codec: CompressionBase, part_bytes: int, own: int
) -> torch.Tensor:
    """What ``codec`` takes from ``values`` on their way to the members that aggregate them: each part minus what
    its aggregator decodes, 0 on the parts this member (index ``own``) aggregates itself, which it uses exact.
    The parts are hivemind's (``TensorPartContainer`` with the all-reduce's fractions, codec and part size), and the
    codecs are deterministic, so this is what the all-reduce will send, byte for byte."""
    info = (CompressionInfo.from_tensor(values, key=0),)
    container = TensorPartContainer([values], fractions, compression=codec, part_size_bytes=part_bytes,
                                    tensor_infos=info)  # fmt: skip
    lost = []
    for member in range(len(fractions)):
        for part in container.get_raw_input_parts(member):
            if member == own:
                lost.append(torch.zeros_like(part))
            else:
                received = deserialize_torch_tensor(codec.compress(part, CompressionInfo.from_tensor(part)))
                lost.append(part - received)
    return torch.cat(lost) if lost else torch.zeros_like(values)


def densify(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.zeros(numel, dtype=values.dtype)
    out[indices] = values
    return out
