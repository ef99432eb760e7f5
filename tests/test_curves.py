"""``--tensorboard`` and ``--wandb``: the peer's curves written as TensorBoard scalars, read back with TensorBoard's
own reader, and as a wandb run (offline: its log file, read back record by record). A real peer writes them in
test_swarm (peer d)."""

from __future__ import annotations

import json
import struct

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from p2ptrain.curves import CurveLog, TensorBoardSink, WandbSink
from p2ptrain.energy.ledger import Ledger, ledger_path, save_ledger
from p2ptrain.fileio import atomic_write_json


def scalars(directory) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_history(directory) -> dict[str, list[tuple[int, float]]]:
    """The points of the offline wandb run in ``directory``, from its ``run-*.wandb`` file: a header (":W&B", a
    magic number, a version), then LevelDB-log records (crc32, length, type; 32 KiB blocks) of wandb's protobuf
    ``Record``s."""
    from wandb.proto import wandb_internal_pb2

    (path,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    data, at, pieces, curves = path.read_bytes(), 7, b"", {}
    assert data[:4] == b":W&B"
    while at + 7 <= len(data):
        if 32768 - at % 32768 < 7:  # a block's tail too short for a header is padding
            at += 32768 - at % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[at : at + 7])
        pieces, at = pieces + data[at + 7 : at + 7 + length], at + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(pieces)
            pieces = b""
            if record.HasField("history"):
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in
                         record.history.item}  # fmt: skip
                for key, value in items.items():
                    if not key.startswith("_"):
                        curves.setdefault(key, []).append((record.history.step.num, value))
    return curves


@pytest.fixture
def fresh_wandb():
    """wandb reads its environment once per process (``wandb.setup``): each test starts it afresh."""
    wandb = pytest.importorskip("wandb")
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-runs"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-runs").mkdir()
    return tmp_path / "wandb-runs"


def test_each_global_step_becomes_one_point_per_curve(tmp_path, wandb_offline):
    data_dir, out = tmp_path / "peer", tmp_path / "tb"
    data_dir.mkdir()
    log = CurveLog(data_dir, [TensorBoardSink(out), WandbSink("p2ptrain-test")])
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
    for sink, found in (("tensorboard", scalars(out / "run-1")), ("wandb", wandb_history(wandb_offline))):
        assert found.get("train/loss") == [(1, 5.5), (2, 4.5)], (sink, found)
        assert found["train/held_out_loss"] == [(2, pytest.approx(4.9))]
        assert found["averaging/rounds_failed"] == [(1, 0.0), (2, 2.0)] and found["swarm/peers"][-1] == (2, 2.0)
        assert found["energy/kwh"] == [(2, pytest.approx(1.0))] and found["energy/g_co2e"] == [(2, 475.0)]


def test_a_wandb_that_cannot_start_costs_the_curves_not_the_training(tmp_path, monkeypatch, caplog, fresh_wandb):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: as with no network
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "5")
    data_dir = tmp_path / "peer"
    data_dir.mkdir()
    atomic_write_json(data_dir / "status.json", {"run_id": "run-1", "epoch": 1, "loss": 5.5})
    log = CurveLog(data_dir, [WandbSink("p2ptrain-test")])
    assert log.write()
    log.close()
    assert "wandb did not start" in caplog.text and "training goes on" in caplog.text
