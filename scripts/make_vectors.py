"""Regenerate the golden test vectors in protocols/vectors/ with p2ptrain's own encoders.

    python scripts/make_vectors.py

The output is deterministic: a fixed Ed25519 key (the bytes 0..31), a fixed creation time, every
manifest field written out, and Ed25519 signatures are deterministic (RFC 8032), so two runs write
identical files. tests/test_protocol_vectors.py decodes these files; a diff in them after running
this script means the wire format changed, which needs a new version (protocols/README.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.p2p import PeerID

from p2ptrain.errors import P2PTrainError
from p2ptrain.swarm.invite import PREFIX, Invite, decode_invite
from p2ptrain.swarm.manifest import (
    ADDED_IN,
    AveragingSpec,
    OptimizerSpec,
    SwarmManifest,
    public_key_bytes,
    sign,
    verify,
)

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors"
AUTHOR_KEY = bytes(range(32))  # the researcher's Ed25519 private key (test only, never use it for a swarm)
PEER_KEY = bytes(range(32, 64))  # a peer's libp2p Ed25519 identity, for a real-looking peer id


def vector_manifest(author: Ed25519PrivateKey, version: int) -> SwarmManifest:
    return SwarmManifest(
        run_id="vectors-demo",
        model="gpt2-tiny",
        dataset="default",
        tokenizer="gpt2" if version >= 4 else "bytes",
        seq_len=64,
        target_batch_size=256,
        author_key=public_key_bytes(author),
        created_at=1790000000,  # 2026-09-21T14:13:20Z
        dataset_config="",
        text_field="text",
        init_weights="",
        seed=42,
        optimizer=OptimizerSpec(
            lr=6e-4, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, warmup_epochs=10, clip_grad_norm=1.0
        ),
        averaging=AveragingSpec(
            compression="int8" if version >= 5 else "fp16",
            mode="local" if version >= 5 else "gradients",
            matchmaking_time_s=5.0,
            averaging_timeout_s=30.0,
            average_state_every=0 if version >= 5 else 5,
            aggregation="mean" if version == 1 else "centered_clip",
            group_size=8 if version >= 5 else 0,
            sync_every=10 if version >= 5 else 0,
        ),
        admission="token" if version >= 3 else "open",
        files=VECTOR_FILES if version >= 4 else {},
        version=version,
    )


# two of GPT-2's tokenizer files as pinned from the hub (sizes and hashes of made-up contents, commit made up)
VECTOR_FILES = {
    f"tokenizer/{name}": {"sha256": hashlib.sha256(name.encode()).digest(), "size": size, "revision": "0123456789" * 4}
    for name, size in (("merges.txt", 456318), ("vocab.json", 1042301))
}


def as_json(value: Any) -> Any:
    """Manifest fields as JSON: nested specs and maps as objects, bytes as hex."""
    if dataclasses.is_dataclass(value):
        return {f.name: as_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: as_json(v) for k, v in value.items()}
    return value.hex() if isinstance(value, bytes) else value


def expect_error(call: Callable[[], object], substring: str) -> str:
    """Run ``call``, check that it raises a P2PTrainError containing ``substring``, return the substring."""
    try:
        call()
    except P2PTrainError as e:
        if substring not in str(e):
            raise SystemExit(f"expected {substring!r} in the error, got {type(e).__name__}: {e}") from None
        return substring
    raise SystemExit(f"expected an error containing {substring!r}, but the call succeeded")


def peer_id(private_bytes: bytes) -> str:
    """The libp2p peer id of an Ed25519 key: identity multihash of its protobuf PublicKey, base58."""
    public = public_key_bytes(Ed25519PrivateKey.from_private_bytes(private_bytes))
    # 0x00 identity multihash, 0x24 = 36 bytes; protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}
    return PeerID(bytes.fromhex("002408011220") + public).to_base58()


def manifest_vector(version: int) -> tuple[SwarmManifest, bytes, dict]:
    """A signed manifest of ``version``: the manifest, its envelope, and its vector (an older version's fields
    without the ones it did not have)."""
    author = Ed25519PrivateKey.from_private_bytes(AUTHOR_KEY)
    manifest = vector_manifest(author, version)
    body, envelope = manifest.encode(), sign(manifest, author)
    if verify(envelope, manifest.hash) != manifest:
        raise SystemExit("the signed envelope does not verify: the encoder and decoder disagree")
    fields = as_json(manifest)
    for added, section, name, _ in ADDED_IN:
        if version < added:
            del (fields[section] if section else fields)[name]
    return (
        manifest,
        envelope,
        {
            "description": f"A signed swarm manifest v{version} (protocols/manifest.md).",
            "private_key_hex": AUTHOR_KEY.hex(),
            "public_key_hex": manifest.author_key.hex(),
            "fields": fields,
            "manifest_hex": body.hex(),
            "hash_hex": manifest.hash.hex(),
            "envelope_hex": envelope.hex(),
        },
    )


def manifest_vectors() -> tuple[dict, dict, dict, dict, dict, dict]:
    """Manifest v1, v1 tampered, v2, v3 (a private swarm's), v4 (with pinned files), v5 (a grouped swarm's)."""
    manifest, envelope, good = manifest_vector(1)
    # One letter of run_id changed ("vectors-demo" -> "vectors-dema"): still a valid manifest, badly signed.
    offset = envelope.index(b"vectors-demo") + len("vectors-dem")
    tampered = envelope[:offset] + b"a" + envelope[offset + 1 :]
    bad = {
        "description": (
            "manifest_v1.json's envelope with one byte of the manifest body changed (run_id 'vectors-demo' -> "
            "'vectors-dema'). verify(envelope) refuses the signature; verify(envelope, hash) refuses "
            "the hash first."
        ),
        "changed_envelope_offset": offset,
        "envelope_hex": tampered.hex(),
        "expected_error": expect_error(lambda: verify(tampered), "signature does not match its author key"),
        "expected_hash_hex": manifest.hash.hex(),
        "expected_error_with_hash": expect_error(
            lambda: verify(tampered, manifest.hash), "does not match the invite's"
        ),
    }
    return good, bad, *(manifest_vector(version)[2] for version in (2, 3, 4, 5))


def invite_vectors(manifest_hash: bytes) -> dict:
    peer = peer_id(PEER_KEY)
    peers = (f"/ip4/203.0.113.7/tcp/31337/p2p/{peer}", f"/ip6/2001:db8::7/tcp/31337/p2p/{peer}")
    invite = Invite(manifest_hash, "gpt2-tiny", peers)
    text = invite.encode()
    if decode_invite(text) != invite:
        raise SystemExit("the invite does not decode to what was encoded")
    middle = len(text) // 2
    altered = text[:middle] + ("B" if text[middle] != "B" else "C") + text[middle + 1 :]
    cut = (len(text) - len(PREFIX) - 1) % 4 or 4  # leaves 4n+1 base64 characters, which no bytes encode
    no_peers = Invite(manifest_hash, "gpt2-tiny", ()).encode()  # a correct checksum over a bad payload
    invalid = [
        ("wrong prefix", "invite-" + text[len(PREFIX) :], f"an invite starts with {PREFIX!r}"),
        ("newer version", "p2pt2-" + text[len(PREFIX) :], "needs a newer p2ptrain"),
        ("not base64url", text + "+/", "characters outside base64url"),
        ("truncated (8 characters lost)", text[:-8], "checksum mismatch"),
        (f"truncated to 4n+1 base64 characters ({cut} lost)", text[:-cut], "not base64url"),
        (f"one character altered (index {middle})", altered, "checksum mismatch"),
        ("valid checksum, no bootstrap peers", no_peers, "bootstrap peers"),
    ]
    return {
        "description": "An invite v1 (protocols/invite.md) and damaged invites a reader must refuse.",
        "invite": text,
        "manifest_hash_hex": manifest_hash.hex(),
        "model": invite.model,
        "peers": list(peers),
        "invalid": [
            {"why": why, "invite": bad, "expected_error": expect_error(lambda bad=bad: decode_invite(bad), error)}
            for why, bad, error in invalid
        ],
    }


def write(name: str, vector: dict) -> None:
    path = VECTORS / name
    path.write_text(json.dumps(vector, indent=2) + "\n")
    print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


def main() -> None:
    VECTORS.mkdir(parents=True, exist_ok=True)
    good, bad, v2, v3, v4, v5 = manifest_vectors()
    write("manifest_v1.json", good)
    write("manifest_v1_tampered.json", bad)
    write("manifest_v2.json", v2)
    write("manifest_v3.json", v3)
    write("manifest_v4.json", v4)
    write("manifest_v5.json", v5)
    write("invite_v1.json", invite_vectors(bytes.fromhex(good["hash_hex"])))


if __name__ == "__main__":
    main()
