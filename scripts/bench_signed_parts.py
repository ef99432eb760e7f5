"""What signing every averaged part costs (``train/signed_parts.py``), beside the work each part costs anyway.

Per part (one hivemind part: 2**18 fp16 values, 512 KiB), the time to sign it (the sender) and check it (the
aggregator) beside hivemind's own fp16 encode + decode of the same part, which every round does anyway: the ratio is
what signing adds to a round's CPU work. Prints a Markdown table.

    .venv/bin/python scripts/bench_signed_parts.py [--repeats 100]
"""

from __future__ import annotations

import argparse
import time

import torch
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from p2ptrain.train.signed_parts import PartSigner, part_digest, read_cert, read_stamp, verify


def per_part(repeats: int = 100) -> tuple[float, float]:
    """(fp16 encode + decode, sign + check) seconds per 512 KiB part."""
    signer = PartSigner(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    values = torch.randn(2**18)
    start = time.perf_counter()
    for _ in range(repeats):
        part = serialize_torch_tensor(values, runtime_pb2.CompressionType.FLOAT16)
        deserialize_torch_tensor(part)
    codec = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for i in range(repeats):
        stamp = signer.stamp(part_digest("p", b"g" * 32, b"a" * 38, i, part), with_cert=i == 0)
        _, signature = read_stamp(stamp)
        _, key = read_cert(signer.cert)
        verify(key, signature, part_digest("p", b"g" * 32, b"a" * 38, i, part))
    return codec, (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100, help="parts signed and checked per measurement")
    args = parser.parse_args()
    codec, signing = per_part(args.repeats)
    print("| per 512 KiB part (2**18 fp16 values) | ms | × hivemind's encode + decode |")
    print("|---|---|---|")
    print(f"| hivemind: fp16 encode + decode | {codec * 1e3:.2f} | 1.00 |")
    print(f"| p2ptrain: sign + check | {signing * 1e3:.2f} | {signing / codec:.2f} |")


if __name__ == "__main__":
    main()
