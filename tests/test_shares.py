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
