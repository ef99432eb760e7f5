"""``--tensorboard``: the peer's curves written as TensorBoard scalars, read back with TensorBoard's own reader; and
a real peer that writes them."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from p2ptrain.energy.ledger import Ledger, ledger_path, save_ledger
from p2ptrain.fileio import atomic_write_json
from p2ptrain.tensorboard_log import TensorBoardLog


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_each_global_step_becomes_one_point_per_curve(tmp_path):
    data_dir, out = tmp_path / "peer", tmp_path / "tb"
    data_dir.mkdir()
    log = TensorBoardLog(data_dir, out)
    assert not log.write()  # no status yet: nothing, and no event file
    status = {"run_id": "run-1", "epoch": 1, "loss": 5.5, "val_loss": None, "samples_per_s": 10.0, "peers": 2,
              "rounds": {"ok": 1, "failed": {}}, "bytes_sent": 1000.0, "bytes_received": 1000.0}  # fmt: skip
    atomic_write_json(data_dir / "status.json", status)
    assert log.write() and not log.write()  # the same step again: nothing new
    atomic_write_json(data_dir / "status.json", {**status, "epoch": 2, "loss": 4.5, "val_loss": 4.9,
                                                 "rounds": {"ok": 1, "failed": {"timeout": 2}}})  # fmt: skip
    save_ledger(ledger_path(data_dir, "run-1"), Ledger(run_id="run-1", peer_id="Qm", cpu_j=3.6e6, g_co2e=475.0))
    assert log.write()
    log.close()
    found = scalars(out / "run-1")
    assert found["train/loss"] == [(1, 5.5), (2, 4.5)] and found["train/held_out_loss"] == [(2, pytest.approx(4.9))]
    assert found["averaging/rounds_failed"] == [(1, 0.0), (2, 2.0)] and found["swarm/peers"][-1] == (2, 2.0)
    assert found["energy/kwh"] == [(2, pytest.approx(1.0))] and found["energy/g_co2e"] == [(2, 475.0)]


@pytest.mark.slow
def test_a_peer_writes_its_curves(tmp_path):
    from p2ptrain.local_swarm import DEMO_PEER_FLAGS, DEMO_SWARM_FLAGS, LocalSwarm

    out = tmp_path / "tb"
    flags = (*DEMO_PEER_FLAGS, "--max-steps", "3", "--tensorboard", str(out))
    with LocalSwarm(tmp_path, swarm_flags=DEMO_SWARM_FLAGS, peer_flags=flags) as swarm:
        a = swarm.seed("a")
        a.proc.wait(180)
        assert a.proc.returncode == 0, a.log()[-3000:]
        run_id = a.status()["run_id"]
    found = scalars(out / run_id)
    steps = [step for step, _ in found["train/loss"]]  # read every 2 s: gpt2-tiny's steps can be quicker
    assert steps == sorted(set(steps)) and steps[-1] == 3, found
    assert "energy/kwh" in found and "TensorBoard curves in" in a.log()
