"""Who aggregates in a group of peers behind NATs, and rounds that lost a part (group_rounds, nat)."""

from __future__ import annotations

from types import SimpleNamespace

import hivemind
import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer

from p2ptrain.group_rounds import GroupRounds, check_whole, with_shares
from p2ptrain.nat import aggregates, offered_addrs
from p2ptrain.reachability import Kind

D, M, N, S, U = Kind.DIRECT, Kind.MAPPED, Kind.NAT, Kind.SYMMETRIC_NAT, Kind.UNKNOWN


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ([D, N, N], [True, True, True]),  # hole punching joins the two behind NAT: everyone aggregates
        ([D, N, S], [True, False, False]),  # nobody reaches the symmetric one; it cannot reach the nat one
        ([M, S, S], [True, False, False]),
        ([U, N], [True, True]),  # the swarm's first peer, not checked yet, and a peer behind a port-keeping NAT
        ([S, S], [True, True]),  # nobody could: hivemind's own shares, the round fails or not as before
    ],
)
def test_who_aggregates(kinds, expected):
    assert aggregates(kinds) == expected


def test_every_member_derives_the_same_shares_from_the_gathered_reports():
    serializer = MSGPackSerializer
    peers = tuple(PeerID(bytes([i]) * 34) for i in range(3))
    gathered = tuple(
        serializer.dumps([[bandwidth, kind], 0, serializer.dumps({"epoch": 7})])
        for bandwidth, kind in ((100.0, "direct"), (50.0, "nat"), (None, "symmetric-nat"))
    )
    group = GroupInfo(b"group", peers, gathered)
    shared = with_shares(group, serializer)
    entries = [serializer.loads(x) for x in shared.gathered]
    assert [e[0] for e in entries] == [100.0, 0.0, 0.0]  # hivemind's load balancing now sees plain bandwidths
    assert all(serializer.loads(e[2]) == {"epoch": 7} for e in entries)
    assert shared.peer_ids == peers and shared.group_id == b"group"
    # a member that is no p2ptrain averager (a plain bandwidth) fails the round instead of being misread
    stock = GroupInfo(b"g", peers[:2], (gathered[0], serializer.dumps([10.0, 0, serializer.dumps(None)])))
    with pytest.raises(AllreduceException, match="did not report its reachability"):
        with_shares(stock, serializer)


def runner(failed: int, banned=()):
    return SimpleNamespace(
        tensor_part_container=SimpleNamespace(failed_size=failed, total_size=1000), banned_senders=set(banned)
    )


def test_a_round_that_lost_a_part_is_no_success(caplog):
    group = GroupInfo(b"g", tuple(PeerID(bytes([i]) * 34) for i in range(3)), ())
    check_whole(runner(0), group)  # whole: nothing said
    assert not caplog.records
    with pytest.raises(AllreduceException, match="25% of the vector came back from nobody"):
        check_whole(runner(250), group)
    check_whole(runner(0, banned=["QmLate"]), group)
    assert "QmLate sent nothing in time" in caplog.text


def test_a_public_peer_offers_its_internet_addresses_first():
    maddrs = [
        "/ip4/127.0.0.1/tcp/31337/p2p/QmX",
        "/ip4/10.0.0.2/tcp/31337/p2p/QmX",
        "/ip4/11.77.0.1/tcp/31337/p2p/QmX",
        "/ip4/11.77.0.9/tcp/4001/p2p/QmR/p2p-circuit/p2p/QmX",
        "/ip4/11.77.0.1/udp/31337/quic-v1/p2p/QmX",
    ]
    assert offered_addrs(maddrs) == ["/ip4/11.77.0.1/tcp/31337/p2p/QmX", "/ip4/10.0.0.2/tcp/31337/p2p/QmX"]


class Rounds(GroupRounds, DecentralizedAverager):
    pass


def test_real_averagers_behind_different_nats_average_exactly(tmp_path):
    """Three real hivemind averagers reporting direct, nat and symmetric-nat: the round completes and every
    member holds the exact mean (the symmetric one aggregated nothing, the others did)."""
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first] + [
        hivemind.DHT(start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        for _ in range(2)
    ]
    vectors = [torch.full((1000,), float(i)) for i in range(3)]
    averagers = [
        Rounds([v], dht=dht, prefix="test", target_group_size=3, min_matchmaking_time=2.0, request_timeout=1.0,
               reach_kind=kind, start=True)
        for v, dht, kind in zip(vectors, dhts, [D, N, S], strict=True)
    ]  # fmt: skip
    try:
        controls = [a.step(wait=False, timeout=30) for a in averagers]
        for control in controls:
            assert len(control.result(timeout=60)) == 3
        for averager in averagers:
            with averager.get_tensors() as (tensor,):
                assert torch.allclose(tensor, torch.full((1000,), 1.0))
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()
