"""This machine's persistent keys, kept in the data directory with owner-only permissions.

- ``identity.key``: the libp2p identity hivemind's daemon loads (``-id``); it fixes the peer id, so a
  restarted peer is recognised by the swarm.
- ``author.key``: an Ed25519 key (PKCS#8 PEM) that signs the swarm manifests this machine seeds.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from p2ptrain.errors import ConfigError
from p2ptrain.fileio import atomic_write_bytes


def p2p_identity_path(data_dir: Path) -> Path:
    """Where hivemind keeps the libp2p identity; hivemind generates it on first start."""
    return data_dir / "identity.key"


def author_key(data_dir: Path) -> Ed25519PrivateKey:
    """Load the manifest-signing key, creating it (mode 0600) on first use."""
    path = data_dir / "author.key"
    if path.exists():
        try:
            key = load_pem_private_key(path.read_bytes(), password=None)
        except ValueError as e:
            raise ConfigError(f"cannot read the signing key {path}: {e}. Move it away to create a new one.") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 key. Move it away to create a new one.")
        return key
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    atomic_write_bytes(path, pem, mode=0o600)
    return key


def ensure_private_dir(path: Path) -> Path:
    """Create the data directory readable only by this user."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path
