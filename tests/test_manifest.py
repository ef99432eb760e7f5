"""Signed manifests: round trip, and every way a peer could hand us a bad one."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2ptrain.errors import ConfigError, ManifestInvalid
from p2ptrain.swarm.manifest import MAX_ENVELOPE_BYTES, OptimizerSpec, SwarmManifest, new_manifest, sign, verify


def test_sign_verify_round_trip(manifest, key):
    envelope = sign(manifest, key)
    assert verify(envelope, expected_hash=manifest.hash) == manifest
    assert verify(envelope) == manifest  # without an invite: self-consistent signature only


def test_equal_manifests_hash_equally_and_differ_otherwise(manifest):
    assert manifest.hash == SwarmManifest.decode(manifest.encode()).hash
    assert dataclasses.replace(manifest, seq_len=33).hash != manifest.hash


def test_tampered_body_fails_signature(manifest, key):
    raw = msgpack.unpackb(sign(manifest, key))
    raw["manifest"] = raw["manifest"].replace(b"test-run", b"evil-run")
    with pytest.raises(ManifestInvalid, match="signature does not match"):
        verify(msgpack.packb(raw))


def test_tampered_body_fails_hash_before_signature(manifest, key):
    raw = msgpack.unpackb(sign(manifest, key))
    raw["manifest"] = raw["manifest"].replace(b"test-run", b"evil-run")
    with pytest.raises(ManifestInvalid, match="does not match the invite"):
        verify(msgpack.packb(raw), expected_hash=manifest.hash)


def test_resigned_by_another_key_fails_hash(manifest):
    mallory = Ed25519PrivateKey.generate()
    forged = new_manifest(
        mallory,
        **{f.name: getattr(manifest, f.name) for f in dataclasses.fields(manifest) if f.name not in ("author_key",)},
    )
    with pytest.raises(ManifestInvalid, match="does not match the invite"):
        verify(sign(forged, mallory), expected_hash=manifest.hash)


def test_signing_with_a_key_that_is_not_the_author_is_refused(manifest):
    with pytest.raises(ValueError, match="not the manifest's author"):
        sign(manifest, Ed25519PrivateKey.generate())


PINNED = {"sha256": bytes(32), "size": 1000, "revision": "a" * 40}


def test_pinned_files_round_trip(key, manifest):
    files = {"tokenizer/vocab.json": PINNED, "init_weights/model.safetensors": {**PINNED, "revision": ""}}
    pinning = dataclasses.replace(manifest, files=files)
    assert verify(sign(pinning, key), expected_hash=pinning.hash).files == files


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(version=6), "version 6 is not supported"),
        (lambda d: d["averaging"].update(group_size=1), "group_size: 0 or 2-256"),
        (lambda d: d["averaging"].update(group_size=4), "group_size needs averaging mode local"),
        (lambda d: d["averaging"].update(group_size=4, mode="local", compression="randk"), "group_size needs a comp"),
        (lambda d: d.update(version=4) or d["averaging"].update(group_size=4, mode="local"), "before version 5"),
        (lambda d: d["averaging"].update(sync_every=10), "sync_every needs averaging mode local"),
        (lambda d: d["averaging"].update(sync_every=-1), "sync_every must be in"),
        (lambda d: d.update(files={"tokenizer/../../.bashrc": PINNED}), "files must map"),
        (lambda d: d.update(files={"weights/model.bin": PINNED}), "files must map"),
        (lambda d: d.update(files={"tokenizer/vocab.json": {**PINNED, "sha256": b"x" * 31}}), "files must map"),
        (lambda d: d.update(files={"tokenizer/vocab.json": {**PINNED, "size": -1}}), "files must map"),
        (lambda d: d.update(files={"tokenizer/vocab.json": {**PINNED, "revision": "main"}}), "files must map"),
        (lambda d: d.update(files={"tokenizer/vocab.json": {**PINNED, "url": "http://x"}}), "files must map"),
        (lambda d: d.update(files={f"tokenizer/f{i}": PINNED for i in range(33)}), "files must map"),
        (lambda d: d.update(version=3, files={"tokenizer/vocab.json": PINNED}), "before version 4 pins no files"),
        (lambda d: d["averaging"].update(aggregation="mode"), "aggregation must be one of"),
        (lambda d: d["averaging"].pop("aggregation"), r"lacks fields \['aggregation'\]"),
        (lambda d: d.update(extra="x"), "unknown fields"),
        (lambda d: d.pop("seed"), "lacks fields"),
        (lambda d: d.update(seq_len="64"), "must be int"),
        (lambda d: d["optimizer"].update(lr=1), "must be float"),
        (lambda d: d.update(seq_len=10**6), "seq_len"),
        (lambda d: d.update(run_id="abc\n"), "run_id"),
        (lambda d: d["averaging"].update(compression="zip"), "compression must be one of"),
    ],
)
def test_invalid_fields_are_refused(manifest, mutate, message):
    raw = msgpack.unpackb(manifest.encode())
    mutate(raw)
    with pytest.raises(ManifestInvalid, match=message):
        SwarmManifest.decode(msgpack.packb(raw))


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"manifest": b"x"}), b"\x00" * (MAX_ENVELOPE_BYTES + 1)]
)
def test_garbage_envelopes_are_refused(data):
    with pytest.raises(ManifestInvalid):
        verify(data)


def test_bad_values_from_flags_are_config_errors(key):
    with pytest.raises(ConfigError, match="lr"):
        new_manifest(
            key,
            run_id="r",
            model="gpt2-tiny",
            dataset="default",
            tokenizer="bytes",
            seq_len=32,
            target_batch_size=16,
            optimizer=OptimizerSpec(lr=5.0),
        )
