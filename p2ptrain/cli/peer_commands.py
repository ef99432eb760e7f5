"""``seed``, ``join`` and ``demo``: run a peer (or a local swarm) in the foreground."""

from __future__ import annotations

import logging
import logging.handlers
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from p2ptrain.cli.options import (
    DEFAULT_AGGREGATION,
    DEFAULT_CODEC,
    DEFAULT_MODE,
    Aggregation,
    Codec,
    Debug,
    Mode,
    peer_options,
    peer_settings,
)
from p2ptrain.cli.session import run_until_signalled, setup_logging
from p2ptrain.errors import ConfigError
from p2ptrain.settings import PeerSettings
from p2ptrain.swarm.manifest import AveragingSpec, OptimizerSpec

logger = logging.getLogger("p2ptrain")


@peer_options()
def seed(
    model: Annotated[str, typer.Option(help="model name: gpt2-tiny, gpt2-small, gpt2-medium")],
    dataset: Annotated[
        str, typer.Option(help='"default" (embedded), a .txt/.jsonl file or folder, or a HF dataset name')
    ] = "default",
    dataset_config: Annotated[str, typer.Option(help="Hugging Face dataset configuration")] = "",
    text_field: Annotated[str, typer.Option(help="column / JSON key holding the text")] = "text",
    tokenizer: Annotated[
        str | None, typer.Option(help='"bytes" or a HF tokenizer in the local cache (default: per model)')
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per sample (default: per model)")] = None,
    target_batch_size: Annotated[
        int | None, typer.Option(help="samples per global step, whole swarm (default: per model)")
    ] = None,
    lr: Annotated[float, typer.Option(help="peak AdamW learning rate")] = OptimizerSpec.lr,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay")] = OptimizerSpec.weight_decay,
    warmup_epochs: Annotated[int, typer.Option(help="linear warm-up, in global steps")] = OptimizerSpec.warmup_epochs,
    averaging: Annotated[
        Mode, typer.Option(help="gradients: every global step; local: DiLoCo local steps + outer step")
    ] = DEFAULT_MODE,
    compression: Annotated[
        Codec, typer.Option(help="codec on the wire (adaptive: chosen per round from measured links)")
    ] = DEFAULT_CODEC,
    sparsity: Annotated[
        float, typer.Option(help="randk, randk-int4, randk-int2: fraction of coordinates sent")
    ] = AveragingSpec.sparsity,
    aggregation: Annotated[
        Aggregation,
        typer.Option(help="how each part's copies are combined: robust to dishonest peers unless 'mean'"),
    ] = DEFAULT_AGGREGATION,
    outer_lr: Annotated[
        float, typer.Option(help="local mode: outer Nesterov SGD learning rate")
    ] = AveragingSpec.outer_lr,
    comm_budget: Annotated[
        float, typer.Option(help="adaptive: round time within this fraction of compute time")
    ] = AveragingSpec.comm_budget,
    matchmaking_time: Annotated[
        float, typer.Option(help="seconds to gather an averaging group")
    ] = AveragingSpec.matchmaking_time_s,
    averaging_timeout: Annotated[
        float, typer.Option(help="seconds before a round falls back to local gradients")
    ] = AveragingSpec.averaging_timeout_s,
    average_state_every: Annotated[
        int, typer.Option(help="also average parameters every N global steps (0: never; gradient mode)")
    ] = AveragingSpec.average_state_every,
    group_size: Annotated[
        int,
        typer.Option(help="local mode: average in groups of at most N nearby peers, then across (0: one group)"),
    ] = AveragingSpec.group_size,
    sync_every: Annotated[
        int, typer.Option(help="local mode: every N global steps average the parameters themselves (0: never)")
    ] = AveragingSpec.sync_every,
    run_id: Annotated[str | None, typer.Option(help="swarm name (default: <model>-<random>)")] = None,
    init_weights: Annotated[
        str, typer.Option(help="local dir / HF cache name of safetensors weights; empty = random init")
    ] = "",
    random_seed: Annotated[int, typer.Option("--seed", help="random init and data order")] = 0,
    private: Annotated[
        bool, typer.Option("--private", help="only peers with an invite (a join token signed by you) may take part")
    ] = False,
    invite_days: Annotated[
        float, typer.Option(help="--private: days the printed invite stays valid (more: p2ptrain invite)")
    ] = 7.0,
    debug: Debug = False,
    flags: dict[str, Any] | None = None,
) -> None:
    """Start a new swarm as its first peer: sign its manifest, publish it, print an invite, train."""
    from p2ptrain.peer import fresh_swarm_values
    from p2ptrain.swarm.joining import SeedRequest
    from p2ptrain.train.models import model_spec

    settings = peer_settings(flags or {}, debug)
    values = fresh_swarm_values(model)
    spec = model_spec(model)
    values.update(
        dataset=dataset,
        dataset_config=dataset_config,
        text_field=text_field,
        init_weights=init_weights,
        seed=random_seed,
        tokenizer=tokenizer or spec.tokenizer,
        seq_len=seq_len or values["seq_len"],
        target_batch_size=target_batch_size or spec.target_batch_size,
        run_id=run_id or values["run_id"],
        optimizer=OptimizerSpec(lr=lr, weight_decay=weight_decay, warmup_epochs=warmup_epochs),
        averaging=AveragingSpec(
            compression=compression.value,
            mode=averaging.value,
            sparsity=sparsity,
            outer_lr=outer_lr,
            comm_budget=comm_budget,
            matchmaking_time_s=matchmaking_time,
            averaging_timeout_s=averaging_timeout,
            average_state_every=average_state_every,
            aggregation=aggregation.value,
            group_size=group_size,
            sync_every=sync_every,
        ),
        admission="token" if private else "open",
    )
    if not 0 < invite_days <= 3650:
        raise ConfigError(f"--invite-days {invite_days} must be in (0, 3650]")
    run_until_signalled(settings, SeedRequest(values, invite_lifetime_s=invite_days * 86400))


@peer_options()
def join(
    model: Annotated[str, typer.Option(help="model name the swarm trains, e.g. gpt2-small")],
    invite: Annotated[str | None, typer.Option(help="invite string from the researcher (p2pt1-…)")] = None,
    debug: Debug = False,
    flags: dict[str, Any] | None = None,
) -> None:
    """Join a swarm training MODEL (by invite, known peers, or the last swarm); with none, start one."""
    from p2ptrain.swarm.invite import decode_invite
    from p2ptrain.swarm.joining import JoinRequest
    from p2ptrain.train.models import model_spec

    model_spec(model)  # unknown names fail before anything starts
    settings = peer_settings(flags or {}, debug)
    run_until_signalled(settings, JoinRequest(model, decode_invite(invite) if invite else None))


def demo(
    peers: Annotated[int, typer.Option(help="peers to run on this machine")] = 3,
    steps: Annotated[int, typer.Option(help="global steps to train")] = 30,
    epochs: Annotated[int | None, typer.Option(hidden=True, help="old name of --steps")] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="where the peers keep their files (default: a temp dir)")
    ] = None,
    debug: Debug = False,
) -> None:
    """Run a local swarm of PEERS training gpt2-tiny on the embedded corpus, with progress and a summary."""
    from p2ptrain.local_swarm import run_demo

    setup_logging(PeerSettings(data_dir=Path("."), log_level="DEBUG" if debug else "INFO"), log_file=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the peers like Ctrl+C does
    if epochs is not None:
        logger.warning("--epochs is deprecated and will be removed: use --steps")
        steps = epochs
    raise typer.Exit(run_demo(peers=peers, steps=steps, base_dir=data_dir))
