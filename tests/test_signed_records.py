"""Per-peer DHT records are signed by their peer and refused when forged or replayed (``swarm/signed_records.py``)."""

from __future__ import annotations

import dataclasses

import hivemind
import msgpack
import pytest
from conftest import swarm_node
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from p2ptrain.swarm.discovery import PARAM_SLOTS, count_members, members_key, params_key, publish
from p2ptrain.swarm.identity import ensure_identity, identity_key
from p2ptrain.swarm.losses import losses_key
from p2ptrain.swarm.proximity import near_key
from p2ptrain.swarm.signed_records import PeerRecords

RUN = "signed-run"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two peers' libp2p identities (RSA, as hivemind generates them) and their peer ids."""
    found = []
    for name in ("alice", "mallory"):
        path = tmp_path_factory.mktemp(name)
        peer_id = ensure_identity(path).to_base58()
        found.append((identity_key(path), peer_id, path))
    return found


def record(key: str, subkey: str, value: object, expiration: float = 2e9) -> DHTRecord:
    return DHTRecord(
        DHTID.generate(source=key).to_bytes(),
        MSGPackSerializer.dumps(subkey),
        MSGPackSerializer.dumps(value),
        expiration,
    )


def test_a_peer_signs_its_own_records_and_every_node_checks_them(keys):
    (alice_key, alice, _), (mallory_key, mallory, _) = keys
    signer, reader = PeerRecords([RUN], alice_key), PeerRecords([RUN])
    mine = record(members_key(RUN), alice, b"hash")
    signed = dataclasses.replace(mine, value=signer.sign_value(mine))
    assert reader.validate(signed)
    assert reader.strip_value(signed) == mine.value  # readers above the DHT see the value as written
    # not this peer's subkey, or not a per-peer key of the swarm: left as they are
    theirs = record(members_key(RUN), mallory, b"hash")
    assert signer.sign_value(theirs) == theirs.value
    other = record("some/other/key", alice, b"x")
    assert signer.sign_value(other) == other.value and reader.validate(other)

    # forged: unsigned; signed by another peer under alice's id; value, expiration or key changed after signing
    assert not reader.validate(theirs)
    forger = PeerRecords([RUN], mallory_key)
    posing = dataclasses.replace(mine, subkey=MSGPackSerializer.dumps(mallory))
    as_alice = dataclasses.replace(mine, value=forger.sign_value(posing))
    assert not reader.validate(as_alice)
    envelope = msgpack.unpackb(signed.value)
    altered = dataclasses.replace(signed, value=msgpack.packb({**envelope, "v": MSGPackSerializer.dumps(b"lie")}))
    assert not reader.validate(altered)
    assert not reader.validate(dataclasses.replace(signed, expiration_time=signed.expiration_time + 3600))  # replayed
    moved = dataclasses.replace(signed, key=DHTID.generate(source=f"p2ptrain/v1/relays/{RUN}").to_bytes())
    assert not reader.validate(moved)
    assert not reader.validate(dataclasses.replace(signed, value=b"\xc1"))
    unsigned_near = record(near_key(RUN, 7), alice, b"coordinates")  # proximity records: signed like the others
    assert not reader.validate(unsigned_near)
    assert reader.validate(dataclasses.replace(unsigned_near, value=signer.sign_value(unsigned_near)))
    unsigned_losses = record(losses_key(RUN, 15), alice, b"[7, 3.2, 3.1]")  # losses records too
    assert not reader.validate(unsigned_losses)
    assert reader.validate(dataclasses.replace(unsigned_losses, value=signer.sign_value(unsigned_losses)))
    for slot in (0, PARAM_SLOTS - 1):  # parameter sketches, every key of the ring
        unsigned_sketch = record(params_key(RUN, slot), alice, b"sketch")
        assert not reader.validate(unsigned_sketch)
        assert reader.validate(dataclasses.replace(unsigned_sketch, value=signer.sign_value(unsigned_sketch)))


def test_forged_membership_is_not_counted_in_a_real_dht(tmp_path):
    """Two swarm nodes publish and read signed records; a node without the validator stores memberships under
    made-up peer ids, and under a real member's: the swarm's nodes refuse them, the reader counts the real ones."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from p2ptrain.swarm.manifest import new_manifest

    manifest = new_manifest(
        Ed25519PrivateKey.generate(), run_id=RUN, model="gpt2-tiny", dataset="default", tokenizer="bytes",
        seq_len=64, target_batch_size=64,
    )  # fmt: skip
    nodes = []
    try:
        for name in ("honest", "reader"):  # each signs with its own libp2p identity, as a peer does
            nodes.append(swarm_node(tmp_path / name, RUN, nodes[0].get_visible_maddrs() if nodes else []))
        forger = hivemind.DHT(
            start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=nodes[0].get_visible_maddrs()
        )
        nodes.append(forger)
        honest, reader = nodes[:2]
        assert publish(honest, manifest, b"envelope") and publish(reader, manifest, b"envelope")
        for i in range(5):
            fake = PeerID(bytes([0x12, 0x20]) + bytes([i]) * 32).to_base58()
            forger.store(members_key(RUN), manifest.hash, get_dht_time() + 60, subkey=fake)
        forger.store(members_key(RUN), manifest.hash, get_dht_time() + 120, subkey=honest.peer_id.to_base58())
        assert count_members(reader, manifest) == 2
    finally:
        for node in nodes:
            node.shutdown()
