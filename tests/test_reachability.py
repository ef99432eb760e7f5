"""Reachability: real peers dial the asker back at the address they see it at; the answers classify it."""

from __future__ import annotations

import socket
import time
from functools import partial

import hivemind
import pytest

from p2ptrain.swarm import reachability
from p2ptrain.swarm.reachability import Answer, Kind, ask, classify, serve


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dhts():
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    nodes = [first] + [
        hivemind.DHT(start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        for _ in range(2)
    ]
    yield nodes
    for dht in nodes:
        dht.shutdown()


def test_peers_dial_back_and_rate_limit(dhts):
    a, b, c = dhts
    a.run_coroutine(partial(serve, min_interval_s=0.0))
    c.run_coroutine(serve)  # the default: one dial-back per caller per 10 s
    port = reachability.listen_port(b.get_visible_maddrs())
    assert port

    answers = b.run_coroutine(partial(ask, port=port))  # b asks the peers it is connected to (a, maybe c)
    assert any(x.reachable and x.ip == "127.0.0.1" and x.port > 0 for x in answers), answers
    reach = classify(answers, port, {"127.0.0.1"})
    assert reach.kind == Kind.DIRECT and reach.describe() == f"reachable directly at 127.0.0.1:{port}"

    closed = closed_port()
    answers = b.run_coroutine(partial(ask, port=closed))
    assert answers and not any(x.reachable for x in answers)  # a dialed and failed; c, if asked, refuses: too often
    assert all(x.ip == "127.0.0.1" for x in answers)
    assert "forward TCP port" in classify(answers, closed, {"127.0.0.1"}).describe()


def test_answers_classify_the_peer():
    mine = {"10.0.0.2"}
    assert classify([], 31337, mine).kind == Kind.UNKNOWN
    assert classify([Answer(True, "10.0.0.2", 31337)], 31337, mine).kind == Kind.DIRECT
    mapped = classify([Answer(False, "8.8.4.4", 31337), Answer(True, "8.8.4.4", 31337)], 31337, mine)
    assert mapped.kind == Kind.MAPPED and mapped.public and "port mapped" in mapped.describe()
    cone = classify([Answer(False, "8.8.4.4", 31337), Answer(False, "8.8.4.4", 31337)], 31337, mine)
    assert cone.kind == Kind.NAT and cone.behind_nat and "hole punching" in cone.describe()
    symmetric = classify([Answer(False, "8.8.4.4", 40001), Answer(False, "8.8.4.4", 40002)], 31337, mine)
    assert symmetric.kind == Kind.SYMMETRIC_NAT and "forward TCP port 31337" in symmetric.describe()
    # one connection of a peer behind a port-keeping NAT came from another port (its dial collided with one from
    # the other side: seen in the NAT lab); most came from the listening port
    seen = (31337, 40001, 31337)
    assert classify([Answer(False, "8.8.4.4", p) for p in seen], 31337, mine).kind == Kind.NAT
    assert classify([Answer(False, "8.8.4.4", p) for p in seen[:2]], 31337, mine).kind == Kind.NAT
    mostly_others = [Answer(False, "8.8.4.4", p) for p in (40001, 40002, 31337)]
    assert classify(mostly_others, 31337, mine).kind == Kind.SYMMETRIC_NAT
    # a neighbour on the LAN got through, the internet did not: behind NAT, not reachable
    lan = classify([Answer(True, "10.0.0.3", 31337), Answer(False, "8.8.4.4", 31337)], 31337, mine)
    assert lan.kind == Kind.NAT and lan.ip == "8.8.4.4"


def test_a_bad_request_is_refused_not_crashing():
    with pytest.raises(ValueError):
        reachability.Message.FromString(b"\x92\x01\x02")  # a list, not a map
    with pytest.raises(ValueError):
        reachability.Message.FromString(b"\x00" * 1000)


def test_a_check_nobody_answers_is_no_news(dhts, monkeypatch):
    """A peer answers one ask per caller per interval, so a check soon after another can find nobody to ask. The
    checker keeps its last finding then: a peer that took "not checked yet" for a finding saw the next one as a
    change of role and rejoined the swarm, again and again."""
    a, b, _ = dhts
    a.run_coroutine(serve)  # with the default interval
    for name, seconds in (("WATCH_ADDRESSES_S", 0.2), ("CHECK_EVERY_S", 0.5), ("UNKNOWN_RETRY_S", 0.5)):
        monkeypatch.setattr(reachability, name, seconds)
    first = reachability.check(b)
    assert first.kind == Kind.DIRECT
    changes = []
    checker = reachability.Checker(b, changes.append, first=first)
    checker.start()
    try:
        time.sleep(2 * reachability.MIN_INTERVAL_PER_CALLER_S)  # ~20 checks: a's answer to two or three of them
    finally:
        checker.stop()
    assert changes == []


def test_a_stay_whose_first_check_finds_nobody_takes_the_last_stays_finding(tmp_path):
    """Alone, nobody answers; a peer rejoining takes what its last stay found rather than "not checked yet" (from
    which its watch's next check would be a change of role, and another rejoin)."""
    from p2ptrain.settings import PeerSettings
    from p2ptrain.swarm.network import settle_role

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        settings = PeerSettings(data_dir=tmp_path, host="127.0.0.1")
        _, role = settle_role(settings, tmp_path, dht, "run", [])
        assert role.reach.kind == Kind.UNKNOWN
        last = reachability.Reach(Kind.DIRECT, "127.0.0.1", reachability.listen_port(dht.get_visible_maddrs()))
        same, role = settle_role(settings, tmp_path, dht, "run", [], previous=last)
        assert same is dht and role.reach == last and role.describe() == "aggregates and relays for peers behind NAT"
    finally:
        dht.shutdown()
