"""A real swarm on 127.0.0.1: `p2ptrain seed` + `join` processes training gpt2-tiny together.

One scenario, in order, because each stage builds on the swarm the previous one left:
three peers train → a late fourth catches up (and writes TensorBoard and wandb curves) → the swarm's health page
shows all four, in a browser too → one is SIGKILLed and the rest keep stepping → SIGTERM stops one within 10 s
leaving no process → it restarts from its checkpoint and identity → all leave at the same global step with matching
parameters, and held-out loss went down → `p2ptrain report --swarm`, read from the DHT after they left, equals the
sum of their ledger files.
"""

from __future__ import annotations

import json
import os
import signal
import time

import hivemind
import psutil
import pytest
import torch
from safetensors.torch import load_file
from test_curves import scalars, wandb_history
from test_dashboard import check_swarm_page

from p2ptrain.cli.app import main
from p2ptrain.energy.ledger import ledger_path, load_ledger
from p2ptrain.energy.records import LedgerValidator
from p2ptrain.local_swarm import DEMO_PEER_FLAGS, DEMO_SWARM_FLAGS, LocalSwarm
from p2ptrain.swarm.invite import decode_invite

pytestmark = pytest.mark.slow

FINAL_EPOCH = 40
SWARM_FLAGS = (*DEMO_SWARM_FLAGS, "--average-state-every", "4")
PEER_FLAGS = (*DEMO_PEER_FLAGS, "--checkpoint-every", "2", "--max-steps", str(FINAL_EPOCH))


def epoch_at_least(n: int):
    return lambda status: status.get("epoch", 0) >= n and status.get("state") == "training"


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def model_params(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.startswith("model.")}


# which libp2p daemon each peer runs: Go (the default; in CI), Go and Python mixed in one swarm (c, a Python peer,
# is the one SIGKILLed; b, another, is SIGTERMed and restarted), or all Python. The last two run with
# `pytest -m extended` (3-4 more minutes each; README, "Network stack").
DAEMONS = {
    "go": dict.fromkeys("abcd", "go"),
    "mixed": {"a": "go", "b": "py", "c": "py", "d": "go"},
    "py": dict.fromkeys("abcd", "py"),
}


@pytest.fixture
def dht_nodes():
    """DHT nodes a test starts in its own process, shut down however the test ends."""
    nodes: list[hivemind.DHT] = []
    yield nodes
    for node in nodes:
        node.shutdown()


@pytest.mark.parametrize(
    "daemons", ["go", pytest.param("mixed", marks=pytest.mark.extended), pytest.param("py", marks=pytest.mark.extended)]
)
def test_swarm_trains_survives_a_kill_and_stops_cleanly(tmp_path, monkeypatch, capsys, dht_nodes, daemons):
    monkeypatch.setenv("P2PTRAIN_LEDGER_EVERY_S", "5")  # the peers' energy ledgers (real codecarbon meter)
    monkeypatch.setenv("P2PTRAIN_COUNTRY", "FRA")
    p2p = {name: ("--p2p", kind) for name, kind in DAEMONS[daemons].items()}
    with LocalSwarm(tmp_path, swarm_flags=SWARM_FLAGS, peer_flags=PEER_FLAGS) as swarm:
        a = swarm.seed("a", "--wait-for-peers", "3", *p2p["a"])
        invite = swarm.invite(a)
        run_id = a.status()["run_id"]
        # a DHT node that outlives the peers, as a long-running volunteer would: it keeps their ledger records
        observer = hivemind.DHT(
            start=True,
            initial_peers=list(decode_invite(invite).peers),
            host_maddrs=["/ip4/127.0.0.1/tcp/0"],
            record_validators=[LedgerValidator([run_id])],
        )
        dht_nodes.append(observer)
        b = swarm.join("b", "--invite", invite, "--wait-for-peers", "3", *p2p["b"])
        c = swarm.join("c", "--invite", invite, "--wait-for-peers", "3", *p2p["c"])

        # three peers train together
        for peer in (a, b, c):
            swarm.wait_for(peer, epoch_at_least(4), 240, "global step 4")
        assert swarm.wait_for(a, lambda s: s.get("peers", 0) >= 3, 30, "3 peers seen")

        # a late joiner, given only a peer's address, finds the swarm by model in the DHT and
        # downloads its state instead of starting from scratch
        swarm_epoch = a.status()["epoch"]
        curves = ("--tensorboard", str(tmp_path / "tb"), "--wandb", "p2ptrain-test")
        wandb_env = ("env", "WANDB_MODE=offline", f"WANDB_DIR={tmp_path}", "WANDB_SILENT=true")
        d = swarm.join("d", "--initial-peers", decode_invite(invite).peers[0], *p2p["d"], *curves, prefix=wandb_env)
        status_d = swarm.wait_for(d, lambda s: s.get("state") == "training", 120, "training")
        status_d = swarm.wait_for(d, lambda s: s.get("loaded_state_from_peers_at") is not None, 60, "state from peers")
        assert status_d["loaded_state_from_peers_at"] >= swarm_epoch
        assert status_d["run_id"] == a.status()["run_id"]

        # the swarm's health page and a peer's own page, while the four train (test_dashboard.py)
        check_swarm_page(tmp_path, [a, b, c, d], viewer=b)

        # SIGKILL one peer: its hivemind children and p2pd die with it; the others keep stepping
        c_children = descendants(c.proc.pid)
        assert c_children, "a peer runs hivemind child processes"
        os.kill(c.proc.pid, signal.SIGKILL)
        c.proc.wait(5)
        psutil.wait_procs(c_children, timeout=10)
        assert not alive(c_children), f"orphans after SIGKILL: {alive(c_children)}"
        after_kill = max(a.status()["epoch"], d.status()["epoch"])
        for peer in (a, d):
            swarm.wait_for(peer, epoch_at_least(min(after_kill + 2, FINAL_EPOCH - 4)), 180, "steps after the kill")
        # the network watch's prober has measured round trips to members (swarm/proximity.py)
        near = swarm.wait_for(a, lambda s: bool(s.get("nearest")), 60, "round trips to the nearest members")
        assert all(peer != near["peer_id"] and 0 < ms < 1000 for peer, ms in near["nearest"]), near["nearest"]

        # SIGTERM: leaves within 10 s, exit code 0, no child process left, checkpoint written
        b_children = descendants(b.proc.pid)
        seconds = swarm.stop(b, signal.SIGTERM, timeout_s=30)
        assert seconds <= 10, f"SIGTERM took {seconds:.1f} s"
        assert b.proc.returncode == 0, b.log()[-2000:]
        psutil.wait_procs(b_children, timeout=10)  # torch's shm helper ends ~4 s after its client
        assert not alive(b_children), f"orphans after SIGTERM: {alive(b_children)}"
        stopped = b.status()
        assert stopped["state"] == "stopped" and stopped["checkpoint_epoch"] is not None

        # restart with no invite: same identity, resumes from its checkpoint, rejoins the remembered swarm
        b2 = swarm.join("b", *p2p["b"])
        restarted = swarm.wait_for(b2, lambda s: s.get("state") == "training", 120, "training after restart")
        assert restarted["peer_id"] == stopped["peer_id"]
        assert restarted["resumed_from_epoch"] == stopped["checkpoint_epoch"]
        assert restarted["run_id"] == stopped["run_id"]

        # everyone leaves by itself at FINAL_EPOCH
        deadline = time.monotonic() + 300
        for peer in (a, d, b2):
            peer.proc.wait(max(1, deadline - time.monotonic()))
            assert peer.proc.returncode == 0, f"{peer.name}: {peer.log()[-2000:]}"

    finals = {p.name: p.status() for p in (a, d, b2)}
    assert all(s["epoch"] == FINAL_EPOCH and s["checkpoint_epoch"] == FINAL_EPOCH for s in finals.values()), finals
    # peers compared their parameters with others' signed sketches after global steps, and found them equal
    compared = [c for s in finals.values() for c in s["param_history"] if c[2] > 0]
    assert compared and any(agreeing == others for _, agreeing, others, _ in compared), finals

    # the swarm's report card, from the DHT alone (every peer has left), is the sum of the peers' ledgers
    argv = ["report", "--swarm", "--run-id", run_id, "--initial-peers", str(observer.get_visible_maddrs()[0])]
    capsys.readouterr()
    assert main([*argv, "--json"], env={"HOME": str(tmp_path)}) == 0
    card = json.loads(capsys.readouterr().out)
    assert main(argv, env={"HOME": str(tmp_path)}) == 0
    text = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + text)  # the report card, for the record
    files = {name: load_ledger(ledger_path(tmp_path / name, run_id)) for name in ("a", "b", "c", "d")}
    rows = {row["peer_id"]: row for row in card["peers"]}
    assert set(rows) == {led.peer_id for led in files.values()}, (rows.keys(), files)
    for name in ("a", "b", "d"):  # they left cleanly: their last ledger was published before their DHT stopped
        led, row = files[name], rows[files[name].peer_id]
        assert (row["samples"], row["tokens"]) == (led.samples, led.tokens) and led.tokens > 0, name
        assert row["energy_kwh"] == led.energy_kwh > 0 and row["g_co2e"] == led.g_co2e > 0, name
        assert row["device_hours"] == led.device_s / 3600 and row["country"] == "FRA", name
    killed = rows[files["c"].peer_id]  # SIGKILLed: its record is its last publish, its file may be a tick newer
    assert 0 < killed["tokens"] <= files["c"].tokens
    published = [rows[led.peer_id] for led in files.values()]
    assert card["totals"]["tokens"] == sum(row["tokens"] for row in published)
    assert card["totals"]["energy_kwh"] == pytest.approx(sum(row["energy_kwh"] for row in published), rel=1e-12)
    assert card["totals"]["kg_co2e"] == pytest.approx(sum(row["g_co2e"] for row in published) / 1000, rel=1e-12)
    assert card["rejected_records"] == [] and card["model"] == "gpt2-tiny"

    # d wrote its curves, one point per global step, as TensorBoard scalars and as an offline wandb run
    found = scalars(tmp_path / "tb" / run_id)
    steps = [step for step, _ in found["train/loss"]]  # read every 2 s: gpt2-tiny's steps can be quicker
    assert steps == sorted(set(steps)) and steps[-1] == FINAL_EPOCH, found
    assert "energy/kwh" in found and "TensorBoard curves in" in d.log()
    assert [step for step, _ in wandb_history(tmp_path)["train/loss"]] == steps

    # held-out loss went down
    history = finals["a"]["val_history"]
    assert history[0][0] == 0 and history[-1][0] == FINAL_EPOCH
    assert history[-1][1] < history[0][1] - 0.5, history

    # after the last global step, all peers hold the run's final state bit for bit (end_of_run.py: peers that an
    # averaging round missed would be ~5e-3 apart, fp16-averaged ones ~5e-4)
    run = finals["a"]["run_id"]
    params = {name: model_params(tmp_path / name / "runs" / run / "checkpoint.safetensors") for name in ("a", "d", "b")}
    for other in ("d", "b"):
        for key, reference in params["a"].items():
            apart = (params[other][key] - reference).abs().max().item()
            assert torch.equal(params[other][key], reference), f"{other}: {key} {apart:.1e} apart"
