"""LAN discovery (mDNS, --p2p py): a peer on the same LAN finds the swarm with no invite and no address.

Two network namespaces on one bridge stand in for two PCs of a café: a researcher's `p2ptrain seed` in one,
a volunteer's bare `p2ptrain join --model gpt2-tiny --p2p py` in the other.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import netns

from p2ptrain.local_swarm import DEMO_SWARM_FLAGS, LocalSwarm

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from bench_wan import Namespaces, namespaces_available  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not namespaces_available(), reason="needs root and `ip netns` for two LAN hosts"),
]
PEER_FLAGS = ("--port", "0", "--threads", "1", "--batch-size", "8", "--validate-every", "0", "--p2p", "py")


def test_a_volunteer_on_the_lan_finds_the_swarm_without_an_invite(tmp_path):
    before = netns()
    lan = Namespaces(2)
    try:
        with LocalSwarm(tmp_path, swarm_flags=DEMO_SWARM_FLAGS, peer_flags=PEER_FLAGS) as swarm:
            seed = swarm.seed("seed", prefix=lan.prefix(0))
            run_id = swarm.wait_for(seed, lambda s: s.get("state") == "training", 120, "training")["run_id"]
            volunteer = swarm.join("volunteer", prefix=lan.prefix(1))
            # and, beside it, the same bare join without mDNS: it starts a swarm of its own (discovery is what
            # makes the difference)
            alone = swarm.join("alone", "--no-mdns", prefix=lan.prefix(1))
            status = swarm.wait_for(volunteer, lambda s: s.get("state") == "training", 120, "training")
            assert status["run_id"] == run_id, volunteer.log()[-3000:]
            assert "Found 1 peer(s) on the LAN" in volunteer.log()
            status = swarm.wait_for(alone, lambda s: s.get("state") == "training", 120, "training")
            assert status["run_id"] != run_id
    finally:
        lan.remove()
    assert netns() == before
