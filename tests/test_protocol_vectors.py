"""The golden vectors in protocols/vectors/ decode, verify and re-encode byte for byte.

The vectors are written by scripts/make_vectors.py; the specs they illustrate are protocols/*.md.
A failure here means the wire format changed: old peers and invites would no longer interoperate.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2ptrain.errors import InviteInvalid, ManifestInvalid
from p2ptrain.swarm.invite import PREFIX, Invite, decode_invite
from p2ptrain.swarm.manifest import ADDED_IN, AveragingSpec, OptimizerSpec, SwarmManifest, sign, verify

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def manifest_from_fields(fields: dict) -> SwarmManifest:
    fields = {**fields, "averaging": dict(fields["averaging"])}
    for version, section, name, old in ADDED_IN:  # what an older version's manifest means by the fields it lacks
        if fields["version"] < version:
            (fields[section] if section else fields).setdefault(name, old)
    return SwarmManifest(
        **{
            **fields,
            "author_key": bytes.fromhex(fields["author_key"]),
            "optimizer": OptimizerSpec(**fields["optimizer"]),
            "averaging": AveragingSpec(**fields["averaging"]),
            "files": {k: {**v, "sha256": bytes.fromhex(v["sha256"])} for k, v in fields["files"].items()},
        }
    )


MANIFEST = load("manifest_v1.json")
MANIFESTS = [MANIFEST, *(load(f"manifest_v{v}.json") for v in (2, 3, 4, 5))]  # older versions are still read
TAMPERED = load("manifest_v1_tampered.json")
INVITE = load("invite_v1.json")
each_version = pytest.mark.parametrize("vector", MANIFESTS, ids=lambda v: f"v{v['fields']['version']}")


@each_version
def test_manifest_fields_encode_to_the_canonical_bytes_and_hash(vector):
    manifest = manifest_from_fields(vector["fields"])
    assert manifest.encode().hex() == vector["manifest_hex"]
    assert hashlib.sha256(bytes.fromhex(vector["manifest_hex"])).hexdigest() == vector["hash_hex"]
    assert manifest.hash.hex() == vector["hash_hex"]


@each_version
def test_manifest_envelope_verifies_to_the_fields(vector):
    envelope, expected_hash = bytes.fromhex(vector["envelope_hex"]), bytes.fromhex(vector["hash_hex"])
    assert verify(envelope, expected_hash) == manifest_from_fields(vector["fields"])
    assert verify(envelope) == manifest_from_fields(vector["fields"])  # no invite: signature only


@each_version
def test_signing_reproduces_the_envelope(vector):
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["private_key_hex"]))
    manifest = manifest_from_fields(vector["fields"])
    assert manifest.author_key.hex() == vector["public_key_hex"]
    assert sign(manifest, key).hex() == vector["envelope_hex"]  # Ed25519 signatures are deterministic


def test_a_version_1_manifest_averages_by_mean():
    manifest = verify(bytes.fromhex(MANIFEST["envelope_hex"]))
    assert manifest.version == 1 and manifest.averaging.aggregation == "mean"


def test_tampered_manifest_is_refused():
    envelope = bytes.fromhex(TAMPERED["envelope_hex"])
    with pytest.raises(ManifestInvalid) as error:
        verify(envelope)
    assert TAMPERED["expected_error"] in str(error.value)
    with pytest.raises(ManifestInvalid) as error:
        verify(envelope, bytes.fromhex(TAMPERED["expected_hash_hex"]))
    assert TAMPERED["expected_error_with_hash"] in str(error.value)


def test_invite_decodes_and_reencodes():
    invite = decode_invite(INVITE["invite"])
    assert invite == Invite(bytes.fromhex(INVITE["manifest_hash_hex"]), INVITE["model"], tuple(INVITE["peers"]))
    assert invite.encode() == INVITE["invite"]
    assert invite.manifest_hash.hex() == MANIFEST["hash_hex"]  # the invite pins the manifest vector


def test_invite_checksum_is_the_sha256_prefix_of_the_payload():
    body = INVITE["invite"][len(PREFIX) :]
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert hashlib.sha256(raw[:-4]).digest()[:4] == raw[-4:]


@pytest.mark.parametrize("case", INVITE["invalid"], ids=lambda case: case["why"])
def test_invalid_invite_is_refused(case):
    with pytest.raises(InviteInvalid) as error:
        decode_invite(case["invite"])
    assert case["expected_error"] in str(error.value)
