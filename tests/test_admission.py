"""Private swarms: join tokens, passes and revocations (``swarm/admission.py``), the invites that carry them, and
real averagers that refuse peers without a pass (``train/group_rounds.py``)."""

from __future__ import annotations

import asyncio
import logging
import time

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.averaging import DecentralizedAverager
from hivemind.utils import get_dht_time

from p2ptrain.errors import InviteInvalid
from p2ptrain.local_swarm import loopback_dhts
from p2ptrain.swarm.admission import (
    Admission,
    NotAdmitted,
    Token,
    grant,
    make_pass,
    read_revocations,
    sign_revocations,
)
from p2ptrain.swarm.discovery import passes_key
from p2ptrain.swarm.invite import Invite, decode_invite
from p2ptrain.swarm.manifest import public_key_bytes
from p2ptrain.train.group_rounds import GroupRounds

RUN = "private-run"
PEER, OTHER = b"\x00\x24peer-a" + bytes(30), b"\x00\x24peer-b" + bytes(30)


@pytest.fixture
def author():
    return Ed25519PrivateKey.generate()


def rules(author, own_pass=b"", clock=time.time) -> Admission:
    return Admission(RUN, public_key_bytes(author), own_pass, clock)


def refusal(admission: Admission, peer: bytes, shown: object) -> str:
    with pytest.raises(NotAdmitted) as e:
        admission.check(peer, shown)
    return str(e.value)


def test_the_author_a_token_holder_and_a_delegates_invitee_are_admitted(author):
    token = grant(author, RUN, 3600)
    delegate = grant(author, RUN, 3600, invite=True)
    invitee = grant(delegate.signer(), RUN, 7200, chain=delegate.chain)
    check = rules(author)
    check.check(PEER, make_pass(RUN, PEER, author=author))
    check.check(PEER, make_pass(RUN, PEER, token=token))
    check.check(PEER, make_pass(RUN, PEER, token=invitee))
    assert invitee.grants[-1].expires == delegate.grants[-1].expires  # a delegated grant cannot outlive its parent
    assert not invitee.grants[-1].invite


def test_no_pass_garbage_and_oversized_passes_are_refused(author):
    check = rules(author)
    assert "no pass" in refusal(check, PEER, None)
    assert "no pass" in refusal(check, PEER, b"")
    assert "malformed" in refusal(check, PEER, msgpack.packb([1, 2]))
    assert "msgpack" in refusal(check, PEER, b"\xc1")
    assert "over 1024 bytes" in refusal(check, PEER, b"x" * 2000)


def test_forged_tokens_and_passes_are_refused(author):
    stranger = Ed25519PrivateKey.generate()
    assert "forged" in refusal(rules(author), PEER, make_pass(RUN, PEER, token=grant(stranger, RUN, 3600)))
    assert "forged" in refusal(rules(author), PEER, make_pass(RUN, PEER, author=stranger))
    # a pass is bound to its peer id: copied by another peer, it is worthless
    assert "another peer id" in refusal(rules(author), OTHER, make_pass(RUN, PEER, token=grant(author, RUN, 3600)))
    # a grant altered after signing (a later expiry)
    token = grant(author, RUN, 3600)
    body, signature = token.chain[0]
    raw = msgpack.unpackb(body)
    raw["expires"] += 10**6
    altered = Token(((msgpack.packb(raw), signature),), token.secret)
    assert "forged" in refusal(rules(author), PEER, make_pass(RUN, PEER, token=altered))


def test_expired_tokens_and_tokens_of_another_swarm_are_refused(author):
    token = grant(author, RUN, 60)
    later = rules(author, clock=lambda: time.time() + 120)
    assert "expired" in refusal(later, PEER, make_pass(RUN, PEER, token=token))
    other = grant(author, "another-run", 3600)
    assert "another swarm" in refusal(rules(author), PEER, make_pass(RUN, PEER, token=other))


def test_only_an_inviting_grant_may_sign_grants(author):
    plain = grant(author, RUN, 3600)
    with pytest.raises(NotAdmitted, match="may not invite"):
        grant(plain.signer(), RUN, 3600, chain=plain.chain)
    # made by hand, around grant()'s own refusal: the checker refuses it too
    forged = Token((*plain.chain, grant(plain.signer(), RUN, 3600).chain[0]), plain.secret)
    forged = Token(forged.chain, Ed25519PrivateKey.generate().private_bytes_raw())
    assert "may not invite" in refusal(rules(author), PEER, _pass_with_chain(forged.chain, forged.signer()))


def _pass_with_chain(chain, signer) -> bytes:
    message = b"p2ptrain/v1/pass\x00" + RUN.encode() + b"\x00" + PEER
    return msgpack.packb([[list(link) for link in chain], signer.sign(message)], use_bin_type=True)


def test_revoked_tokens_are_refused_and_only_the_authors_newest_revocations_count(author):
    token, kept = grant(author, RUN, 3600), grant(author, RUN, 3600)
    check = rules(author)
    revoked_id = token.grants[-1].id
    assert not check.take_revocations(sign_revocations(Ed25519PrivateKey.generate(), RUN, [revoked_id]))  # forged
    assert not check.take_revocations(b"\x00junk")
    assert check.take_revocations(sign_revocations(author, RUN, [revoked_id], issued=100.0))
    assert "revoked" in refusal(check, PEER, make_pass(RUN, PEER, token=token))
    check.check(PEER, make_pass(RUN, PEER, token=kept))
    assert not check.take_revocations(sign_revocations(author, RUN, [], issued=50.0))  # an older list: replayed
    assert "revoked" in refusal(check, PEER, make_pass(RUN, PEER, token=token))
    assert not check.take_revocations(sign_revocations(author, "another-run", [], issued=200.0))
    assert read_revocations(check.revocation_record, public_key_bytes(author)) == (RUN, [revoked_id], 100.0)


def test_a_private_invite_carries_its_token_and_a_damaged_token_is_refused(author):
    token = grant(author, RUN, 3600)
    invite = Invite(bytes(32), "gpt2-tiny", ("/ip4/203.0.113.7/tcp/1/p2p/QmPeer",), token)
    assert decode_invite(invite.encode()) == invite
    assert decode_invite(Invite(bytes(32), "gpt2-tiny", invite.peers).encode()).token is None  # an open swarm's
    wrong_secret = Invite(bytes(32), "gpt2-tiny", invite.peers, Token(token.chain, bytes(32)))
    with pytest.raises(InviteInvalid, match="secret key does not match"):
        decode_invite(wrong_secret.encode())
    assert "valid until" in token.describe()


# -- real averagers -----------------------------------------------------------------------------------------------


class Rounds(GroupRounds, DecentralizedAverager):
    pass


StockRounds = type("Rounds", (DecentralizedAverager,), {})  # stock hivemind, its handlers named as p2ptrain's are


def test_a_stock_hivemind_peer_without_a_token_is_refused_and_cannot_download_state(author, tmp_path):
    """Two members of a private swarm (its author, and a peer with an invite) average; a stock hivemind averager on
    the same key prefix asks to join and to download their state: refused, and the honest side says so."""
    token = grant(author, RUN, 3600)
    # the averagers run (and log) in processes of their own, forked with this handler
    log = logging.FileHandler(tmp_path / "averagers.log")
    log.setFormatter(logging.Formatter("%(asctime)s %(process)d %(message)s"))
    logging.getLogger("p2ptrain.train.group_rounds").addHandler(log)
    dhts = loopback_dhts(3)
    refused = dhts[2].peer_id.to_base58()
    a_pass = make_pass(RUN, dhts[0].peer_id.to_bytes(), author=author)
    b_pass = make_pass(RUN, dhts[1].peer_id.to_bytes(), token=token)
    common = dict(prefix="priv", target_group_size=3, min_matchmaking_time=3.0, request_timeout=1.0, start=True)
    a = Rounds([torch.zeros(8)], dht=dhts[0], admission=rules(author, a_pass), **common)
    b = Rounds([torch.ones(8)], dht=dhts[1], admission=rules(author, b_pass), **common)
    common["prefix"] = "priv_p2pt4"  # the key prefix p2ptrain's averagers use
    stranger = StockRounds([torch.full((8,), 100.0)], dht=dhts[2], **common)
    try:
        # before any round, passes are known from the DHT records peers publish; the stranger has none. It offers
        # its state too, first in line (its averager declares it in the DHT): b must not take it
        stranger.state_sharing_priority = 10.0
        time.sleep(1.0)  # declared (hivemind re-declares when the priority changes)
        for dht, shown in ((dhts[0], a_pass), (dhts[1], b_pass)):
            dht.store(passes_key(RUN), shown, get_dht_time() + 60, subkey=dht.peer_id.to_base58())
        assert stranger.load_state_from_peers(timeout=10) is None
        loaded = b.load_state_from_peers(timeout=10)
        assert loaded is not None and torch.equal(loaded[1][0], torch.zeros(8))
        controls = [x.step(wait=False, timeout=15) for x in (a, b)]
        time.sleep(1.0)  # the stranger comes while a and b gather their group
        stranger_step = stranger.step(wait=False, timeout=10, allow_retries=False)
        for control in controls:
            assert len(control.result(timeout=30)) == 2  # a and b, without the stranger
        with a.get_tensors() as (tensor,):
            assert torch.allclose(tensor, torch.full((8,), 0.5))
        with pytest.raises(Exception):  # noqa: B017, PT011 - hivemind raises whatever its matchmaking ran into
            stranger_step.result(timeout=30)
    finally:
        for averager in (a, b, stranger):
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
        logging.getLogger("p2ptrain.train.group_rounds").removeHandler(log)
    logs = (tmp_path / "averagers.log").read_text()
    assert f"Refused peer {refused} in private swarm {RUN}: it showed no pass" in logs
    # once a minute per peer in each averager (its process id in the line), not once per request
    assert len({line for line in logs.splitlines() if "Refused peer" in line}) <= 2


def test_a_leader_refuses_a_join_request_without_a_valid_pass(author):
    """The leader's side alone (in the swarm test above, followers also refuse a group with a stranger in it)."""
    from types import SimpleNamespace

    from hivemind.p2p import PeerID
    from hivemind.proto import averaging_pb2
    from hivemind.utils import MSGPackSerializer

    leader = object.__new__(Rounds)  # its handler and checks only: no process, no DHT
    leader.admission, leader.serializer = rules(author), MSGPackSerializer
    leader._admitted, leader._refused_logged, leader._revocations_read = {}, {}, time.monotonic()
    leader.bans = SimpleNamespace(banned=lambda _peer: False)
    stranger, member = PeerID(b"\x00\x24" + bytes(range(36))), PeerID(b"\x00\x24" + bytes(range(1, 37)))

    def answers(peer: PeerID, shown: bytes | None) -> list[int]:
        reported = [1.0, "direct"] if shown is None else [1.0, "direct", shown]
        request = averaging_pb2.JoinRequest(gather=MSGPackSerializer.dumps([reported, 0, b""]))
        context = SimpleNamespace(remote_id=peer)

        async def collect() -> list[int]:
            return [m.code async for m in leader.rpc_join_group(request, context)]

        return asyncio.run(collect())

    assert answers(stranger, None) == [averaging_pb2.PROTOCOL_VIOLATION]
    assert answers(stranger, make_pass(RUN, member.to_bytes(), author=author)) == [averaging_pb2.PROTOCOL_VIOLATION]
    assert leader._refusal(member, make_pass(RUN, member.to_bytes(), author=author)) == ""
