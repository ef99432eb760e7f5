"""Local checkpoints: one safetensors file per run, written atomically, never unpickled.

Layout of ``<data_dir>/runs/<run_id>/checkpoint.safetensors``:
- tensors ``model.<name>``: the model's parameters (tied weights stored once, under their first name);
- tensors ``opt.<param index>.<key>``: the optimizer's per-parameter state (AdamW moments, step);
- metadata ``p2ptrain``: JSON with the epoch, local step count, manifest hash, the peer settings that
  produced it, the optimizer's param groups and any non-tensor state.

A kill at any moment leaves the previous checkpoint intact (``fileio.atomic_write``), plus temporary
files as large as a checkpoint: the next save removes them, so repeated crashes cannot fill the disk.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from p2ptrain.errors import CheckpointError
from p2ptrain.fileio import atomic_write

logger = logging.getLogger(__name__)
FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointInfo:
    epoch: int  # global step (hivemind local_epoch) the parameters belong to
    local_steps: int  # forward/backward passes this peer has done in the run (data sampling key)
    manifest_hash: str  # hex; a checkpoint of another swarm is never loaded
    settings: dict[str, Any]  # the resolved peer settings, for the record


def checkpoint_path(data_dir: Path, run_id: str) -> Path:
    return data_dir / "runs" / run_id / "checkpoint.safetensors"


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer_state: dict, info: CheckpointInfo) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():  # named_parameters() skips tied duplicates
        tensors[f"model.{name}"] = param.detach().to("cpu").contiguous().clone()
    plain_state: dict[str, dict[str, Any]] = {}
    for index, values in optimizer_state["state"].items():
        if not isinstance(values, dict):  # hivemind stores local_epoch here as a plain int
            plain_state[str(index)] = values
            continue
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                plain_state.setdefault(str(index), {})[key] = value
    meta = {
        "format": FORMAT_VERSION,
        "epoch": info.epoch,
        "local_steps": info.local_steps,
        "manifest_hash": info.manifest_hash,
        "settings": info.settings,
        "param_groups": optimizer_state["param_groups"],
        "plain_state": plain_state,
    }
    metadata = {"p2ptrain": json.dumps(meta, default=str)}
    remove_abandoned_writes(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    logger.debug("Checkpoint written: %s (epoch %d)", path, info.epoch)


def remove_abandoned_writes(path: Path) -> None:
    """Delete the temporary files a killed save left next to ``path`` (only this peer writes there).

    Two kinds: ours (``.checkpoint.safetensors.*.tmp``, see ``fileio.atomic_write``) and the one
    safetensors itself writes before renaming it to ours (``.tmp`` + 6 characters).
    """
    stale = [*path.parent.glob(f".{path.name}.*.tmp"), *path.parent.glob(".tmp??????")]
    for tmp in stale:
        tmp.unlink(missing_ok=True)
        logger.info("Removed %s, left by an interrupted checkpoint write", tmp.name)


def load_checkpoint(path: Path, model: torch.nn.Module, manifest_hash: str) -> tuple[CheckpointInfo, dict]:
    """Copy saved parameters into ``model``; return the info and the optimizer state dict to load.

    Raises:
        CheckpointError: the file is unreadable, of another swarm, or does not fit the model.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get("p2ptrain")
        tensors = load_file(str(path))
        meta = json.loads(raw_meta) if raw_meta else None
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        message = f"checkpoint {path} is unreadable ({e}). Move it away to start from the swarm's state."
        raise CheckpointError(message) from None
    required = {"format", "epoch", "local_steps", "manifest_hash", "settings", "param_groups", "plain_state"}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION or not required <= set(meta):
        raise CheckpointError(f"checkpoint {path} has no complete p2ptrain metadata of format {FORMAT_VERSION}")
    if meta["manifest_hash"] != manifest_hash:
        raise CheckpointError(
            f"checkpoint {path} belongs to swarm manifest {meta['manifest_hash'][:16]}…, not {manifest_hash[:16]}…. "
            "Use another --data-dir or move the old run away."
        )
    try:
        return _restore(path, model, tensors, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # metadata of the right keys, wrong shapes
        raise CheckpointError(f"checkpoint {path} has malformed metadata ({e}). Move it away.") from None


def _restore(path: Path, model: torch.nn.Module, tensors: dict, meta: dict) -> tuple[CheckpointInfo, dict]:
    with torch.no_grad():
        for name, param in model.named_parameters():
            saved = tensors.get(f"model.{name}")
            if saved is None or saved.shape != param.shape or saved.dtype != param.dtype:
                raise CheckpointError(f"checkpoint {path} does not fit the model at parameter {name!r}")
            param.copy_(saved)
    state: dict[Any, Any] = {}
    for key, tensor in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            if not (index.isascii() and index.isdigit()):
                raise CheckpointError(f"checkpoint {path} has a malformed optimizer tensor {key!r}")
            state.setdefault(int(index), {})[name] = tensor
    for index, values in meta["plain_state"].items():
        if isinstance(values, dict):
            state.setdefault(int(index), {}).update(values)
        else:  # e.g. hivemind's "local_epoch"
            state[index] = values
    info = CheckpointInfo(int(meta["epoch"]), int(meta["local_steps"]), str(meta["manifest_hash"]), meta["settings"])
    return info, {"state": state, "param_groups": list(meta["param_groups"])}
