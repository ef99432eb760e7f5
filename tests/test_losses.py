"""Each member's losses in the DHT for the swarm's health page (swarm/losses.py): written signed under the member's
own peer id, read from every shard, and anything else refused (real hivemind nodes)."""

from __future__ import annotations

import time

import hivemind
import pytest
from hivemind.utils import get_dht_time

from p2ptrain.swarm.identity import ensure_identity, identity_key
from p2ptrain.swarm.losses import decode_losses, losses_key, publish_losses, read_losses
from p2ptrain.swarm.proximity import shard_of
from p2ptrain.swarm.signed_records import PeerRecords

RUN = "losses-test"


@pytest.mark.parametrize(
    "value, expected",
    [
        ([7, 3.25, 3.5], (7, 3.25, 3.5)),
        ([0, 5, None], (0, 5.0, None)),  # an integer loss is a loss; no training loss yet
        ([7, float("nan"), 3.5], None),
        ([7, 3.25, float("inf")], None),
        ([7, -1.0, None], None),
        ([7, 1e9, None], None),
        ([True, 3.0, None], None),
        ([-1, 3.0, None], None),
        ([7, 3.0], None),
        ({"epoch": 7}, None),
        ([7, "3.0", None], None),
    ],
)
def test_only_well_formed_losses_are_read(value, expected):
    assert decode_losses(value) == expected


def test_members_losses_are_read_from_every_shard_and_forgeries_are_not(tmp_path):
    """Three members publish signed losses; a node that is no member (no validator) writes losses under one of their
    peer ids and under a made-up one: the readers keep the members' own."""
    nodes: list[hivemind.DHT] = []
    try:
        for i in range(3):
            (tmp_path / str(i)).mkdir()
            ensure_identity(tmp_path / str(i))
            identity = identity_key(tmp_path / str(i))
            validator = PeerRecords([RUN], identity)
            nodes.append(hivemind.DHT(
                start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], record_validators=[validator],
                identity_path=str(tmp_path / str(i) / "identity.key"),
                initial_peers=nodes[0].get_visible_maddrs() if nodes else [],
            ))  # fmt: skip
        ids = [node.peer_id.to_base58() for node in nodes]
        for i, node in enumerate(nodes):
            publish_losses(node, RUN, 10 + i, 3.0 + i, None if i == 2 else 2.5)
        deadline, found = time.monotonic() + 20, {}
        while time.monotonic() < deadline and set(found) != set(ids):
            found = read_losses(nodes[1], RUN)
            time.sleep(0.5)
        assert found == {ids[0]: (10, 3.0, 2.5), ids[1]: (11, 4.0, 2.5), ids[2]: (12, 5.0, None)}
        forger = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                              initial_peers=nodes[0].get_visible_maddrs())  # fmt: skip
        nodes.append(forger)
        forger.store(losses_key(RUN, shard_of(ids[0])), [99, 0.01, 0.01], get_dht_time() + 60, subkey=ids[0])
        made_up = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
        forger.store(losses_key(RUN, shard_of(made_up)), [99, 0.01, 0.01], get_dht_time() + 60, subkey=made_up)
        time.sleep(1.0)
        assert read_losses(nodes[2], RUN) == found
    finally:
        for node in nodes:
            node.shutdown()
