"""network.py's pure parts: when a peer behind NAT tries hole punching again, and how it counts its connections."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from p2ptrain.swarm.reachability import direct_peers
from p2ptrain.swarm.watch import PUNCH_GRACE_S, PUNCH_SPACING_S, PunchSchedule, connection_kinds, ours_to_punch


def test_a_relayed_member_is_tried_after_the_grace_then_no_sooner_than_the_spacing_and_a_bounded_number_of_times():
    schedule = PunchSchedule(grace_s=20.0, spacing_s=150.0, tries=3)
    assert schedule.due({"B"}, set(), now=0.0) == []  # go-libp2p's own try comes first
    assert schedule.due({"B"}, set(), now=19.0) == []
    assert schedule.due({"B"}, set(), now=20.0) == ["B"]
    assert schedule.due({"B"}, set(), now=30.0) == []  # the routers still remember that try
    assert schedule.due({"B"}, set(), now=169.0) == []
    assert schedule.due({"B"}, set(), now=170.0) == ["B"]
    assert schedule.due({"B"}, set(), now=320.0) == ["B"]
    assert schedule.due({"B"}, set(), now=10_000.0) == []  # three tries, then its parts go through a relay


def test_a_punched_hole_that_closes_gets_fresh_tries_but_still_no_sooner_than_the_spacing():
    schedule = PunchSchedule(grace_s=20.0, spacing_s=150.0, tries=1)
    assert schedule.due({"B"}, set(), now=0.0) == []
    assert schedule.due({"B"}, set(), now=20.0) == ["B"]
    assert schedule.due(set(), {"B"}, now=25.0) == []  # direct now
    # the direct connection closes and a relayed one opens: go-libp2p tries, then after the grace, spaced, we do
    assert schedule.due({"B"}, set(), now=100.0) == []
    assert schedule.due({"B"}, set(), now=125.0) == []  # past the grace, but 105 s after the last try
    assert schedule.due({"B"}, set(), now=170.0) == ["B"]


def test_members_are_scheduled_each_on_its_own_clock():
    schedule = PunchSchedule()
    assert schedule.due({"B"}, set(), now=0.0) == []
    assert schedule.due({"B", "C"}, set(), now=PUNCH_GRACE_S) == ["B"]
    assert schedule.due({"B", "C"}, set(), now=2 * PUNCH_GRACE_S) == ["C"]
    assert schedule.due({"B", "C"}, set(), now=PUNCH_GRACE_S + PUNCH_SPACING_S) == ["B"]


def test_of_two_members_behind_nat_the_one_with_the_smaller_id_starts_hole_punching():
    relayed_only = {"Qm2", "Qm9", "QmPublic"}
    behind_nat = {"Qm1", "Qm2", "Qm5", "Qm9"}
    assert ours_to_punch(relayed_only, behind_nat, me="Qm5") == {"Qm9", "QmPublic"}
    assert ours_to_punch(relayed_only, behind_nat, me="Qm1") == relayed_only


def info(peer: str, *addrs: str) -> SimpleNamespace:
    return SimpleNamespace(peer_id=SimpleNamespace(to_base58=lambda: peer), addrs=list(addrs))


def test_connections_are_counted_by_kind_and_a_peer_with_one_direct_connection_is_reached_directly():
    infos = [
        info("S", "/ip4/11.77.0.1/tcp/31337"),
        info("B", "/ip4/11.77.0.1/tcp/31337/p2p/S/p2p-circuit"),
        info("B", "/ip4/11.77.0.6/tcp/31337"),
        info("C", "/ip4/11.77.0.1/tcp/31337/p2p/S/p2p-circuit"),
    ]
    assert direct_peers(infos) == {"S", "B"}
    assert connection_kinds(infos, punched_if_direct={"B", "C"}) == {"direct": 1, "hole-punched": 1, "relayed": 2}


def test_a_peer_whose_rounds_keep_failing_while_others_train_is_told_to_rejoin():
    from p2ptrain.train.keeping_up import StuckRounds

    stuck = StuckRounds(limit=3)
    assert [stuck.after(own_update=True, peers=4) for _ in range(3)] == [False, False, True]
    assert [stuck.after(own_update=True, peers=4) for _ in range(2)] == [False, False]  # counts again from 0
    assert stuck.after(own_update=False, peers=4) is False  # a round that worked
    assert [stuck.after(own_update=True, peers=1) for _ in range(5)] == [False] * 5  # alone: nobody to average with


def test_a_restart_in_a_new_role_dials_again_a_peer_that_is_back_a_moment_later(tmp_path, monkeypatch, caplog):
    """A volunteer behind NAT starts its DHT again in its new role, to the relays it met a moment ago; one that does
    not answer right then (its daemon busy, a router's mapping not open yet) is dialled again, not given up on."""
    import logging
    import queue
    import socket
    import threading
    import time

    import hivemind

    from p2ptrain.settings import PeerSettings
    from p2ptrain.swarm import nat, network
    from p2ptrain.swarm.identity import ensure_identity, p2p_identity_path

    caplog.set_level(logging.WARNING)
    monkeypatch.setattr(network, "RESTART_TRIES", 10)  # the relay's start takes seconds on a loaded machine
    monkeypatch.setattr(network, "RESTART_WAIT_S", 2.0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name in ("relay", "me"):
        (tmp_path / name).mkdir()
    relay_id = ensure_identity(tmp_path / "relay")
    ensure_identity(tmp_path / "me")
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{relay_id}"
    settings = PeerSettings(data_dir=tmp_path / "me", host="127.0.0.1", port=0)
    result: queue.Queue = queue.Queue()
    done = threading.Event()

    def restart() -> None:  # lives to the end: children die with the thread that forked them (die_with_parent)
        try:
            result.put(network.restart_dht(settings, tmp_path / "me", [address], nat.PUBLIC))
        except Exception as e:  # noqa: BLE001 - said by the test below
            result.put(e)
        done.wait(120)

    worker = threading.Thread(target=restart)
    worker.start()
    time.sleep(1.5)  # the first dial has failed by now
    relay = hivemind.DHT(start=True, host_maddrs=[f"/ip4/127.0.0.1/tcp/{port}"],
                         identity_path=str(p2p_identity_path(tmp_path / "relay")))  # fmt: skip
    try:
        dht = result.get(timeout=120)
        assert not isinstance(dht, Exception), dht
        assert "try 2 of 10" in caplog.text, caplog.text
        dht.shutdown()
    finally:
        done.set()
        worker.join(30)
        relay.shutdown()


@pytest.mark.slow(alone=False)  # 17 s of a sleeping daemon
def test_a_daemon_slow_to_start_is_waited_for(tmp_path, monkeypatch):
    """A Python daemon on a loaded machine took longer than hivemind's 15 s to start, and the volunteer rejoining
    through it exited ("Daemon failed to start in 15.0 seconds"): the peer waits ``DAEMON_START_S``. Here the
    daemon starts 17 s late."""
    import time

    from p2ptrain.settings import PeerSettings
    from p2ptrain.swarm import nat, network, p2p_stack
    from p2ptrain.swarm.identity import ensure_identity

    slow = tmp_path / "slow-p2pd"
    slow.write_text(f'#!/bin/sh\nsleep 17\nexec "{p2p_stack.python_daemon()}" "$@"\n')
    slow.chmod(0o755)
    monkeypatch.setattr(p2p_stack, "python_daemon", lambda: slow)
    (tmp_path / "me").mkdir()
    ensure_identity(tmp_path / "me")
    settings = PeerSettings(data_dir=tmp_path / "me", host="127.0.0.1", port=0, p2p="py", mdns=False)
    started = time.monotonic()
    dht = network.start_dht(settings, tmp_path / "me", [], [], nat.PUBLIC)
    try:
        assert time.monotonic() - started > 17
        assert dht.get_visible_maddrs()
    finally:
        dht.shutdown()
