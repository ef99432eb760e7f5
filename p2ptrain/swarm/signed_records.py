"""The records a peer keeps in the DHT under its own peer id, signed by that peer, inside hivemind's DHT.

Membership, relay addresses, passes, end-of-run, proximity (near), losses and accusation records
(``protocols/dht-records.md``) are stored under a swarm's key with the writer's peer id as subkey. Unsigned, any DHT
node could write one under any peer id: count members that are not there, announce a final state in another peer's
name, or place itself next to anybody. ``PeerRecords`` is a hivemind record validator
(hivemind's ``RSASignatureValidator`` does the same for keys that embed a public key): in the writer's DHT it signs
each such record whose subkey is its own peer id with its libp2p identity key; every node that knows the swarm
refuses to store, and every reader refuses to read, one whose signature does not verify, whose key does not hash to
the subkey's peer id, or whose expiration or key is not the one signed (a replayed record). Readers above it see the
value as written: the signature is stripped below them.

    signed value = msgpack {"v": value bytes, "k": DER RSA public key, "s": RSA-PSS/SHA-256 signature}
    signature over DOMAIN + msgpack [key id, subkey bytes, value bytes, expiration]

The parameter sketches rotate over ``PARAM_SLOTS`` keys (``p2ptrain/v1/params/<run>/<N mod 16>``) so that their keys,
too, are known in advance and covered. Manifest, ledger and revocation records carry signatures of their own.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import MSGPackSerializer

from p2ptrain.swarm.discovery import (
    AVERAGERS,
    PARAM_SLOTS,
    accusations_key,
    finishing_key,
    members_key,
    params_key,
    passes_key,
    relays_key,
)
from p2ptrain.swarm.identity import PSS, peer_id_of, public_key_der
from p2ptrain.swarm.losses import losses_key
from p2ptrain.swarm.proximity import SHARDS, near_key

logger = logging.getLogger(__name__)
DOMAIN = b"p2ptrain/v1/peer-record\x00"
MAX_SIGNED_BYTES = 16 * 1024


PEER_KEYS: tuple[Callable[[str], str], ...] = (
    members_key,
    relays_key,
    passes_key,
    finishing_key,
    *(functools.partial(near_key, shard=shard) for shard in range(SHARDS)),
    *(functools.partial(losses_key, shard=shard) for shard in range(SHARDS)),
    *(functools.partial(params_key, slot=slot) for slot in range(PARAM_SLOTS)),
    *(functools.partial(lambda run, name: accusations_key(f"{run}_{name}"), name=name) for name in AVERAGERS),
)


class PeerRecords(RecordValidatorBase):
    """Signs this peer's records under ``PEER_KEYS`` of ``run_ids`` (with ``identity``, its libp2p key; None: a
    reader only) and refuses anyone's unsigned or forged ones."""

    def __init__(self, run_ids: Iterable[str], identity: rsa.RSAPrivateKey | None = None):
        self.keys = {DHTID.generate(source=key(run)).to_bytes() for run in run_ids for key in PEER_KEYS}
        self._private_der = None if identity is None else identity.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )  # fmt: skip
        self._public_der = None if identity is None else public_key_der(identity)
        self.own_subkey = None if identity is None else MSGPackSerializer.dumps(peer_id_of(self._public_der))
        self._identity = identity

    def __getstate__(self) -> dict:  # hivemind sends validators to its DHT process; a key object does not pickle
        return {**self.__dict__, "_identity": None}

    def _key(self) -> rsa.RSAPrivateKey:
        if self._identity is None:
            self._identity = serialization.load_der_private_key(self._private_der, password=None)
        return self._identity

    def sign_value(self, record: DHTRecord) -> bytes:
        if record.key not in self.keys or self.own_subkey is None or record.subkey != self.own_subkey:
            return record.value
        signature = self._key().sign(_signed_bytes(record), PSS, hashes.SHA256())
        return msgpack.packb({"v": record.value, "k": self._public_der, "s": signature}, use_bin_type=True)

    def validate(self, record: DHTRecord) -> bool:
        if record.key not in self.keys:
            return True  # not a per-peer record of a swarm this node knows
        try:
            value, public_der, signature = _open(record.value)
            subkey = MSGPackSerializer.loads(record.subkey)
            if not isinstance(subkey, str) or peer_id_of(public_der) != subkey:
                raise ValueError("the signing key is not the subkey's peer id")
            public_key = serialization.load_der_public_key(public_der)
            if not isinstance(public_key, rsa.RSAPublicKey) or not 1024 <= public_key.key_size <= 4096:
                raise ValueError("not an RSA key of 1024-4096 bits")
            signed = DHTRecord(record.key, record.subkey, value, record.expiration_time)
            public_key.verify(signature, _signed_bytes(signed), PSS, hashes.SHA256())
        except (ValueError, TypeError, InvalidSignature, msgpack.UnpackException) as e:
            logger.debug("Refused an unsigned or forged peer record: %s", e or type(e).__name__)
            return False
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        if record.key not in self.keys:
            return record.value
        try:
            return _open(record.value)[0]
        except (ValueError, TypeError, msgpack.UnpackException):
            return record.value  # validate() refused it already

    @property
    def priority(self) -> int:
        return 10  # as hivemind's signature validator: before any validator that reads the value

    def merge_with(self, other: RecordValidatorBase) -> bool:
        if not isinstance(other, PeerRecords) or other.own_subkey not in (None, self.own_subkey):
            return False
        self.keys |= other.keys
        return True


def _signed_bytes(record: DHTRecord) -> bytes:
    return DOMAIN + msgpack.packb(
        [record.key, record.subkey, record.value, float(record.expiration_time)], use_bin_type=True
    )


def _open(signed: bytes) -> tuple[bytes, bytes, bytes]:
    if not isinstance(signed, bytes) or len(signed) > MAX_SIGNED_BYTES:
        raise ValueError(f"not bytes of at most {MAX_SIGNED_BYTES}")
    raw = msgpack.unpackb(signed, raw=False, max_bin_len=MAX_SIGNED_BYTES, max_str_len=64, max_map_len=3)
    if not (isinstance(raw, dict) and set(raw) == {"v", "k", "s"} and all(isinstance(x, bytes) for x in raw.values())):
        raise ValueError("not a signed peer record")
    if len(raw["k"]) > 1024:
        raise ValueError("public key over 1024 bytes")
    return raw["v"], raw["k"], raw["s"]
