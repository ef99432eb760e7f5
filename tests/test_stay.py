"""A stay in the swarm that fails part-way still stops what it started, in reverse order (``peer.stay``).

In-process, with fakes for the DHT, the network role and the averagers: what is checked is the lifecycle's order
and its failure paths, which the real-process tests (test_peer, test_swarm) reach only when all goes well.
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest
import torch

from p2ptrain import peer
from p2ptrain.settings import PeerSettings
from p2ptrain.status import StatusWriter
from p2ptrain.swarm.identity import ensure_identity
from p2ptrain.swarm.joining import JoinRequest
from p2ptrain.train.tokenizer import load_tokenizer


class FakeDHT:
    client_mode = False

    def __init__(self, stopped: list[str]):
        self.stopped = stopped

    def add_validators(self, validators: list) -> None:
        pass

    def get_visible_maddrs(self) -> list:
        return []

    def shutdown(self) -> None:
        self.stopped.append("dht")


class FakeOptimizer:
    """The part of ``PeerOptimizer`` a shutdown uses."""

    def __init__(self, stopped: list[str]):
        self.stopped = stopped

    def cancel_rounds(self, forget: bool = False) -> None:
        pass

    def shutdown(self) -> None:
        self.stopped.append("averagers")


@pytest.fixture
def stay_parts(monkeypatch, manifest, tmp_path):
    """``peer.stay`` with the DHT, network role and optimizer faked; returns (run, stopped, fail_at)."""
    stopped: list[str] = []
    fail_at: dict[str, Exception] = {}

    def maybe_fail(name: str) -> None:
        if name in fail_at:
            raise fail_at[name]

    def start_dht(*args):
        maybe_fail("dht")
        return FakeDHT(stopped)

    def make_optimizer(*args, **kwargs):
        maybe_fail("optimizer")
        return FakeOptimizer(stopped)

    class Watch:
        def __init__(self, *args):
            maybe_fail("watch")

    role = SimpleNamespace(reach=SimpleNamespace(kind=SimpleNamespace(value="direct"), public=False))
    monkeypatch.setattr(peer.network, "start_dht", start_dht)
    monkeypatch.setattr(peer, "resolve_swarm", lambda dht, request, data_dir: (manifest, b"signed"))
    monkeypatch.setattr(peer.network, "settle_role", lambda settings, data_dir, dht, *rest: (dht, role))
    monkeypatch.setattr(peer, "make_optimizer", make_optimizer)
    monkeypatch.setattr(peer, "NetworkWatch", Watch)
    monkeypatch.setattr(peer, "reap_children", lambda known: stopped.append("reap"))
    settings = PeerSettings(data_dir=tmp_path)
    ensure_identity(tmp_path)  # run_peer makes it before any stay; its key signs the peer's DHT records
    status = StatusWriter(tmp_path / "status.json")
    tokenizer = load_tokenizer("bytes")
    run = peer.Run(
        settings, tmp_path, status, torch.device("cpu"), None, None, None, None, False, print, None,
        tokenizer=tokenizer, corpus=object(),
    )  # fmt: skip
    return run, stopped, fail_at


def test_a_part_that_fails_to_start_stops_only_what_was_started(stay_parts, caplog):
    run, stopped, fail_at = stay_parts
    fail_at["optimizer"] = RuntimeError("averager failed to start")
    with caplog.at_level(logging.INFO, logger="p2ptrain.leaving"), pytest.raises(RuntimeError, match="averager"):
        peer.stay(run, JoinRequest("gpt2-tiny"), threading.Event())
    assert stopped == ["dht", "reap"]
    assert run.dht is None and run.status.status.state == "stopping"
    assert "Stopped in" in caplog.text and "stop the DHT" in caplog.text and "averagers" not in caplog.text


def test_a_later_failure_stops_the_averagers_then_the_dht_then_reaps(stay_parts, caplog):
    run, stopped, fail_at = stay_parts
    fail_at["watch"] = RuntimeError("no network")
    with caplog.at_level(logging.INFO, logger="p2ptrain.leaving"), pytest.raises(RuntimeError, match="no network"):
        peer.stay(run, JoinRequest("gpt2-tiny"), threading.Event())
    assert stopped == ["averagers", "dht", "reap"]
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Stopped in"))
    order = ["say goodbye, stop the averagers", "checkpoint", "stop the DHT", "reap children"]
    at = [summary.index(f"{lap} ") for lap in order]
    assert at == sorted(at), summary


def test_a_dht_that_fails_to_start_leaves_nothing_to_stop(stay_parts):
    run, stopped, fail_at = stay_parts
    fail_at["dht"] = OSError("port in use")
    with pytest.raises(OSError):
        peer.stay(run, JoinRequest("gpt2-tiny"), threading.Event())
    assert stopped == ["reap"]


def test_a_rejoin_bootstraps_from_the_peers_met_before_the_invites(tmp_path):
    """Seen behind NATs: a volunteer whose relays were gone left to rejoin, bootstrapped from its invite's only peer
    (the seeder, killed), and exited ("none of the 1 initial peers answered") while a public peer it had met was up.
    A first stay uses the given peers alone; a rejoin tries the peers it remembers from this run first."""
    from p2ptrain.fileio import atomic_write_json
    from p2ptrain.swarm.invite import Invite
    from p2ptrain.swarm.joining import first_peers

    seeder, met = "/ip4/10.0.0.1/tcp/31337/p2p/QmSeeder", "/ip4/10.0.0.2/tcp/31337/p2p/QmMet"
    invite = Invite(model="gpt2-tiny", manifest_hash=bytes(32), peers=(seeder,))
    request = JoinRequest("gpt2-tiny", invite=invite)
    settings = PeerSettings(data_dir=tmp_path)
    assert first_peers(settings, request, tmp_path, rejoining=True) == ([seeder], [])  # nothing remembered yet
    atomic_write_json(tmp_path / "swarm.json", {"peers": [met, seeder]})
    assert first_peers(settings, request, tmp_path, rejoining=False) == ([seeder], [])
    assert first_peers(settings, request, tmp_path, rejoining=True) == ([met, seeder], [])
    assert first_peers(settings, JoinRequest("gpt2-tiny"), tmp_path, rejoining=False) == ([], [met, seeder])
