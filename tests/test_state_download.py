"""A late joiner checks the state a peer serves against the other members' parameter sketches
(``train/state_download.py``), with real state averagers."""

from __future__ import annotations

import time
from functools import partial

import hivemind
import numpy as np
import torch
from hivemind.utils import get_dht_time

from p2ptrain.train.optimizers import StateRounds
from p2ptrain.train.param_check import encode_sketch, sketch, sketch_key
from p2ptrain.train.state_download import close

RUN = "served-state"
EPOCH = 5


def test_a_served_state_must_agree_with_the_other_members_not_with_its_server():
    honest = torch.randn(4, 64)
    member = np.asarray(sketch([honest], RUN, EPOCH))
    assert close(member, member) and close(member * 1.01, member)  # the fp16 state averaging some members took
    for poison in (-member, 1000 * member, member + 1.0, np.random.default_rng(0).normal(size=member.shape)):
        assert not close(poison.astype(np.float32), member)
    assert not close(np.full_like(member, np.nan), member)


def test_a_late_joiner_refuses_a_liars_state_and_takes_the_members(tmp_path):
    """Two honest members and a liar serve state at global step 5; the liar's parameters are sign-flipped and it is
    first in line (highest sharing priority), and it published a sketch that matches its own lie. The joiner takes
    the members' state."""
    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first] + [
        hivemind.DHT(start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        for _ in range(3)
    ]
    make = partial(StateRounds, optimizer=partial(torch.optim.SGD, lr=0.1), prefix="served", run_id=RUN, start=True)
    weights = torch.linspace(-1, 1, 1024).reshape(32, 32)  # a sketch samples 256 coordinates
    servers, values = [], (weights, weights, -weights)  # two members, then the liar
    for dht, value in zip(dhts[:3], values, strict=True):
        server = make(dht=dht, params=[torch.nn.Parameter(value.clone())])
        server.local_epoch = EPOCH
        dht.store(
            sketch_key(RUN, EPOCH), encode_sketch(EPOCH, sketch([value], RUN, EPOCH)), get_dht_time() + 60,
            subkey=dht.peer_id.to_base58(),
        )  # fmt: skip
        servers.append(server)
    servers[2].state_sharing_priority = 10.0
    own = torch.nn.Parameter(torch.zeros(32, 32))
    joiner = make(dht=dhts[3], params=[own])
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and joiner.local_epoch != EPOCH:
            joiner.load_state_from_peers(timeout=15)  # until the servers' offers are in the DHT
            time.sleep(0.5)
        assert joiner.local_epoch == EPOCH
        assert torch.equal(own.detach(), weights)  # the members' state, not the liar's -weights
    finally:
        for averager in (*servers, joiner):
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_a_state_served_while_its_server_steps_is_of_one_step():
    """A server that steps all the time (each step adds 1 to every parameter and to its global step) serves a state
    in which every tensor holds the same step, the one its metadata names. hivemind streams the live tensors, each
    read when its turn comes, and moves their storage into shared memory while the optimizer writes it: without
    ``WholeStepState`` the download here hangs, or the process crashes."""
    import threading

    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    second = hivemind.DHT(start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    make = partial(StateRounds, optimizer=partial(torch.optim.SGD, lr=1.0), prefix="stepping", run_id="", start=True)
    params = [torch.nn.Parameter(torch.zeros(1 << 20)) for _ in range(8)]
    server = make(dht=first, params=params)
    joiner = make(dht=second, params=[torch.nn.Parameter(torch.zeros(1 << 20)) for _ in range(8)])
    stop = threading.Event()

    def keep_stepping() -> None:
        while not stop.is_set():
            for param in params:
                param.grad = torch.full_like(param, -1.0)
            server.step(optimizer_step=True, increment_epoch=True)

    def download_three() -> list[tuple[int, list[float], bool]]:
        loaded, deadline = [], time.monotonic() + 60
        while time.monotonic() < deadline and len(loaded) < 3:
            before = server.local_epoch
            joiner.load_state_from_peers(timeout=15)
            if joiner.local_epoch > before:  # an offer was found and taken
                got = joiner.main_parameters
                loaded.append((joiner.local_epoch, sorted({float(p[0]) for p in got}), all(
                    torch.all(p == p[0]) for p in got)))  # fmt: skip
        return loaded

    stepper = threading.Thread(target=keep_stepping, daemon=True)
    stepper.start()
    try:
        result: dict = {}
        loader = threading.Thread(target=lambda: result.update(loaded=download_three()), daemon=True)
        loader.start()
        loader.join(90)  # live tensors moved to shared memory under a running step hang both (or crash the process)
        assert not loader.is_alive(), "the download hung: the server's step and its state server wait on each other"
        loaded = result["loaded"]
        assert len(loaded) == 3 and server.local_epoch > loaded[-1][0], (loaded, server.local_epoch)
        for epoch, values, whole in loaded:
            assert whole and values == [float(epoch)], loaded
    finally:
        stop.set()
        stepper.join(10)
        for averager in (server, joiner):
            averager.shutdown()
        for dht in (first, second):
            dht.shutdown()


def test_a_state_download_whose_stream_does_not_open_moves_on_to_the_next_peer(monkeypatch, caplog):
    """hivemind opens a download's stream without a bound: a dial through a relay that is gone held a resync for
    over two minutes (seen in the `[py]` NAT test). The stub is a daemon that never opens the stream."""
    import asyncio
    import logging
    from types import SimpleNamespace

    from p2ptrain.train import group_rounds

    class NeverOpens:
        async def rpc_download_state(self, request):  # noqa: ANN001, ANN201
            await asyncio.sleep(3600)

    monkeypatch.setattr(group_rounds, "OPEN_S", 0.3)
    owner = SimpleNamespace(admission=None, check_served_state=None, next_chunk_timeout=None, request_timeout=1.0)
    download = group_rounds._CheckedDownload(NeverOpens(), "QmGone", owner)

    async def main() -> list:
        return [message async for message in await download.rpc_download_state(None)]

    caplog.set_level(logging.INFO)
    started = time.monotonic()
    assert asyncio.run(main()) == []  # empty: hivemind skips it for the next peer ("did not send its state")
    assert time.monotonic() - started < 2.0
    assert "Peer QmGone did not open a state download within 0.3 s" in caplog.text
