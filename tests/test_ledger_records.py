"""Signed ledger records: only a peer's own identity key can write its numbers, in a codec and in a real DHT."""

from __future__ import annotations

import pickle

import hivemind
import msgpack
import pytest
from hivemind.p2p import P2P, PeerID
from hivemind.utils import get_dht_time

from p2ptrain.energy.ledger import Ledger
from p2ptrain.energy.records import (
    RECORD_HISTORY,
    LedgerValidator,
    encode_record,
    fetch_ledgers,
    ledger_key,
    publish_ledger,
    verify_record,
)
from p2ptrain.errors import LedgerInvalid
from p2ptrain.swarm.identity import identity_key, peer_id_of, public_key_der

EXPIRES = 1_900_000_000.0


class Identity:
    def __init__(self, data_dir):
        data_dir.mkdir()
        P2P.generate_identity(str(data_dir / "identity.key"))
        self.key = identity_key(data_dir)
        self.peer_id = PeerID.from_identity((data_dir / "identity.key").read_bytes()).to_base58()


@pytest.fixture(scope="module")
def alice(tmp_path_factory):
    return Identity(tmp_path_factory.mktemp("keys") / "alice")


@pytest.fixture(scope="module")
def mallory(tmp_path_factory):
    return Identity(tmp_path_factory.mktemp("keys") / "mallory")


def ledger_of(peer_id: str, tokens: int = 6400, run_id: str = "run") -> Ledger:
    return Ledger(run_id=run_id, peer_id=peer_id, samples=tokens // 64, tokens=tokens, device_s=100.0, cpu_j=500.0)


def test_the_peer_id_is_the_hash_of_the_signing_key_and_a_record_round_trips(alice):
    assert peer_id_of(public_key_der(alice.key)) == alice.peer_id  # what hivemind derives from identity.key
    history = [[1.8e9 + i, float(i), 0.0, 64.0 * i] for i in range(200)]
    led = Ledger(**{**ledger_of(alice.peer_id).to_dict(), "history": history})
    got = verify_record(encode_record(led, alice.key, EXPIRES), alice.peer_id, "run", EXPIRES)
    assert got.tokens == 6400 and got.cpu_j == 500.0 and len(got.history) == RECORD_HISTORY
    assert got.history[0] == history[0] and got.history[-1] == history[-1]


def tamper(record: bytes, **changes) -> bytes:
    envelope = msgpack.unpackb(record)
    envelope.update(changes)
    return msgpack.packb(envelope, use_bin_type=True)


def test_a_forged_record_under_another_peers_id_is_rejected(alice, mallory):
    # mallory signs a record claiming alice's peer id: her key does not hash to alice's id
    forged = encode_record(ledger_of(alice.peer_id, tokens=10**9), mallory.key, EXPIRES)
    with pytest.raises(LedgerInvalid, match="not the key of peer"):
        verify_record(forged, alice.peer_id, "run", EXPIRES)
    # ...or puts alice's public key on it: then the signature does not verify
    with pytest.raises(LedgerInvalid, match="does not verify"):
        verify_record(tamper(forged, public_key=public_key_der(alice.key)), alice.peer_id, "run", EXPIRES)
    # ...or edits alice's genuine record
    genuine = encode_record(ledger_of(alice.peer_id), alice.key, EXPIRES)
    payload = msgpack.unpackb(genuine)["payload"].replace(b"\xcd\x19\x00", b"\xce\x3b\x9a\xca\x00")  # 6400 → 1e9
    with pytest.raises(LedgerInvalid, match="does not verify"):
        verify_record(tamper(genuine, payload=payload), alice.peer_id, "run", EXPIRES)


def test_a_genuine_record_replayed_with_another_expiration_or_run_is_rejected(alice):
    genuine = encode_record(ledger_of(alice.peer_id), alice.key, EXPIRES)
    with pytest.raises(LedgerInvalid, match="replayed"):
        verify_record(genuine, alice.peer_id, "run", EXPIRES + 3600)
    with pytest.raises(LedgerInvalid, match="in run 'run'"):
        verify_record(genuine, alice.peer_id, "another-run", EXPIRES)


class Boom:
    def __reduce__(self):
        return (exec, ("raise SystemExit('unpickled!')",))


@pytest.mark.parametrize(
    "value",
    [
        b"\xc1 not msgpack",
        b"x" * 9000,
        "a str",
        pickle.dumps(Boom()),  # decoding never unpickles: this would exit the test run if it did
        msgpack.packb({"payload": pickle.dumps(Boom()), "public_key": b"k", "signature": b"s"}),
        msgpack.packb([1, 2, 3]),
        msgpack.packb({"payload": b"", "public_key": b"", "signature": b"", "extra": 1}),
    ],
)
def test_malformed_records_are_refused_without_being_unpickled(alice, value):
    with pytest.raises(LedgerInvalid):
        verify_record(value, alice.peer_id, "run", EXPIRES)


def test_the_validator_accepts_only_genuine_records_under_its_swarms_key(alice, mallory):
    from hivemind.dht.routing import DHTID
    from hivemind.dht.validation import DHTRecord

    validator = LedgerValidator(["run"])
    key = DHTID.generate(source=ledger_key("run")).to_bytes()
    subkey = msgpack.packb(alice.peer_id)

    def record(value: bytes, key: bytes = key, expiration: float = EXPIRES) -> DHTRecord:
        return DHTRecord(key, subkey, msgpack.packb(value, use_bin_type=True), expiration)

    genuine = encode_record(ledger_of(alice.peer_id), alice.key, EXPIRES)
    forged = encode_record(ledger_of(alice.peer_id), mallory.key, EXPIRES)
    assert validator.validate(record(genuine))
    assert not validator.validate(record(forged))
    assert not validator.validate(record(genuine, expiration=EXPIRES + 10))
    other = DHTID.generate(source="some/other/key").to_bytes()
    assert validator.validate(record(forged, key=other))  # not a ledger record: not this validator's business


def test_in_a_real_dht_a_forged_record_is_neither_stored_by_honest_nodes_nor_read(alice, mallory):
    """An honest node (with the validator) and an attacker's node (without): the forgery never reaches a reader."""
    loopback = ["/ip4/127.0.0.1/tcp/0"]
    honest = hivemind.DHT(start=True, host_maddrs=loopback, record_validators=[LedgerValidator(["run"])])
    attacker = reader = None
    try:
        peers = [str(a) for a in honest.get_visible_maddrs()]
        attacker = hivemind.DHT(start=True, initial_peers=peers, host_maddrs=loopback)
        assert publish_ledger(honest, ledger_of(alice.peer_id), alice.key, ttl_s=600, timeout_s=10)
        expiration = get_dht_time() + 1200  # later than alice's: it would win if it were stored
        forged = encode_record(ledger_of(alice.peer_id, tokens=10**9), mallory.key, expiration)
        attacker.store(ledger_key("run"), forged, expiration, subkey=alice.peer_id)
        stored_at_attacker = attacker.get(ledger_key("run"), latest=True)
        assert stored_at_attacker.value[alice.peer_id].value == forged  # the attacker holds it itself...

        reader = hivemind.DHT(
            start=True, initial_peers=peers, client_mode=True, record_validators=[LedgerValidator(["run"])]
        )
        found = fetch_ledgers(reader, "run", timeout_s=10)
        assert [(led.peer_id, led.tokens) for led in found.ledgers] == [(alice.peer_id, 6400)]  # ...nobody else does
        raw = fetch_ledgers(attacker, "run", timeout_s=10)  # a node without the validator: the check in code refuses
        assert raw.ledgers == [] and "not the key of peer" in raw.rejected[0]
    finally:
        for dht in (reader, attacker, honest):
            if dht is not None:
                dht.shutdown()
