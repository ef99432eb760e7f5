"""One real peer process: with nobody to join it starts a swarm, and Ctrl+C stops it cleanly."""

from __future__ import annotations

import signal

import psutil
import pytest

from p2ptrain.local_swarm import DEMO_PEER_FLAGS, LocalSwarm

pytestmark = pytest.mark.slow(alone=False)  # one peer: under one core


def test_lonely_join_starts_a_swarm_and_ctrl_c_exits_within_10_s(tmp_path):
    with LocalSwarm(tmp_path, peer_flags=DEMO_PEER_FLAGS) as swarm:
        peer = swarm.join("solo")
        status = swarm.wait_for(peer, lambda s: s.get("local_steps", 0) >= 3, 120, "training steps")
        assert status["run_id"].startswith("gpt2-tiny-") and status["invite"].startswith("p2pt1-")
        assert "No swarm found for gpt2-tiny: starting a new one" in peer.log()
        assert f"p2ptrain join --model gpt2-tiny --invite {status['invite']}" in peer.log()

        children = psutil.Process(peer.proc.pid).children(recursive=True)
        assert any(p.name() == "p2pd" for p in children)
        seconds = swarm.stop(peer, signal.SIGINT, timeout_s=30)
        assert seconds <= 10, f"Ctrl+C took {seconds:.1f} s"
        assert peer.proc.returncode == 130  # like a shell's Ctrl+C
        _, alive = psutil.wait_procs(children, timeout=10)  # torch's shm helper ends ~4 s after its client
        assert not alive, f"orphans after Ctrl+C: {alive}"
        assert peer.status()["state"] == "stopped" and peer.status()["checkpoint_epoch"] is not None
