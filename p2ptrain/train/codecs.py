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
from dataclasses import dataclass

import numpy as np
import torch
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization
from hivemind.proto import runtime_pb2

from p2ptrain.compat.hivemind import register_codec


class Int8Compression(Uniform8BitQuantization):
    """hivemind's uniform 8-bit quantization with a decoder that works on numpy 2 and checks its input.

    hivemind 1.1.12 decodes with ``int(np.frombuffer(..., count=1))``, a TypeError on numpy ≥ 2.4, and
    trusts the sender's codebook size. Same wire format: int64 codebook size, float32 codebook, uint8 codes.
    """

    def extract(self, serialized_tensor: runtime_pb2.Tensor) -> torch.Tensor:
        buffer, shape = serialized_tensor.buffer, tuple(serialized_tensor.size)
        numel = math.prod(shape)
        if len(buffer) < 8 or int(np.frombuffer(buffer, count=1, dtype=np.int64)[0]) != self.n_bins:
            raise ValueError("int8 tensor with a malformed codebook")
        if len(buffer) != 8 + 4 * self.n_bins + numel or serialized_tensor.dtype not in ("float32", "float16"):
            raise ValueError(f"int8 tensor of {len(buffer)} bytes does not match its shape {shape}")
        codebook = torch.from_numpy(np.frombuffer(buffer, offset=8, count=self.n_bins, dtype=np.float32).copy())
        codes = torch.from_numpy(np.frombuffer(buffer, offset=8 + 4 * self.n_bins, dtype=np.uint8).astype(np.int64))
        return codebook[codes].reshape(shape).to(getattr(torch, serialized_tensor.dtype))


# Received tensors are decoded by the codec registered for their type, not by the sender's object.
register_codec("UNIFORM_8BIT", Int8Compression())

DENSE: dict[str, type[CompressionBase]] = {
    "none": NoCompression,
    "fp16": Float16Compression,
    "int8": Int8Compression,
}
BYTES_PER_VALUE = {"none": 4.0, "fp16": 2.0, "int8": 1.0}
PARTS_PER_SHARE = 4  # parts in each member's share: it reduces and returns one while the next arrives
MIN_PART_BYTES = 32 * 1024  # smaller parts cost more in messages, signatures and int8 codebooks (1 kB each)
MAX_PART_BYTES = 2**19  # hivemind's own part size


def part_size(vector_bytes: float, group_size: int) -> int:
    """The part size (bytes after the codec) for an all-reduce of ``vector_bytes`` among ``group_size`` members.

    hivemind cuts the vector into parts of a fixed size (512 kB) and gives each member whole parts: a vector under
    two parts per member leaves some members nothing to aggregate, and one under a part (gpt2-tiny's in int8,
    470 kB) is aggregated by one member alone, whose link then carries the whole group's traffic (a round took 4x
    payload ÷ link). Parts of a quarter of a share spread the vector evenly and let each aggregator pipeline."""
    per_part = vector_bytes / (max(group_size, 1) * PARTS_PER_SHARE)
    return int(min(MAX_PART_BYTES, max(MIN_PART_BYTES, per_part)))


@dataclass(frozen=True)
class Level:
    """One rung of the compression ladder: a dense codec applied to a ``ratio`` of the coordinates."""

    codec: str  # a key of DENSE
    ratio: float = 1.0  # 1.0 = dense; else the random-k fraction

    def bytes_for(self, numel: int) -> float:
        return BYTES_PER_VALUE[self.codec] * selected_count(numel, self.ratio)

    def describe(self) -> str:
        return self.codec if self.ratio >= 1.0 else f"{self.codec} random-{self.ratio:g}"


# From least to most compressed; each rung roughly halves the bytes of the one before.
LADDER: tuple[Level, ...] = (
    Level("fp16"),
    Level("int8"),
    Level("int8", 0.5),
    Level("int8", 0.25),
    Level("int8", 0.1),
    Level("int8", 0.05),
    Level("int8", 0.02),
    Level("int8", 0.01),
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


def densify(values: torch.Tensor, indices: torch.Tensor, numel: int) -> torch.Tensor:
    out = torch.zeros(numel, dtype=values.dtype)
    out[indices] = values
    return out
