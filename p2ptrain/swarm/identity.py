"""This machine's persistent keys, kept in the data directory with owner-only permissions.

- ``identity.key``: the libp2p identity hivemind's daemon loads (``-id``); it fixes the peer id, so a
  restarted peer is recognised by the swarm. Its RSA key also signs what this peer publishes under its own peer id
  (``identity_key``, ``PSS``), so that a reader can check it came from that peer.
- ``author.key``: an Ed25519 key (PKCS#8 PEM) that signs the swarm manifests this machine seeds.
- ``peer.lock``: held by the running peer; two peers on one data directory would share a peer id.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2

from p2ptrain.errors import ConfigError
from p2ptrain.fileio import atomic_write_bytes


def p2p_identity_path(data_dir: Path) -> Path:
    """Where hivemind keeps the libp2p identity; hivemind generates it on first start."""
    return data_dir / "identity.key"


def identity_key(data_dir: Path) -> rsa.RSAPrivateKey:
    """This peer's libp2p identity key (``identity.key``: a protobuf PrivateKey holding a DER RSA key)."""
    path = p2p_identity_path(data_dir)
    try:
        der = crypto_pb2.PrivateKey.FromString(path.read_bytes()).data
        key = serialization.load_der_private_key(der, password=None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the identity key {path}: {e}") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigError(f"{path} does not hold an RSA key")
    return key


def public_key_der(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def peer_id_of(public_der: bytes) -> str:
    """The libp2p peer id of an RSA public key (as ``PeerID.from_identity`` computes it)."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_der).SerializeToString()
    return PeerID(b"\x12\x20" + hashlib.sha256(encoded).digest()).to_base58()  # multihash: sha2-256, 32 bytes


PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH)  # what peers sign with


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


def lock_data_dir(data_dir: Path, name: str = "peer.lock", holder: str = "peer") -> IO[str]:
    """Take the data directory for this process (one ``holder`` per dir); keep the returned file open meanwhile.

    The lock file holds the owner's pid, which the error names.
    """
    lock = open(data_dir / name, "a+")  # noqa: SIM115 - held open for the holder's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        owner = lock.read().strip() or "unknown"
        lock.close()
        raise ConfigError(
            f"another p2ptrain {holder} (pid {owner}) is using {data_dir}; stop it, or give this one its own --data-dir"
        ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def ensure_identity(data_dir: Path) -> PeerID:
    """The persistent libp2p identity (generated on first start); the same file gives the same peer id."""
    path = p2p_identity_path(data_dir)
    if not path.exists():
        P2P.generate_identity(str(path))
    return PeerID.from_identity(path.read_bytes())
