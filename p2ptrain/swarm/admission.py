"""Admission to a private swarm: join tokens signed by the seeder, and passes that bind a token to one peer id.

A private swarm (manifest ``admission = "token"``) averages only with peers that show a valid **pass**. The chain
of trust starts at the manifest's author key, which the invite pins through the manifest hash:

- a **grant** says "the holder of Ed25519 key K may take part in run R until time T" (``invite``: and may sign
  grants for others, i.e. the seeder delegated invitations to it). It carries a random 8-byte id, the handle by
  which the author revokes it. The author signs the first grant of a chain; a delegated key may sign one more.
- a **token** is what an invite carries: the chain of signed grants and the secret key of the last one. Whoever
  holds the invite holds the token, so an invite of a private swarm is a secret, as a door key is.
- a **pass** is what a peer shows others: the chain, and a signature by the last grant's key over the run and the
  peer's own id. It holds no secret: a pass copied by another peer is worthless, since every check compares it
  with the peer id the libp2p handshake authenticated. The seeder signs its own pass with the author key.
- **revocations**: a list of grant ids, signed by the author and published in the DHT (``revoked_key``); a pass
  whose chain holds a revoked id is refused, as is one whose grant has expired.

Formats (msgpack): grant = {"run", "key", "id", "expires", "invite"}; signed grant = [grant bytes, signature];
token = {"c": [signed grant, ...], "s": secret}; pass = [[signed grant, ...], signature]; revocation record =
{"payload": {"run", "ids", "issued"} bytes, "signature"}. ``protocols/admission.md`` specifies them.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from p2ptrain.errors import InviteInvalid

logger = logging.getLogger(__name__)

MAX_CHAIN = 2  # the author's grant, and at most one more signed by a key the author delegated to
MAX_PASS_BYTES = 1024
MAX_REVOKED = 4096
MAX_REVOCATION_BYTES = 64 + 12 * MAX_REVOKED
_GRANT_CONTEXT = b"p2ptrain/v1/grant\x00"
_PASS_CONTEXT = b"p2ptrain/v1/pass\x00"
_REVOKED_CONTEXT = b"p2ptrain/v1/revoked\x00"


class NotAdmitted(Exception):
    """A pass that does not admit this peer to this run; the message says why."""


@dataclass(frozen=True)
class Grant:
    run: str
    key: bytes  # the holder's Ed25519 public key, 32 bytes
    id: bytes  # 8 random bytes: what a revocation names
    expires: int  # unix seconds
    invite: bool  # may sign grants for others (delegation)

    def encode(self) -> bytes:
        return msgpack.packb(
            {"run": self.run, "key": self.key, "id": self.id, "expires": self.expires, "invite": self.invite},
            use_bin_type=True,
        )

    @classmethod
    def decode(cls, data: bytes) -> Grant:
        raw = _unpack(data, 512)
        if not isinstance(raw, dict) or set(raw) != {"run", "key", "id", "expires", "invite"}:
            raise NotAdmitted("a grant must hold exactly run, key, id, expires, invite")
        grant = cls(**raw)
        if not (
            isinstance(grant.run, str)
            and _is_bytes(grant.key, 32)
            and _is_bytes(grant.id, 8)
            and isinstance(grant.expires, int)
            and isinstance(grant.invite, bool)
        ):
            raise NotAdmitted("a grant has fields of the wrong type")
        return grant


@dataclass(frozen=True)
class Token:
    """What an invite to a private swarm carries: a chain of signed grants and the last grant's secret key."""

    chain: tuple[tuple[bytes, bytes], ...]  # (grant bytes, signature by the previous key / the author)
    secret: bytes  # the Ed25519 private key (raw 32 bytes) of the last grant's key

    @property
    def grants(self) -> list[Grant]:
        return [Grant.decode(body) for body, _ in self.chain]

    def to_wire(self) -> dict:
        return {"c": [list(link) for link in self.chain], "s": self.secret}

    @classmethod
    def from_wire(cls, raw: object) -> Token:
        """Raises: InviteInvalid (malformed)."""
        if not (isinstance(raw, dict) and set(raw) == {"c", "s"} and _is_bytes(raw["s"], 32)):
            raise InviteInvalid("the invite's join token is malformed")
        chain = raw["c"]
        if not (isinstance(chain, list) and 0 < len(chain) <= MAX_CHAIN):
            raise InviteInvalid(f"the invite's join token must hold 1-{MAX_CHAIN} grants")
        for link in chain:
            if not (
                isinstance(link, list) and len(link) == 2 and isinstance(link[0], bytes) and _is_bytes(link[1], 64)
            ):
                raise InviteInvalid("the invite's join token holds a malformed grant")
        token = cls(tuple((body, sig) for body, sig in chain), raw["s"])
        try:
            grants = token.grants
        except NotAdmitted as e:
            raise InviteInvalid(f"the invite's join token is malformed: {e}") from None
        if _public(_private(token.secret)) != grants[-1].key:
            raise InviteInvalid("the invite's join token: its secret key does not match its grant")
        return token

    def signer(self) -> Ed25519PrivateKey:
        """The last grant's key, which signs this holder's pass (and, if its grant allows, grants for others)."""
        return _private(self.secret)

    def describe(self) -> str:
        last = self.grants[-1]
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(last.expires))
        return f"join token {last.id.hex()} (valid until {until}{', may invite others' if last.invite else ''})"


def grant(signer: Ed25519PrivateKey, run: str, lifetime_s: float, invite: bool = False, chain: tuple = ()) -> Token:
    """A new token for ``run``: a fresh key, granted by ``signer`` (the author; or the holder of ``chain``'s last
    grant, which must allow inviting) for ``lifetime_s`` seconds. A delegated grant cannot outlive its parent."""
    expires = int(time.time() + lifetime_s)
    if chain:
        parent = Grant.decode(chain[-1][0])
        if not parent.invite or len(chain) >= MAX_CHAIN:
            raise NotAdmitted("this join token may not invite others: ask the seeder for an invite that can")
        expires, invite = min(expires, parent.expires), False
    key = Ed25519PrivateKey.generate()
    body = Grant(run, _public(key), secrets.token_bytes(8), expires, invite).encode()
    return Token((*chain, (body, signer.sign(_GRANT_CONTEXT + body))), _raw_private(key))


def make_pass(run: str, peer_id: bytes, token: Token | None = None, author: Ed25519PrivateKey | None = None) -> bytes:
    """This peer's pass: signed by its token's key, or by the author's key itself (the seeder, chain empty)."""
    signer = author if token is None else token.signer()
    chain = [] if token is None else [list(link) for link in token.chain]
    return msgpack.packb([chain, signer.sign(_pass_message(run, peer_id))], use_bin_type=True)


class Admission:
    """The admission rules of one private swarm, as one peer applies them: checks others' passes, carries its own.

    ``own_pass``: what this peer shows; ``clock``: unix time (tests move it). Revocations arrive with
    ``take_revocations`` (a record from the DHT, checked here)."""

    def __init__(self, run: str, author_key: bytes, own_pass: bytes, clock: Callable[[], float] = time.time):
        self.run, self.author_key, self.own_pass, self.clock = run, author_key, own_pass, clock
        self.revoked: frozenset[bytes] = frozenset()
        self.revocations_issued = 0.0
        self.revocation_record: bytes | None = None  # the newest valid one, verbatim: members republish it

    def check(self, peer_id: bytes, pass_bytes: object) -> None:
        """Raises: NotAdmitted, naming why (no pass, forged, expired, revoked, for another run or peer)."""
        if not isinstance(pass_bytes, bytes) or not pass_bytes:
            raise NotAdmitted("it showed no pass (no join token: not invited to this private swarm)")
        if len(pass_bytes) > MAX_PASS_BYTES:
            raise NotAdmitted(f"its pass is over {MAX_PASS_BYTES} bytes")
        raw = _unpack(pass_bytes, MAX_PASS_BYTES)
        if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], list) and _is_bytes(raw[1], 64)):
            raise NotAdmitted("its pass is malformed")
        chain, signature = raw
        if len(chain) > MAX_CHAIN:
            raise NotAdmitted(f"its pass has a chain of {len(chain)} grants (at most {MAX_CHAIN})")
        key, now = self.author_key, self.clock()
        for depth, link in enumerate(chain):
            if not (
                isinstance(link, list) and len(link) == 2 and isinstance(link[0], bytes) and _is_bytes(link[1], 64)
            ):
                raise NotAdmitted("its pass holds a malformed grant")
            body, grant_sig = link
            if not _verifies(key, grant_sig, _GRANT_CONTEXT + body):
                who = "the swarm's author" if depth == 0 else "the key that delegated it"
                raise NotAdmitted(f"its join token is forged (a grant not signed by {who})")
            g = Grant.decode(body)
            if g.run != self.run:
                raise NotAdmitted(f"its join token is for another swarm ({g.run[:64]!r})")
            if g.id in self.revoked:
                raise NotAdmitted(f"its join token {g.id.hex()} was revoked by the swarm's author")
            if g.expires <= now:
                raise NotAdmitted(f"its join token {g.id.hex()} expired {now - g.expires:.0f} s ago")
            if depth < len(chain) - 1 and not g.invite:
                raise NotAdmitted("its join token was signed by a key that may not invite others")
            key = g.key
        if not _verifies(key, signature, _pass_message(self.run, peer_id)):
            raise NotAdmitted("its pass was made for another peer id, or is forged")

    def take_revocations(self, record: object) -> bool:
        """Adopt a revocation record if it is valid, for this run, and newer than the one held. True if adopted."""
        try:
            run, ids, issued = read_revocations(record, self.author_key)
        except NotAdmitted as e:
            logger.warning("Ignoring a revocation record for swarm %s: %s", self.run, e)
            return False
        if run != self.run or issued <= self.revocations_issued:
            return False
        self.revoked, self.revocations_issued, self.revocation_record = frozenset(ids), issued, record
        logger.info("Swarm %s: %d join token(s) revoked by its author", self.run, len(ids))
        return True


def sign_revocations(author: Ed25519PrivateKey, run: str, ids: list[bytes], issued: float | None = None) -> bytes:
    """The record that revokes the grants ``ids`` of ``run`` (all of them: a newer record replaces an older one)."""
    if len(ids) > MAX_REVOKED:
        raise ValueError(f"at most {MAX_REVOKED} revoked join tokens per swarm")
    issued = time.time() if issued is None else issued
    payload = msgpack.packb({"run": run, "ids": sorted(set(ids)), "issued": float(issued)}, use_bin_type=True)
    return msgpack.packb({"payload": payload, "signature": author.sign(_REVOKED_CONTEXT + payload)}, use_bin_type=True)


def read_revocations(record: object, author_key: bytes) -> tuple[str, list[bytes], float]:
    """Raises: NotAdmitted (malformed, oversized, or not signed by ``author_key``)."""
    if not isinstance(record, bytes) or len(record) > MAX_REVOCATION_BYTES:
        raise NotAdmitted("not bytes, or too large")
    raw = _unpack(record, MAX_REVOCATION_BYTES)
    if not (isinstance(raw, dict) and set(raw) == {"payload", "signature"} and isinstance(raw["payload"], bytes)):
        raise NotAdmitted("malformed")
    if not (
        _is_bytes(raw["signature"], 64) and _verifies(author_key, raw["signature"], _REVOKED_CONTEXT + raw["payload"])
    ):
        raise NotAdmitted("not signed by the swarm's author")
    payload = _unpack(raw["payload"], MAX_REVOCATION_BYTES)
    if not (isinstance(payload, dict) and set(payload) == {"run", "ids", "issued"}):
        raise NotAdmitted("malformed payload")
    run, ids, issued = payload["run"], payload["ids"], payload["issued"]
    if not (isinstance(run, str) and isinstance(ids, list) and isinstance(issued, float)):
        raise NotAdmitted("payload fields of the wrong type")
    if len(ids) > MAX_REVOKED or not all(_is_bytes(i, 8) for i in ids):
        raise NotAdmitted("malformed list of ids")
    return run, ids, issued


def _pass_message(run: str, peer_id: bytes) -> bytes:
    return _PASS_CONTEXT + run.encode() + b"\x00" + peer_id


def _verifies(public: bytes, signature: bytes, message: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def _unpack(data: bytes, limit: int) -> object:
    if len(data) > limit:
        raise NotAdmitted(f"over {limit} bytes")
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=limit, max_str_len=limit)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise NotAdmitted(f"not valid msgpack ({e})") from None


def _is_bytes(value: object, size: int) -> bool:
    return isinstance(value, bytes) and len(value) == size


def _public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _raw_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def _private(raw: bytes) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(raw)
