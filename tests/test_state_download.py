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
