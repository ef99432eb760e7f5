"""Reachability: real peers dial the asker back at the address they see it at."""

from __future__ import annotations

import socket
from functools import partial

import hivemind
import pytest

from p2ptrain import reachability
from p2ptrain.reachability import UNKNOWN, ask, serve, verdict


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
    c.run_coroutine(serve)  # the default: one dial-back per caller per 30 s
    port = reachability.listen_port(b.get_visible_maddrs())
    assert port

    answers = b.run_coroutine(partial(ask, port=port))  # b asks the peers it is connected to (a, maybe c)
    assert (True, "127.0.0.1") in answers
    assert verdict(b.get_visible_maddrs(), answers).startswith(
        f"reachable directly (a peer connected back to 127.0.0.1:{port})"
    )

    closed = closed_port()
    answers = b.run_coroutine(partial(ask, port=closed))
    assert answers and not any(ok for ok, _ in answers)  # a dialed and failed; c, if asked, refuses: too often
    assert all(ip == "127.0.0.1" for _, ip in answers)
    assert "forward TCP port" in verdict([f"/ip4/127.0.0.1/tcp/{closed}"], answers)


def test_verdicts():
    tcp = ["/ip4/10.0.0.2/tcp/31337"]
    assert verdict(tcp, []) == UNKNOWN
    assert verdict(tcp, [(False, "203.0.113.9")]).startswith("not reachable from the internet: forward TCP port 31337")
    assert verdict(tcp, [(False, "x"), (True, "203.0.113.9")]).startswith("reachable directly")
    assert verdict([*tcp, "/ip4/198.51.100.1/tcp/4001/p2p/QmRelay/p2p-circuit"], [(False, "x")]) == (
        "reachable only through a relay"
    )
    assert verdict(["/ip4/10.0.0.2/udp/4001/quic-v1"], []) == "not reachable: this peer does not listen on TCP"


def test_a_bad_request_is_refused_not_crashing():
    with pytest.raises(ValueError):
        reachability.Message.FromString(b"\x92\x01\x02")  # a list, not a map
    with pytest.raises(ValueError):
        reachability.Message.FromString(b"\x00" * 1000)
