"""Shared test helpers: a signing key and a valid manifest for gpt2-tiny."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2ptrain.manifest import SwarmManifest, new_manifest


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture
def manifest(key) -> SwarmManifest:
    return new_manifest(
        key,
        run_id="test-run",
        model="gpt2-tiny",
        dataset="default",
        tokenizer="bytes",
        seq_len=32,
        target_batch_size=16,
        created_at=1_790_000_000,
    )
