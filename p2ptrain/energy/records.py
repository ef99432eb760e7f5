"""Ledger records in the DHT: each peer publishes its ledger signed with its libp2p identity key.

    key     p2ptrain/v1/ledger/<run_id>
    subkey  <peer id>  (base58: the multihash of the peer's public key)
    value   msgpack {"payload": bytes, "public_key": DER RSA public key, "signature": RSA-PSS/SHA-256 bytes}
    payload msgpack {"ledger": <the ledger's fields>, "expiration": <the record's DHT expiration>}

A reader accepts a record only if the public key hashes to the subkey (so the record speaks for that
peer id and no other), the signature over ``DOMAIN + payload`` verifies, the payload's expiration is
the record's (so nobody can re-store an old record to live longer than a newer one), and the ledger
inside names this run and this peer and passes ``Ledger.from_dict``'s bounds. Every value is
msgpack, size-bounded, and never unpickled. ``LedgerValidator`` applies the same checks inside
hivemind's DHT, so honest nodes refuse to store a forged record at all. Spec: ``protocols/dht-records.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import hivemind
import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time

from p2ptrain.energy.ledger import Ledger
from p2ptrain.errors import LedgerInvalid
from p2ptrain.swarm.discovery import DHT_TIMEOUT_S, bounded
from p2ptrain.swarm.identity import PSS, peer_id_of, public_key_der

logger = logging.getLogger(__name__)
LEDGER_TTL_S = 7 * 24 * 3600.0  # a record outlives its peer by a week (as long as DHT nodes holding it stay up)
MAX_RECORD_BYTES = 8192
MAX_LEDGERS_READ = 1024  # subkeys a reader looks at
RECORD_HISTORY = 48  # history points carried in a record (the file keeps more)
DOMAIN = b"p2ptrain/v1/ledger\x00"  # signed before the payload: a ledger signature is never valid for anything else
_UNPACK_LIMITS = dict(max_bin_len=MAX_RECORD_BYTES, max_str_len=MAX_RECORD_BYTES, max_array_len=1024, max_map_len=64)


def ledger_key(run_id: str) -> str:
    return f"p2ptrain/v1/ledger/{run_id}"


def record_fields(ledger: Ledger) -> dict[str, Any]:
    """The ledger as published: its history thinned to ``RECORD_HISTORY`` points (the newest kept)."""
    fields = ledger.to_dict()
    history = fields["history"]
    if len(history) > RECORD_HISTORY:
        step = (len(history) - 1) / (RECORD_HISTORY - 1)
        fields["history"] = [history[round(i * step)] for i in range(RECORD_HISTORY)]
    return fields


def encode_record(ledger: Ledger, key: rsa.RSAPrivateKey, expiration: float) -> bytes:
    payload = msgpack.packb({"ledger": record_fields(ledger), "expiration": expiration}, use_bin_type=True)
    signature = key.sign(DOMAIN + payload, PSS, hashes.SHA256())
    return msgpack.packb(
        {"payload": payload, "public_key": public_key_der(key), "signature": signature}, use_bin_type=True
    )


def _unpack(data: Any, what: str) -> Any:
    if not isinstance(data, bytes) or len(data) > MAX_RECORD_BYTES:
        raise LedgerInvalid(f"{what} is not bytes of at most {MAX_RECORD_BYTES}")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, **_UNPACK_LIMITS)
    except (ValueError, msgpack.UnpackException) as e:
        raise LedgerInvalid(f"{what} is not valid msgpack: {e}") from None


def verify_record(value: Any, subkey: Any, run_id: str, expiration: float | None = None) -> Ledger:
    """The ledger a record carries, if it is genuine (module docstring). Raises LedgerInvalid."""
    envelope = _unpack(value, "ledger record")
    if not isinstance(envelope, dict) or set(envelope) != {"payload", "public_key", "signature"}:
        raise LedgerInvalid("a ledger record holds exactly payload, public_key and signature")
    payload, public_der, signature = envelope["payload"], envelope["public_key"], envelope["signature"]
    if not all(isinstance(x, bytes) for x in (payload, public_der, signature)) or len(public_der) > 1024:
        raise LedgerInvalid("ledger record fields have the wrong types")
    if not isinstance(subkey, str) or peer_id_of(public_der) != subkey:
        raise LedgerInvalid(f"the record's key is not the key of peer {str(subkey)[:20]!r}")
    try:
        public_key = serialization.load_der_public_key(public_der)
        if not isinstance(public_key, rsa.RSAPublicKey) or not 2048 <= public_key.key_size <= 4096:
            raise LedgerInvalid("the record's key is not a 2048-4096 bit RSA key")
        public_key.verify(signature, DOMAIN + payload, PSS, hashes.SHA256())
    except (ValueError, InvalidSignature):
        raise LedgerInvalid(f"the signature of peer {subkey[:20]}…'s ledger does not verify") from None
    body = _unpack(payload, "ledger payload")
    if not isinstance(body, dict) or set(body) != {"ledger", "expiration"}:
        raise LedgerInvalid("a ledger payload holds exactly ledger and expiration")
    signed_expiration = body["expiration"]
    if not isinstance(signed_expiration, float) or not math.isfinite(signed_expiration):
        raise LedgerInvalid("the signed expiration is not a number")
    if expiration is not None and abs(signed_expiration - expiration) > 1e-3:
        raise LedgerInvalid("the record's expiration is not the one its owner signed (a replayed record)")
    ledger = Ledger.from_dict(body["ledger"])
    if ledger.peer_id != subkey or ledger.run_id != run_id:
        raise LedgerInvalid(f"the ledger is for peer {ledger.peer_id[:20]!r} in run {ledger.run_id!r}")
    return ledger


class LedgerValidator(RecordValidatorBase):
    """hivemind record validator: under ``p2ptrain/v1/ledger/<run_id>`` only genuine records are stored or read."""

    def __init__(self, run_ids: Iterable[str]):
        self._keys = {DHTID.generate(source=ledger_key(r)).to_bytes(): r for r in run_ids}

    @property
    def keys(self) -> dict:
        """The DHT keys (of the runs) this validator checks."""
        return self._keys

    def validate(self, record: DHTRecord) -> bool:
        run_id = self._keys.get(record.key)
        if run_id is None:
            return True  # not a ledger record of a swarm this node knows
        try:
            subkey = _unpack(record.subkey, "subkey")
            verify_record(_unpack(record.value, "value"), subkey, run_id, record.expiration_time)
        except LedgerInvalid as e:
            logger.debug("Refused a ledger record: %s", e)
            return False
        return True

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, LedgerValidator):
            return False
        self._keys.update(other.keys)
        return True


def publish_ledger(
    dht: hivemind.DHT,
    ledger: Ledger,
    key: rsa.RSAPrivateKey,
    ttl_s: float = LEDGER_TTL_S,
    timeout_s: float = DHT_TIMEOUT_S,
) -> bool:
    """Store (or refresh) this peer's signed ledger; True if some DHT node stored it."""
    expiration = get_dht_time() + ttl_s
    value = encode_record(ledger, key, expiration)
    future = dht.store(ledger_key(ledger.run_id), value, expiration, subkey=ledger.peer_id, return_future=True)
    return bool(bounded(future, timeout_s))


@dataclass(frozen=True)
class SwarmLedgers:
    ledgers: list[Ledger]  # one per peer, genuine
    rejected: list[str]  # "<peer id prefix>: why" for each record refused


def fetch_ledgers(dht: hivemind.DHT, run_id: str, timeout_s: float = DHT_TIMEOUT_S) -> SwarmLedgers:
    """Every peer's ledger for ``run_id`` that the DHT holds, each verified; forged or malformed ones are listed."""
    found = bounded(dht.get(ledger_key(run_id), latest=True, return_future=True), timeout_s)
    if found is None or not isinstance(found.value, dict):
        return SwarmLedgers([], [])
    ledgers, rejected = [], []
    for subkey, entry in list(found.value.items())[:MAX_LEDGERS_READ]:
        try:
            ledgers.append(verify_record(getattr(entry, "value", None), subkey, run_id, entry.expiration_time))
        except (LedgerInvalid, AttributeError) as e:
            rejected.append(f"{str(subkey)[:16]}…: {e}")
            logger.warning("Refused the ledger record of %s: %s", str(subkey)[:16], e)
    return SwarmLedgers(sorted(ledgers, key=lambda led: led.peer_id), rejected)


def gather_swarm(initial_peers: list[str], run_id: str | None, manifest_hash: bytes | None = None) -> SwarmLedgers:
    """Join the DHT as a client (``swarm.observer.observe``), read every peer's ledger, leave.

    Raises:
        PeerUnreachable: none of ``initial_peers`` answered, or the manifest is not served.
    """
    from p2ptrain.swarm.observer import observe

    with observe(initial_peers, run_id, manifest_hash, lambda run: [LedgerValidator([run])]) as (dht, run):
        return fetch_ledgers(dht, run)
