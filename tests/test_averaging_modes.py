"""Three real peers on 127.0.0.1 converge in each averaging mode with the codecs that change its code path.

(int8 is a level of the adaptive ladder and round-trips in test_codecs; none/fp16 run in test_swarm.)
"""

from __future__ import annotations

import re

import pytest

from p2ptrain.local_swarm import DEMO_PEER_FLAGS, LocalSwarm

pytestmark = pytest.mark.slow
EPOCHS = 8


@pytest.mark.parametrize(
    "mode, codec",
    [
        ("gradients", "randk-int2"),  # random-k on 2-bit values; int8's random-k as a level of adaptive's ladder
        pytest.param("gradients", "randk", marks=pytest.mark.extended),
        ("gradients", "powersgd"),
        pytest.param("local", "randk", marks=pytest.mark.extended),  # local-adaptive runs the same path, and more
        ("local", "adaptive"),
    ],
)
def test_three_peers_converge(tmp_path, mode, codec):
    swarm_flags = (
        *("--target-batch-size", "96", "--matchmaking-time", "2", "--averaging-timeout", "15"),
        *("--warmup-epochs", "2", "--lr", "3e-3", "--averaging", mode, "--compression", codec),
    )
    peer_flags = (*DEMO_PEER_FLAGS, "--max-steps", str(EPOCHS), "--validate-every", str(EPOCHS))
    with LocalSwarm(tmp_path, swarm_flags=swarm_flags, peer_flags=peer_flags) as swarm:
        a = swarm.seed("a", "--wait-for-peers", "3")
        invite = swarm.invite(a)
        peers = [a, *(swarm.join(name, "--invite", invite, "--wait-for-peers", "3") for name in "bc")]
        for peer in peers:
            peer.proc.wait(300)
            assert peer.proc.returncode == 0, peer.log()[-3000:]
    for peer in peers:
        history = peer.status()["val_history"]  # [global step, held-out loss] pairs
        (_, first), (last_step, last) = history[0], history[-1]
        assert last_step == EPOCHS and last < first - 0.8, (peer.name, history)
    for peer in peers:  # what the dashboard shows: the rounds' outcomes and payload (train/round_log.py)
        status = peer.status()
        done = [r for r in status["last_rounds"] if r["ok"]]
        assert status["rounds"]["ok"] >= 1 and done and all(r["peers"] >= 2 for r in done), status["last_rounds"]
        if codec == "powersgd":  # its payload is not estimated
            assert status["bytes_sent"] == 0 and all(r["bytes"] is None for r in done)
        else:
            assert status["bytes_sent"] == status["bytes_received"] > 0
            assert abs(status["bytes_sent"] - sum(r["bytes"] for r in done)) <= len(done)  # rounded per round
            assert all(r["seconds"] > 0 for r in done), done  # how long each all-reduce took
    if mode == "local":  # every round is logged with its codec; groups hold more than one peer
        rounds = re.findall(r"Round \d+: (\d) peers, codec ([\w\- .]+),", a.log())
        assert len(rounds) >= EPOCHS - 2 and max(int(n) for n, _ in rounds) >= 2, a.log()[-3000:]
        assert len(rounds) - 1 <= a.status()["rounds"]["ok"] <= len(rounds)  # the last may end after the status
        if codec == "adaptive":
            assert len({c for _, c in rounds}) >= 2  # the level moved as the link proved fast
