"""Shares of a group's vector by measured uplinks (shares.py)."""

from __future__ import annotations

import math

import pytest

from p2ptrain.train.shares import BANDWIDTH_BOUND, MIN_MEASURED_BYTES, bounded, uplink


def test_reported_bandwidths_are_bounded_by_the_groups_median():
    liar = 1e12
    assert bounded([1e6, 2e6, 3e6, liar]) == [1e6, 2e6, 3e6, BANDWIDTH_BOUND * 2.5e6]
    assert bounded([None, 0.0, 1e6]) == [None, 0.0, 1e6]  # not measured / cannot aggregate: as they were
    assert bounded(["fast", math.nan, -1.0, math.inf, True]) == [None] * 5  # what a stranger may put there
    assert bounded([None, None]) == [None, None]


def test_an_uplink_is_what_the_part_streams_sent_together():
    parts = MIN_MEASURED_BYTES // 2
    assert uplink({1: (parts // 2, 1.0)}) is None  # within the buffers on the way: tells nothing
    assert uplink({1: (parts, 1.0), 2: (parts, 1.0), 3: (parts, 1.0)}) == pytest.approx(3 * parts)
    # one aggregator slow to receive: the sends before it finished ran at the uplink's rate, not at its
    assert uplink({1: (parts, 1.0), 2: (parts, 1.0), 3: (parts, 5.0)}) == pytest.approx(2.2 * parts)


def test_each_part_streams_rate_reaches_the_near_record():
    from hivemind.p2p import PeerID

    from p2ptrain.swarm.proximity import Coord, Neighbours, decode_near, encode_near
    from p2ptrain.train.shares import MIN_LINK_BYTES, link_rates

    ids = [PeerID(bytes([0x00, 0x04, i, i, i, i])) for i in range(3)]
    rates = link_rates({1: (2_000_000, 0.5), 2: (MIN_LINK_BYTES // 2, 0.01)}, ids)
    assert rates == {ids[1].to_base58(): pytest.approx(32.0)}  # 2 MB in 0.5 s; the small stream tells nothing
    neighbours = Neighbours()
    neighbours.rtt(ids[1].to_base58(), 12.0)
    neighbours.throughput(rates)
    neighbours.throughput({ids[1].to_base58(): 22.0})
    near = decode_near(encode_near(Coord(), neighbours.nearest()))
    assert near.neighbours[ids[1].to_base58()] == (12.0, pytest.approx(0.7 * 32.0 + 0.3 * 22.0))
