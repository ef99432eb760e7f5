"""``p2ptrain export`` (the trained model as a Hugging Face directory) and ``p2ptrain generate`` (text from one)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from p2ptrain.cli.daemon_commands import daemon_dir
from p2ptrain.cli.options import DataDir, Debug, InitialPeers
from p2ptrain.cli.session import setup_logging
from p2ptrain.settings import PeerSettings


def export(
    out: Annotated[Path, typer.Option(help="the directory to write (new, or an earlier export with --overwrite)")],
    run_id: Annotated[str | None, typer.Option(help="which swarm (default: the last one this data dir joined)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an earlier export in --out")] = False,
    from_swarm: Annotated[
        bool, typer.Option("--from-swarm", help="the state the swarm's peers hold now, not a checkpoint")
    ] = False,
    invite: Annotated[str | None, typer.Option(help="--from-swarm: reach the swarm through this invite")] = None,
    initial_peers: InitialPeers = None,
    data_dir: DataDir = None,
    debug: Debug = False,
) -> None:
    """Export the trained model as a Hugging Face model (config, safetensors, tokenizer, model card): this peer's
    checkpoint, or with --from-swarm the state the swarm's peers hold now."""
    from p2ptrain.export import export as write_export
    from p2ptrain.export import export_live

    directory = daemon_dir(data_dir)
    setup_logging(PeerSettings(data_dir=directory, log_level="DEBUG" if debug else "WARNING"), log_file=False)
    if from_swarm:
        from p2ptrain.cli.report_command import which_swarm

        peers, run_id, manifest_hash = which_swarm(directory, run_id, invite, list(initial_peers or []))
        print("Downloading the swarm's state from its peers...", flush=True)
        done = export_live(directory, out, peers, run_id, manifest_hash, overwrite)
    else:
        done = write_export(directory, out, run_id, overwrite)
    loss = f", held-out loss {done.val_loss:.4f}" if done.val_loss is not None else ""
    print(f"Exported swarm {done.run_id} at global step {done.epoch} ({done.tokens:,} tokens{loss}) to {done.path}")
    print(f"Load it with transformers.AutoModelForCausalLM.from_pretrained({str(done.path)!r}), or: "
          f"p2ptrain generate --model-dir {done.path} --prompt 'Once upon a time'")  # fmt: skip


def generate(
    prompt: Annotated[str, typer.Option(help="the text to continue")] = "",
    model_dir: Annotated[Path | None, typer.Option(help="an export (default: this peer's checkpoint)")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, max=4096, help="tokens to sample")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, max=10.0, help="0: always the likeliest token")] = 0.8,
    seed: Annotated[int, typer.Option(help="random seed of the sampling")] = 0,
    data_dir: DataDir = None,
    debug: Debug = False,
) -> None:
    """Continue a prompt with the trained model: from an export, or from this peer's checkpoint."""
    from p2ptrain.export import export as write_export
    from p2ptrain.export import generate as sample

    directory = daemon_dir(data_dir)
    setup_logging(PeerSettings(data_dir=directory, log_level="DEBUG" if debug else "WARNING"), log_file=False)
    if model_dir is not None:
        print(prompt + sample(model_dir, prompt, max_new_tokens, temperature, seed))
        return
    with tempfile.TemporaryDirectory(prefix="p2ptrain-generate-") as scratch:
        write_export(directory, Path(scratch) / "model", measure=False)
        print(prompt + sample(Path(scratch) / "model", prompt, max_new_tokens, temperature, seed))
