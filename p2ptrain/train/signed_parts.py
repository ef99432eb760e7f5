"""Signed parts: every part a p2ptrain member sends in an averaging round is signed, so that the member it was sent to
can later show anybody what it received (``accusations.py``).

Each peer makes an Ed25519 *part key* per process and certifies it with its libp2p identity key (``PartSigner``;
RSA-PSS, as its DHT records). A sent part carries, in the ``peer_id`` field of hivemind's ``AveragingData`` message
(which hivemind's all-reduce does not read), a stamp: msgpack [certificate or b"", signature]. The signature covers
the averager's prefix, the group id, the aggregator's peer id, the part's index and its bytes (``part_digest``); the
first part of each stream carries the certificate. An aggregator with a signer checks each part as it arrives and
ends the stream of a sender whose part is not signed so (``Receipts``): hivemind then leaves that sender out of the
round, as one that stopped sending. Signing costs a SHA-256 of each part and an Ed25519 signature (tens of
microseconds); checking, the same and one RSA verification per sender and round.

    certificate = msgpack {"k": DER RSA public key, "e": raw Ed25519 public key, "s": RSA-PSS(DOMAIN_CERT + e)}
    signature   = Ed25519 over part_digest = SHA-256(DOMAIN_PART + msgpack [prefix, group id, aggregator peer id,
                  part index, size, dtype, compression, SHA-256(buffer)])
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import Any

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hivemind.proto import runtime_pb2

from p2ptrain.swarm.identity import PSS, peer_id_of, public_key_der

logger = logging.getLogger(__name__)

DOMAIN_CERT = b"p2ptrain/v1/part-key\x00"
DOMAIN_PART = b"p2ptrain/v1/part\x00"
MAX_CERT_BYTES = 2048
MAX_STAMP_BYTES = MAX_CERT_BYTES + 256
MAX_EVIDENCE_BYTES = 2 * 1024 * 1024  # hivemind's parts are 512 KiB at most, on the wire
KEEP_PER_SENDER = 8  # parts kept per sender: more than hivemind reads ahead of the part being reduced


class Unverified(ValueError):
    """Evidence, a certificate or a signature that does not check out (or does not decode)."""


class PartSigner:
    """This peer's part key, with its certificate: ``DOMAIN_CERT`` + the Ed25519 public key, signed by the libp2p
    identity key (RSA-PSS, as the peer's DHT records). Picklable (it travels to the averager processes)."""

    def __init__(self, identity: rsa.RSAPrivateKey):
        self._key = Ed25519PrivateKey.generate()
        public = self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        signature = identity.sign(DOMAIN_CERT + public, PSS, hashes.SHA256())
        self.cert = msgpack.packb({"k": public_key_der(identity), "e": public, "s": signature}, use_bin_type=True)

    def stamp(self, digest: bytes, with_cert: bool) -> bytes:
        """What a sent part carries: [certificate or b"", signature over ``digest``]."""
        return msgpack.packb([self.cert if with_cert else b"", self._key.sign(digest)], use_bin_type=True)

    def stamp_part(self, prefix: str, group_id: bytes, aggregator: bytes, part_index: int, part: Any) -> bytes:
        """The stamp of part ``part_index`` of a round sent to ``aggregator``; the first part's has the certificate."""
        digest = part_digest(prefix, group_id, aggregator, part_index, part)
        return self.stamp(digest, with_cert=part_index == 0)

    def __getstate__(self) -> dict[str, bytes]:
        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return {"key": raw, "cert": self.cert}

    def __setstate__(self, state: dict[str, bytes]) -> None:
        self._key, self.cert = Ed25519PrivateKey.from_private_bytes(state["key"]), state["cert"]


@functools.lru_cache(maxsize=256)
def read_cert(cert: bytes) -> tuple[str, Ed25519PublicKey]:
    """The peer id a certificate names and the part key it certifies; raises ``Unverified``."""
    try:
        if len(cert) > MAX_CERT_BYTES:
            raise Unverified(f"a certificate of {len(cert)} bytes")
        fields = msgpack.unpackb(cert, raw=False)
        der, public, signature = fields["k"], fields["e"], fields["s"]
        identity = serialization.load_der_public_key(der)
        if not isinstance(identity, rsa.RSAPublicKey):
            raise Unverified("the certificate's identity key is not an RSA key")
        identity.verify(signature, DOMAIN_CERT + public, PSS, hashes.SHA256())
        return peer_id_of(der), Ed25519PublicKey.from_public_bytes(public)
    except Unverified:
        raise
    except InvalidSignature:
        raise Unverified("the certificate's signature does not verify") from None
    except Exception as e:  # noqa: BLE001 - a stranger's bytes: whatever fails to decode is unverified
        raise Unverified(f"the certificate does not decode ({type(e).__name__})") from None


def part_digest(prefix: str, group_id: bytes, aggregator: bytes, part_index: int, part: runtime_pb2.Tensor) -> bytes:
    """What a part's signature covers: where it was sent (averager, round, aggregator, index) and its bytes."""
    fields = [prefix, group_id, aggregator, part_index, list(part.size), part.dtype, int(part.compression)]
    fields.append(hashlib.sha256(part.buffer).digest())
    return hashlib.sha256(DOMAIN_PART + msgpack.packb(fields, use_bin_type=True)).digest()


def read_stamp(stamp: bytes) -> tuple[bytes, bytes]:
    """A sent part's [certificate or b"", signature]; raises ``Unverified``."""
    try:
        if len(stamp) > MAX_STAMP_BYTES:
            raise Unverified(f"a stamp of {len(stamp)} bytes")
        cert, signature = msgpack.unpackb(stamp, raw=False)
        if not isinstance(cert, bytes) or not isinstance(signature, bytes):
            raise Unverified("a stamp's fields are not bytes")
        return cert, signature
    except Unverified:
        raise
    except Exception as e:  # noqa: BLE001 - a stranger's bytes
        raise Unverified(f"the part's stamp does not decode ({type(e).__name__})") from None


def verify(key: Ed25519PublicKey, signature: bytes, digest: bytes) -> None:
    try:
        key.verify(signature, digest)
    except InvalidSignature:
        raise Unverified("the part's signature does not verify") from None


class Receipts:
    """The signed parts an aggregator receives in one round: each part's signature is checked as it arrives (a
    part without a valid one ends the sender's stream, which hivemind then leaves out of the round), and the last
    few of each sender are kept so that a refused one can become evidence."""

    def __init__(self, prefix: str, group_id: bytes, own_id: bytes, sender_ids: Sequence[Any], bans: Any = None):
        self.prefix, self.group_id, self.own_id, self.sender_ids = prefix, group_id, own_id, list(sender_ids)
        self.bans = bans  # ``bans.Bans``: an unsigned part counts as a refused round
        self._kept: dict[int, deque[tuple[int, runtime_pb2.Tensor, bytes, bytes]]] = {}

    async def checked(self, stream: AsyncIterator[Any], sender_index: int) -> AsyncIterator[Any]:
        sender, key, cert = str(self.sender_ids[sender_index]), None, b""
        kept = self._kept.setdefault(sender_index, deque(maxlen=KEEP_PER_SENDER))
        part_index = 0
        async for message in stream:
            try:
                stamp_cert, signature = read_stamp(message.peer_id)
                if key is None:
                    cert = stamp_cert
                    signer, key = read_cert(cert)
                    if signer != sender:
                        raise Unverified(f"its part key is certified for peer {signer}")
                part = message.tensor_part
                digest = await asyncio.get_running_loop().run_in_executor(
                    None, part_digest, self.prefix, self.group_id, self.own_id, part_index, part
                )
                verify(key, signature, digest)
            except Unverified as e:
                logger.warning("Refused the parts of peer %s in round %s: %s", sender, self.group_id.hex()[:8], e)
                if self.bans is not None:
                    self.bans.strike(sender, self.group_id, f"a part not signed by its key: {e}")
                raise
            kept.append((part_index, part, cert, signature))
            part_index += 1
            yield message

    def kept(self, sender_index: int, part_index: int) -> tuple[int, runtime_pb2.Tensor, bytes, bytes] | None:
        """Part ``part_index`` of a sender as received ([index, part, certificate, signature]), if still kept."""
        for index, part, cert, signature in self._kept.get(sender_index, ()):
            if index == part_index:
                return index, part, cert, signature
        return None
