"""The prober between real hivemind DHT nodes: it pings members, moves its coordinate, and publishes a signed near
record that other members read; a node that does not sign cannot place a record under another peer's id."""

from __future__ import annotations

import hivemind
from conftest import swarm_node
from hivemind.utils import get_dht_time

from p2ptrain.swarm.discovery import members_key
from p2ptrain.swarm.proximity import Coord, Prober, encode_near, near_key, read_near, shard_of

RUN = "near-run"


def test_probers_measure_each_other_and_publish_signed_records(tmp_path):
    nodes: list[hivemind.DHT] = []
    probers: list[Prober] = []
    try:
        for name in ("a", "b", "c"):
            nodes.append(swarm_node(tmp_path / name, RUN, nodes[0].get_visible_maddrs() if nodes else []))
        ids = [node.peer_id.to_base58() for node in nodes]
        for node, peer in zip(nodes, ids, strict=True):
            assert node.store(members_key(RUN), b"m", get_dht_time() + 60, subkey=peer)
        nodes[0].store(members_key(RUN), b"m", get_dht_time() + 60, subkey="not-a-peer-id")  # refused: unsigned
        probers = [Prober(node, RUN, every_s=60, read_every_s=0) for node in nodes]
        for _ in range(3):  # three cycles: coordinates of the others are known from the second on
            for prober in probers:
                prober.probe_once()
        a = probers[0]
        assert sorted(a.members) == sorted(ids[1:])
        for other in ids[1:]:
            measured = a.neighbours.get(other)
            assert measured is not None and 0 < measured.rtt_ms < 1000  # loopback, through the daemons
        records = read_near(nodes[1], RUN)
        assert set(records) == set(ids)
        assert set(records[ids[0]].neighbours) == set(ids[1:])
        # moved by samples against the others' published coordinates (its error may stay 1.0: loopback round trips
        # on a loaded machine vary by more than they measure)
        assert (a.vivaldi.coord.x, a.vivaldi.coord.y) != (0.0, 0.0)
        # a node that is not a swarm member (no validator of its own) cannot write a near record for a member
        forger = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                              initial_peers=nodes[0].get_visible_maddrs())  # fmt: skip
        nodes.append(forger)
        fake = encode_near(Coord(1e4, 1e4, 0.0, 0.0), [])
        forger.store(near_key(RUN, shard_of(ids[2])), fake, get_dht_time() + 60, subkey=ids[2])
        assert read_near(nodes[1], RUN)[ids[2]].coord != Coord(1e4, 1e4, 0.0, 0.0)
    finally:
        for prober in probers:
            prober.stop()
        for node in nodes:
            node.shutdown()
