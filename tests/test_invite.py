"""Invites survive a round trip and refuse damage with a clear message."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2ptrain.errors import InviteInvalid
from p2ptrain.swarm.invite import Invite, decode_invite

PEER = "/ip4/203.0.113.5/tcp/31337/p2p/QmSsYLSATJ1iNZWKdTPAeD8sFdXkidzkqyPwR7QeXuaxUw"


@given(
    manifest_hash=st.binary(min_size=32, max_size=32),
    model=st.text(min_size=1, max_size=64),
    ports=st.lists(st.integers(1, 65535), min_size=1, max_size=8),
)
def test_round_trip(manifest_hash, model, ports):
    invite = Invite(manifest_hash, model, tuple(f"/ip4/10.0.0.1/tcp/{p}/p2p/QmPeer" for p in ports))
    text = invite.encode()
    assert decode_invite(text) == invite
    assert decode_invite(f"  {text}\n") == invite  # pasted with whitespace around


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t[:-5], "truncated"),
        (lambda t: t[:-4], "truncated"),
        (lambda t: t[:20] + ("A" if t[20] != "A" else "B") + t[21:], "truncated or altered"),
        (lambda t: "hello", "starts with"),
        (lambda t: t.replace("p2pt1-", "p2pt9-"), "needs a newer p2ptrain"),
        (lambda t: t + "!", "outside base64url"),
        (lambda t: t + "A" * 5000, "longer than"),
    ],
)
def test_damage_is_refused(damage, message):
    text = Invite(b"\x01" * 32, "gpt2-small", (PEER,)).encode()
    with pytest.raises(InviteInvalid, match=message):
        decode_invite(damage(text))


def test_peers_must_be_dialable_multiaddrs():
    with pytest.raises(InviteInvalid, match="not a multiaddr"):
        decode_invite(Invite(b"\x01" * 32, "gpt2-small", ("203.0.113.5:31337",)).encode())
    with pytest.raises(InviteInvalid, match="1-16 bootstrap peers"):
        decode_invite(Invite(b"\x01" * 32, "gpt2-small", ()).encode())
