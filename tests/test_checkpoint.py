"""Checkpoints round-trip, refuse what is not theirs, and survive a kill mid-write."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import torch

from p2ptrain.errors import CheckpointError
from p2ptrain.train.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from p2ptrain.train.models import build_model


def trained_model_and_optimizer():
    model = build_model("gpt2-tiny", 257, 16, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.randint(0, 257, (2, 16))).logits.sum().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_parameters_and_optimizer_state(tmp_path):
    model, opt = trained_model_and_optimizer()
    state = opt.state_dict()
    state["state"]["local_epoch"] = 7  # hivemind keeps a plain int here
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, state, CheckpointInfo(7, 123, "ab" * 32, {"batch_size": 8}))

    fresh = build_model("gpt2-tiny", 257, 16, seed=1)
    info, loaded = load_checkpoint(path, fresh, "ab" * 32)
    assert (info.epoch, info.local_steps, info.settings) == (7, 123, {"batch_size": 8})
    for pa, pb in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(pa, pb)
    restored = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    loaded["state"].pop("local_epoch")
    restored.load_state_dict(loaded)
    for index, values in opt.state_dict()["state"].items():
        for key, value in values.items():
            assert torch.equal(restored.state_dict()["state"][index][key], value), (index, key)


def test_checkpoint_of_another_swarm_is_refused(tmp_path):
    model, opt = trained_model_and_optimizer()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, model, opt.state_dict(), CheckpointInfo(1, 1, "aa" * 32, {}))
    with pytest.raises(CheckpointError, match="belongs to swarm manifest"):
        load_checkpoint(path, model, "bb" * 32)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path, build_model("gpt2-tiny", 257, 16, seed=0), "aa" * 32)


WRITER = """
import sys, torch
from pathlib import Path
from p2ptrain.train.checkpoint import CheckpointInfo, save_checkpoint
model = torch.nn.Linear(2048, 2048)  # 16 MB per write: a wide window for the kill to land in
opt = torch.optim.SGD(model.parameters(), lr=0.1)
path = Path(sys.argv[1])
for epoch in range(10**6):
    with torch.no_grad():
        model.weight.fill_(epoch)
    save_checkpoint(path, model, opt.state_dict(), CheckpointInfo(epoch, epoch, "cc" * 32, {}))
    print(epoch, flush=True)
"""


def test_sigkill_during_writes_leaves_a_readable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    model = torch.nn.Linear(2048, 2048)
    for delay in (0.05, 0.13, 0.21, 0.37):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip()  # at least one checkpoint exists
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        info, _ = load_checkpoint(path, model, "cc" * 32)
        assert torch.all(model.weight == info.epoch)  # parameters are those of the epoch on record
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != path.name]
    assert all(name.startswith(".") and "tmp" in name for name in leftovers), leftovers  # temp files, never torn
    (tmp_path / ".tmpAbC123").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves it
    save_checkpoint(path, model, torch.optim.SGD(model.parameters()).state_dict(), CheckpointInfo(9, 9, "cc" * 32, {}))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the next save cleans up after the crashes
