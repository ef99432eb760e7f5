"""The trained model as a Hugging Face directory (``p2ptrain export``), and text sampled from one (``generate``).

An export holds what ``transformers.AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
read: ``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer's files, and a model card
(``README.md``) that says where the weights come from: the swarm and its manifest, the global step and the tokens
trained, the held-out loss, and the energy and CO2 report card. The weights are this peer's checkpoint, which after
a global step holds the swarm's parameters (peers compare sketches of them: ``param_check.py``).

The model's embedding table is padded to a multiple of 64 tokens (``models.padded_vocab``); the generation config
suppresses the padding ids, which no text ever trained, so sampling never produces one.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from p2ptrain.errors import CheckpointError, ConfigError, DatasetError, PeerUnreachable
from p2ptrain.fileio import read_json
from p2ptrain.swarm import manifest as mf
from p2ptrain.swarm.joining import recall_swarm
from p2ptrain.swarm.pinned_files import where
from p2ptrain.train.checkpoint import checkpoint_path, load_checkpoint
from p2ptrain.train.models import build_model, count_parameters, evaluate
from p2ptrain.train.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

EVAL_BATCH = 16
MARKER = "<!-- p2ptrain export -->"  # in the model card: a directory p2ptrain may overwrite


@dataclass(frozen=True)
class Exported:
    path: Path
    run_id: str
    epoch: int  # the global step the weights belong to
    tokens: int  # tokens the swarm trained to reach it: global steps × target batch × sequence length
    val_loss: float | None  # held-out loss of the exported weights; None when the dataset is not here
    peers: int | None = None  # peers in the swarm at the exported step, as the exporter saw them; None: not known


def swarm_manifest(data_dir: Path, run_id: str | None = None) -> mf.SwarmManifest:
    """The manifest of the swarm this data directory last joined (checked: signed by its author)."""
    remembered = recall_swarm(data_dir)
    if not remembered.get("envelope"):
        raise ConfigError(f"{data_dir} has joined no swarm (--data-dir): nothing to export")
    manifest = mf.verify(base64.b64decode(remembered["envelope"]))
    if run_id is not None and manifest.run_id != run_id:
        raise ConfigError(f"{data_dir} last joined swarm {manifest.run_id}, not {run_id} (--run-id)")
    return manifest


def export(
    data_dir: Path, out: Path, run_id: str | None = None, overwrite: bool = False, measure: bool = True
) -> Exported:
    """Write the Hugging Face directory ``out`` from this data directory's checkpoint of its last swarm; ``measure``:
    the held-out loss for the model card (a pass over the held-out split; ``generate`` needs none).

    Raises:
        ConfigError: no swarm or checkpoint here, or ``out`` holds something else (``overwrite`` replaces an export).
        CheckpointError: the checkpoint is unreadable or of another swarm.
    """
    manifest = swarm_manifest(data_dir, run_id)
    path = checkpoint_path(data_dir, manifest.run_id)
    if not path.exists():
        raise ConfigError(f"no checkpoint of swarm {manifest.run_id} in {data_dir}: it is written while a peer trains")
    check_out(out, overwrite)
    tokenizer, model = load_model(
        manifest, where(manifest, "tokenizer", data_dir), where(manifest, "init_weights", data_dir)
    )
    info, _ = load_checkpoint(path, model, manifest.hash.hex())
    status = read_json(data_dir / "status.json")  # the peer's last word on the swarm
    peers = status.get("peers") if isinstance(status, dict) and status.get("run_id") == manifest.run_id else None
    return write(manifest, tokenizer, model, info.epoch, data_dir, out, measure, peers if type(peers) is int else None)


def export_live(
    data_dir: Path, out: Path, peers: list[str], run_id: str | None, manifest_hash: bytes | None,
    overwrite: bool = False, measure: bool = True,
) -> Exported:  # fmt: skip
    """Write ``out`` from the swarm's current state, downloaded from its peers the way a late joiner downloads it
    (checked against the parameter sketches its members publish: ``state_download``). The swarm is found through
    ``peers`` by the invite's ``manifest_hash``, or by ``run_id`` if this data directory joined it.

    Raises:
        ConfigError: a private swarm (its peers serve members only), or ``out`` holds something else.
        PeerUnreachable: no peer answered, or none served its state.
    """
    from p2ptrain.settings import PeerSettings
    from p2ptrain.swarm.discovery import fetch_manifest
    from p2ptrain.swarm.file_sharing import provide
    from p2ptrain.swarm.observer import observe
    from p2ptrain.train.optimizers import make_optimizer
    from p2ptrain.train.stopping import stop_optimizer

    check_out(out, overwrite)
    with observe(peers, run_id, manifest_hash) as (dht, run):
        manifest = fetch_manifest(dht, manifest_hash)[0] if manifest_hash else swarm_manifest(data_dir, run)
        if manifest.admission != "open":
            raise ConfigError(
                f"swarm {manifest.run_id} is private: its peers serve their state to members only. Export a "
                "member's checkpoint instead (p2ptrain export --data-dir <a member's data directory>)"
            )
        files = provide(dht, manifest, data_dir)
        tokenizer, model = load_model(manifest, files["tokenizer"], files["init_weights"])
        optimizer = make_optimizer(dht, model, manifest, PeerSettings(data_dir=data_dir, batch_size=1))
        try:
            optimizer.load_state_from_peers()  # into the model's parameters, in place, as for a late joiner
            epoch = optimizer.local_epoch
            optimizer.tracker.fetched_global_progress_this_epoch.wait(timeout=5)
            peers = optimizer.tracker.global_progress.num_peers  # those training: an exporter reports no progress
        finally:
            stop_optimizer(optimizer, step_running=False)
    if epoch == 0:
        raise PeerUnreachable(f"no peer of swarm {manifest.run_id} served a trained state (global step 0)")
    logger.info("Downloaded the state of swarm %s at global step %d", manifest.run_id, epoch)
    return write(manifest, tokenizer, model, epoch, data_dir, out, measure, peers or None)


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        card = out / "README.md"
        ours = card.exists() and MARKER in card.read_text(errors="replace")
        if not (ours and overwrite):
            hint = " (--overwrite replaces it)" if ours else ""
            raise ConfigError(f"{out} is not empty{hint}: export into a new directory (--out)")


def load_model(manifest: mf.SwarmManifest, tokenizer_at: str, weights_at: str) -> tuple[Tokenizer, torch.nn.Module]:
    tokenizer = load_tokenizer(tokenizer_at)
    vocab, eos = tokenizer.vocab_size, tokenizer.eos_id
    return tokenizer, build_model(manifest.model, vocab, manifest.seq_len, manifest.seed, weights_at, eos)


def write(
    manifest: mf.SwarmManifest, tokenizer: Tokenizer, model: torch.nn.Module, epoch: int, data_dir: Path, out: Path,
    measure: bool, peers: int | None = None,
) -> Exported:  # fmt: skip
    val_loss = held_out_loss(manifest, model) if measure else None
    model.generation_config.suppress_tokens = list(range(tokenizer.vocab_size, model.config.vocab_size))
    model.generation_config.pad_token_id = tokenizer.eos_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    tokens = epoch * manifest.target_batch_size * manifest.seq_len
    exported = Exported(out, manifest.run_id, epoch, tokens, val_loss, peers)
    (out / "README.md").write_text(model_card(manifest, model, exported, energy_card(data_dir, manifest.run_id)))
    return exported


def held_out_loss(manifest: mf.SwarmManifest, model: torch.nn.Module) -> float | None:
    """The loss on the swarm's held-out split (the same for every peer), or None if the dataset is not here."""
    from p2ptrain.train.data import open_data

    try:
        _, corpus = open_data(manifest, b"export")
    except DatasetError as e:
        logger.warning("No held-out loss in the model card: %s", e)
        return None
    return evaluate(model, corpus.val_blocks(), EVAL_BATCH, torch.device("cpu"))


def energy_card(data_dir: Path, run_id: str) -> str:
    """This peer's energy and CO2 report card (its ledger), as Markdown; empty if it has none."""
    from p2ptrain.energy.ledger import ledger_path, load_ledger
    from p2ptrain.energy.report import Card, render_markdown
    from p2ptrain.errors import LedgerInvalid

    try:
        ledger = load_ledger(ledger_path(data_dir, run_id))
    except LedgerInvalid as e:
        logger.warning("No energy report in the model card: %s", e)
        return ""
    return render_markdown(Card("peer", run_id, (ledger,))) if ledger is not None else ""


def model_card(manifest: mf.SwarmManifest, model: torch.nn.Module, exported: Exported, energy: str) -> str:
    loss = f"{exported.val_loss:.4f}" if exported.val_loss is not None else "not measured"
    dataset = manifest.dataset if manifest.dataset != "default" else "p2ptrain's embedded default corpus"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [p2ptrain, volunteer-computing, decentralized-training]",
        "---",
        MARKER,
        f"# {manifest.run_id}",
        "",
        f"A {manifest.model} language model ({count_parameters(model):,} parameters) trained by a p2ptrain swarm of",
        "volunteers' computers, averaging with one another over the internet, with no central server.",
        "",
        "| | |",
        "|---|---|",
        f"| swarm | `{manifest.run_id}` |",
        f"| manifest | `{manifest.hash.hex()}` (signed by its author) |",
        f"| dataset | {dataset} |",
        f"| tokenizer | {manifest.tokenizer} |",
        f"| global step | {exported.epoch} |",
        f"| peers | {exported.peers if exported.peers is not None else 'not known'} (in the swarm when exported) |",
        f"| tokens trained | {exported.tokens:,} ({manifest.target_batch_size} × {manifest.seq_len} per step) |",
        f"| held-out loss | {loss} |",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this directory>")',
        "```",
        "",
        "The energy and emissions below are the exporting peer's own (`p2ptrain report`); the whole swarm's:",
        "`p2ptrain report --swarm --markdown`.",
        "",
        energy or "No energy ledger was found for this peer.",
    ]
    return "\n".join(lines) + "\n"


def generate(model_dir: Path, prompt: str, max_new_tokens: int, temperature: float, seed: int) -> str:
    """Sample a continuation of ``prompt`` from an export (``temperature`` 0: greedy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir} is not a model export ({e}): make one with p2ptrain export") from None
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ids.shape[1] == 0:
        ids = torch.tensor([[tokenizer.eos_token_id]])  # an empty prompt: start a new document
    torch.manual_seed(seed)
    sampled = model.generate(
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
    )
    return tokenizer.decode(sampled[0, ids.shape[1] :], skip_special_tokens=True)
