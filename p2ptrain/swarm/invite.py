"""Invites: one copy-pasteable string that lets a volunteer join a swarm.

Format (``protocols/invite.md``): ``p2pt1-`` + base64url(msgpack payload + 4-byte checksum), where
payload = {"h": manifest SHA-256 (32 bytes), "m": model name, "p": [bootstrap multiaddr, ...]} and
checksum = SHA-256(payload)[:4]. The hash is the trust anchor: the manifest fetched from the DHT
must hash to it. The checksum only catches copy-paste damage early with a clear message. An invite to a
private swarm also holds "a": its join token (``admission.Token``), which makes the invite a secret.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass

import msgpack

from p2ptrain.errors import InviteInvalid
from p2ptrain.swarm.admission import Token

PREFIX = "p2pt1-"
MAX_INVITE_CHARS = 4096
MAX_PEERS = 16
MAX_MADDR_CHARS = 256
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class Invite:
    manifest_hash: bytes  # SHA-256 of the canonical manifest
    model: str  # model name, so `join --model X --invite ...` can refuse a mismatch early
    peers: tuple[str, ...]  # bootstrap multiaddrs ending in /p2p/<peer id>
    token: Token | None = None  # a private swarm's join token

    def encode(self) -> str:
        fields = {"h": self.manifest_hash, "m": self.model, "p": list(self.peers)}
        if self.token is not None:
            fields["a"] = self.token.to_wire()
        payload = msgpack.packb(fields, use_bin_type=True)
        checksum = hashlib.sha256(payload).digest()[:4]
        return PREFIX + base64.urlsafe_b64encode(payload + checksum).decode().rstrip("=")


def decode_invite(text: str) -> Invite:
    """Parse an invite string.

    Raises:
        InviteInvalid: wrong prefix, truncated or damaged text, or fields of the wrong shape.
    """
    text = text.strip()
    if re.match(r"^p2pt[0-9]+-", text) and not text.startswith(PREFIX):
        raise InviteInvalid(
            f"this invite ({text.split('-')[0]}) needs a newer p2ptrain; this one reads {PREFIX}… invites."
        )
    if not text.startswith(PREFIX):
        raise InviteInvalid(
            f"an invite starts with {PREFIX!r}; got {text[:12]!r}… Copy the whole string the seed printed."
        )
    if len(text) > MAX_INVITE_CHARS:
        raise InviteInvalid(f"invite is longer than {MAX_INVITE_CHARS} characters")
    body = text[len(PREFIX) :]
    if not _BASE64URL.fullmatch(body):
        raise InviteInvalid("invite is damaged (characters outside base64url). Copy the whole string again.")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raise InviteInvalid("invite is truncated or damaged (not base64url). Copy the whole string again.") from None
    payload, checksum = raw[:-4], raw[-4:]
    if len(raw) < 5 or hashlib.sha256(payload).digest()[:4] != checksum:
        raise InviteInvalid("invite is truncated or altered (checksum mismatch). Copy the whole string again.")
    try:
        fields = msgpack.unpackb(payload, raw=False)  # size already bounded by MAX_INVITE_CHARS
    except (ValueError, msgpack.UnpackException):
        raise InviteInvalid("invite payload is not valid msgpack") from None
    if not isinstance(fields, dict) or not {"h", "m", "p"} <= set(fields) <= {"h", "m", "p", "a"}:
        raise InviteInvalid("invite payload must hold h, m, p (and a, a join token)")
    h, model, peers = fields["h"], fields["m"], fields["p"]
    if not (isinstance(h, bytes) and len(h) == 32 and isinstance(model, str) and 0 < len(model) <= 64):
        raise InviteInvalid("invite has a malformed manifest hash or model name")
    if not (isinstance(peers, list) and 0 < len(peers) <= MAX_PEERS):
        raise InviteInvalid(f"invite must list 1-{MAX_PEERS} bootstrap peers")
    for p in peers:
        if not (isinstance(p, str) and p.startswith("/") and "/p2p/" in p and len(p) <= MAX_MADDR_CHARS):
            raise InviteInvalid(f"invite peer {str(p)[:60]!r} is not a multiaddr ending in /p2p/<peer id>")
    token = Token.from_wire(fields["a"]) if "a" in fields else None
    return Invite(manifest_hash=h, model=model, peers=tuple(peers), token=token)
