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
