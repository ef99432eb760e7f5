"""The `p2ptrain` command line: flags → settings → the peer; errors → exit codes, in one place.

    p2ptrain demo                                   # a local swarm of 3 peers training gpt2-tiny
    p2ptrain seed --model gpt2-small --dataset ./texts/   # start a swarm; prints an invite
    p2ptrain join --model gpt2-small --invite p2pt1-…     # volunteer in it
    p2ptrain report --swarm                         # tokens, GPU-hours, kWh, CO2e of the whole swarm

Only ``main`` installs signal handlers: SIGINT/SIGTERM set a stop event and the peer shuts down in
order (a second Ctrl+C kills at once). Errors print ``p2ptrain: error: <what> (<flag>). <fix>``;
tracebacks only with ``--debug``.
"""

from __future__ import annotations

import faulthandler
import logging
import logging.handlers
import os
import platform
import signal
import sys
import threading
from collections.abc import Callable, Mapping
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from p2ptrain import __version__

try:  # typer ≥ 0.2x vendors click: its usage errors come from the vendored copy
    from typer._click.exceptions import ClickException
except ImportError:
    from click import ClickException
from p2ptrain.errors import ExitCode, P2PTrainError
from p2ptrain.manifest import COMPRESSIONS, MODES, AveragingSpec, OptimizerSpec
from p2ptrain.settings import PeerSettings, resolve_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train one model together with volunteers' GPUs.")
logger = logging.getLogger("p2ptrain")
_ENV: Mapping[str, str] = os.environ  # replaced by main(env=...) in tests


Codec = Enum("Codec", {name: name for name in COMPRESSIONS}, type=str)  # the manifest's list, one source
DEFAULT_CODEC = Codec(AveragingSpec.compression)
Mode = Enum("Mode", {name: name for name in MODES}, type=str)
DEFAULT_MODE = Mode(AveragingSpec.mode)

# -- options every peer command takes (→ PeerSettings) ---------------------------------------------
DataDir = Annotated[
    Path | None, typer.Option(help="identity, checkpoints, status, log [default: ~/.local/share/p2ptrain]")
]
Device = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N [default: auto]")]
BatchSize = Annotated[
    int | None, typer.Option(help="samples per step on this peer; lower it on out-of-memory [default: 8]")
]
Host = Annotated[
    str | None, typer.Option(help="listen address; 127.0.0.1 keeps the swarm on this machine [default: 0.0.0.0]")
]
Port = Annotated[
    int | None, typer.Option(help="listen port, the one to forward in a router; 0 = any free port [default: 31337]")
]
Announce = Annotated[list[str] | None, typer.Option(help="public multiaddr to advertise (repeatable)")]
InitialPeers = Annotated[list[str] | None, typer.Option(help="multiaddr of a swarm member, …/p2p/<id> (repeatable)")]
P2p = Annotated[
    str | None,
    typer.Option("--p2p", help="libp2p daemon: go (hivemind's bundled p2pd) or py (p2ptrain-p2pd) [default: go]"),
]
Mdns = Annotated[bool | None, typer.Option("--mdns/--no-mdns", help="--p2p py: find swarm peers on the LAN")]
Threads = Annotated[int | None, typer.Option(help="CPU threads for torch; 0 = torch's default")]
MaxEpochs = Annotated[int | None, typer.Option(help="leave after this global step; 0 = run until stopped")]
CheckpointEvery = Annotated[int | None, typer.Option(help="checkpoint every N global steps [default: 10]")]
ValidateEvery = Annotated[int | None, typer.Option(help="held-out loss every N global steps; 0 = never [default: 5]")]
WaitForPeers = Annotated[int | None, typer.Option(help="wait until this many peers are in the swarm before training")]
LogLevel = Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING or ERROR [default: INFO]")]
Country = Annotated[
    str | None, typer.Option(help="ISO 3166 code of this machine's grid, e.g. FRA or FR [default: world average]")
]
IntensitySource = Annotated[
    str | None, typer.Option(help="grid carbon intensity: country (offline average), uk or electricitymaps")
]
Meter = Annotated[str | None, typer.Option(help="energy meter: auto (codecarbon), none, fake:<file.json>")]
Debug = Annotated[bool, typer.Option("--debug", help="tracebacks, versions and DEBUG logs, for bug reports")]

PEER_FLAGS = (
    "data_dir",
    "device",
    "batch_size",
    "host",
    "port",
    "announce",
    "initial_peers",
    "p2p",
    "mdns",
    "threads",
    "max_epochs",
    "checkpoint_every",
    "validate_every",
    "wait_for_peers",
    "log_level",
    "country",
    "intensity_source",
    "meter",
)


def _settings(values: dict[str, Any]) -> PeerSettings:
    flags = {name: values[name] for name in PEER_FLAGS}
    flags["torch_threads"] = flags.pop("threads")
    if values.get("debug"):
        flags["log_level"] = "DEBUG"
    return resolve_settings(flags, _ENV)


@app.command()
def seed(
    model: Annotated[str, typer.Option(help="model name: gpt2-tiny, gpt2-small, gpt2-medium")],
    dataset: Annotated[
        str, typer.Option(help='"default" (embedded), a .txt/.jsonl file or folder, or a HF dataset name')
    ] = "default",
    dataset_config: Annotated[str, typer.Option(help="Hugging Face dataset configuration")] = "",
    text_field: Annotated[str, typer.Option(help="column / JSON key holding the text")] = "text",
    tokenizer: Annotated[
        str | None, typer.Option(help='"bytes" or a HF tokenizer in the local cache [default: per model]')
    ] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per sample [default: per model]")] = None,
    target_batch_size: Annotated[
        int | None, typer.Option(help="samples per global step, whole swarm [default: per model]")
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
    sparsity: Annotated[float, typer.Option(help="randk: fraction of coordinates sent")] = AveragingSpec.sparsity,
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
        int, typer.Option(help="also average parameters every N global steps")
    ] = AveragingSpec.average_state_every,
    run_id: Annotated[str | None, typer.Option(help="swarm name [default: <model>-<random>]")] = None,
    init_weights: Annotated[
        str, typer.Option(help="local dir / HF cache name of safetensors weights; empty = random init")
    ] = "",
    random_seed: Annotated[int, typer.Option("--seed", help="random init and data order")] = 0,
    data_dir: DataDir = None,
    device: Device = None,
    batch_size: BatchSize = None,
    host: Host = None,
    port: Port = None,
    announce: Announce = None,
    initial_peers: InitialPeers = None,
    p2p: P2p = None,
    mdns: Mdns = None,
    threads: Threads = None,
    max_epochs: MaxEpochs = None,
    checkpoint_every: CheckpointEvery = None,
    validate_every: ValidateEvery = None,
    wait_for_peers: WaitForPeers = None,
    log_level: LogLevel = None,
    country: Country = None,
    intensity_source: IntensitySource = None,
    meter: Meter = None,
    debug: Debug = False,
) -> None:
    """Start a new swarm as its first peer: sign its manifest, publish it, print an invite, train."""
    from p2ptrain.models import model_spec
    from p2ptrain.peer import SeedRequest, fresh_swarm_values

    settings = _settings(locals())
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
        ),
    )
    _run_peer(settings, SeedRequest(values))


@app.command()
def join(
    model: Annotated[str, typer.Option(help="model name the swarm trains, e.g. gpt2-small")],
    invite: Annotated[str | None, typer.Option(help="invite string from the researcher (p2pt1-…)")] = None,
    data_dir: DataDir = None,
    device: Device = None,
    batch_size: BatchSize = None,
    host: Host = None,
    port: Port = None,
    announce: Announce = None,
    initial_peers: InitialPeers = None,
    p2p: P2p = None,
    mdns: Mdns = None,
    threads: Threads = None,
    max_epochs: MaxEpochs = None,
    checkpoint_every: CheckpointEvery = None,
    validate_every: ValidateEvery = None,
    wait_for_peers: WaitForPeers = None,
    log_level: LogLevel = None,
    country: Country = None,
    intensity_source: IntensitySource = None,
    meter: Meter = None,
    debug: Debug = False,
) -> None:
    """Join a swarm training MODEL (by invite, known peers, or the last swarm); with none, start one."""
    from p2ptrain.invite import decode_invite
    from p2ptrain.models import model_spec
    from p2ptrain.peer import JoinRequest

    model_spec(model)  # unknown names fail before anything starts
    settings = _settings(locals())
    _run_peer(settings, JoinRequest(model, decode_invite(invite) if invite else None))


@app.command()
def demo(
    peers: Annotated[int, typer.Option(help="peers to run on this machine")] = 3,
    epochs: Annotated[int, typer.Option(help="global steps to train")] = 30,
    data_dir: Annotated[
        Path | None, typer.Option(help="where the peers keep their files [default: a temp dir]")
    ] = None,
    debug: Debug = False,
) -> None:
    """Run a local swarm of PEERS training gpt2-tiny on the embedded corpus, with progress and a summary."""
    from p2ptrain.local_swarm import run_demo

    _setup_logging(PeerSettings(data_dir=Path("."), log_level="DEBUG" if debug else "INFO"), log_file=False)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops the peers like Ctrl+C does
    raise typer.Exit(run_demo(peers=peers, epochs=epochs, base_dir=data_dir))


@app.command()
def version() -> None:
    """Print versions (include them in bug reports)."""
    print(_versions())


def _versions() -> str:
    import hivemind
    import torch

    return (
        f"p2ptrain {__version__}, hivemind {hivemind.__version__}, torch {torch.__version__}, "
        f"python {platform.python_version()}, {platform.platform()}"
    )


def _setup_logging(settings: PeerSettings, log_file: bool = True) -> None:
    from hivemind.utils.logging import use_hivemind_log_handler

    use_hivemind_log_handler("in_root_logger")  # hivemind's records go through our handlers
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(settings.log_level)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(console)
    if log_file:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        rotating = logging.handlers.RotatingFileHandler(
            settings.data_dir / "p2ptrain.log", maxBytes=10_000_000, backupCount=3
        )
        rotating.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
        root.addHandler(rotating)
    hivemind_level = logging.DEBUG if settings.log_level == "DEBUG" else logging.WARNING
    logging.getLogger("hivemind").setLevel(hivemind_level)


def _run_peer(settings: PeerSettings, request: Any) -> None:
    from p2ptrain.peer import run_peer

    _setup_logging(settings)
    logger.debug(_versions())
    _until_signalled(lambda stop: run_peer(settings, request, stop, announce=lambda text: print(text, flush=True)))


def _until_signalled(work: Callable[[threading.Event], None]) -> None:
    """Run ``work(stop)``; SIGINT/SIGTERM set ``stop`` (a second one kills at once); Ctrl+C exits 130."""
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        if len(received) > 1:
            from p2ptrain.processes import reap_children

            logger.warning("Second %s: stopping now", signal.Signals(signum).name)
            reap_children(timeout_s=0)
            os._exit(ExitCode.INTERRUPTED)
        logger.info("%s: leaving the swarm (Ctrl+C again to force)", signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, on_signal)
    # `kill -USR1 <pid>` prints every thread's stack (to the real stderr, even when sys.stderr is redirected)
    faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    work(stop)
    if received and received[0] == signal.SIGINT:
        raise typer.Exit(ExitCode.INTERRUPTED)


# -- the volunteer daemon and its control commands (volunteer.py, control.py, daemon_config.py) -----

daemon_app = typer.Typer(no_args_is_help=True, help="The volunteer daemon: train in the background, only when idle.")
config_app = typer.Typer(help="Show or change the daemon's config file.")
app.add_typer(daemon_app, name="daemon")
app.add_typer(config_app, name="config")
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 60.0


def _daemon_config():
    from p2ptrain.daemon_config import load_config

    return load_config(_ENV)


def _daemon_dir(data_dir: Path | None) -> Path:
    return _daemon_config().peer_settings({"data_dir": data_dir}, _ENV).data_dir


MaxGridIntensity = Annotated[
    float | None,
    typer.Option(help="carbon-aware: pause while the grid emits more g CO2e/kWh [idle.max_grid_g_co2_per_kwh]"),
]
CleanestHours = Annotated[
    float | None,
    typer.Option(help="carbon-aware: train only in the N cleanest hours of the forecast [idle.cleanest_hours]"),
]


def _with_idle_flags(config: Any, max_grid_intensity: float | None, cleanest_hours: float | None) -> Any:
    """The config file's [idle] with the carbon-aware flags over it (validated like the file)."""
    from dataclasses import replace

    overrides = {"max_grid_g_co2_per_kwh": max_grid_intensity, "cleanest_hours": cleanest_hours}
    overrides = {k: float(v) for k, v in overrides.items() if v is not None}
    return replace(config, idle=replace(config.idle, **overrides)) if overrides else config


@daemon_app.command("run")
def daemon_run(
    data_dir: DataDir = None,
    log_level: LogLevel = None,
    country: Country = None,
    intensity_source: IntensitySource = None,
    max_grid_intensity: MaxGridIntensity = None,
    cleanest_hours: CleanestHours = None,
    debug: Debug = False,
) -> None:
    """Run the daemon in the foreground (what the service files in daemon/ run)."""
    from p2ptrain.volunteer import run_daemon

    config = _with_idle_flags(_daemon_config(), max_grid_intensity, cleanest_hours)
    flags = {
        "data_dir": data_dir,
        "log_level": "DEBUG" if debug else log_level,
        "country": country,
        "intensity_source": intensity_source,
    }
    _setup_logging(config.peer_settings(flags, _ENV))
    logger.debug(_versions())
    _until_signalled(lambda stop: run_daemon(config, flags, _ENV, stop))


@daemon_app.command("start")
def daemon_start(
    data_dir: DataDir = None,
    country: Country = None,
    intensity_source: IntensitySource = None,
    max_grid_intensity: MaxGridIntensity = None,
    cleanest_hours: CleanestHours = None,
) -> None:
    """Start the daemon in the background and return once it answers."""
    import subprocess
    import time

    from p2ptrain.control import DaemonNotRunning, request
    from p2ptrain.identity import ensure_private_dir

    config = _with_idle_flags(_daemon_config(), max_grid_intensity, cleanest_hours)  # bad values fail here
    config.peer_settings({"country": country, "intensity_source": intensity_source}, _ENV)
    directory = ensure_private_dir(_daemon_dir(data_dir))
    try:
        reply = request(directory, "status")
        print(f"The daemon is already running (pid {reply['daemon_pid']}): p2ptrain status")
        return
    except DaemonNotRunning:
        pass
    command = [sys.executable, "-m", "p2ptrain", "daemon", "run", "--data-dir", str(directory)]
    passed = {
        "--country": country,
        "--intensity-source": intensity_source,
        "--max-grid-intensity": max_grid_intensity,
        "--cleanest-hours": cleanest_hours,
    }
    for flag, value in passed.items():
        if value is not None:
            command += [flag, str(value)]
    out = directory / "daemon.out"
    with open(out, "ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(_ENV),
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = out.read_text(errors="replace").splitlines()[-5:]
            raise P2PTrainError("the daemon exited at once:\n  " + "\n  ".join(tail) + f"\n(full output: {out})")
        try:
            request(directory, "status", timeout_s=2.0)
            print(
                f"Daemon started (pid {proc.pid}); its log: {directory / 'p2ptrain.log'}. See it with: p2ptrain status"
            )
            return
        except DaemonNotRunning:
            time.sleep(0.2)
    raise P2PTrainError(f"the daemon (pid {proc.pid}) did not answer within {START_TIMEOUT_S:.0f} s; see {out}")


@daemon_app.command("stop")
def daemon_stop(data_dir: DataDir = None) -> None:
    """Stop the daemon: it leaves the averaging round, writes its checkpoint and exits."""
    _stop_daemon(data_dir, "stop")


def _stop_daemon(data_dir: Path | None, command: str) -> None:
    import time

    import psutil

    from p2ptrain.control import request

    started = time.monotonic()
    pid = request(_daemon_dir(data_dir), command)["daemon_pid"]
    try:
        psutil.Process(pid).wait(STOP_TIMEOUT_S)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        raise P2PTrainError(f"the daemon (pid {pid}) has not stopped after {STOP_TIMEOUT_S:.0f} s") from None
    done = "Left the swarm and stopped" if command == "leave" else "Stopped"
    print(f"{done} in {time.monotonic() - started:.1f} s")


@daemon_app.command("status")
def daemon_status(data_dir: DataDir = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Same as `p2ptrain status`."""
    status(data_dir, as_json)


@app.command()
def status(
    data_dir: DataDir = None, as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False
) -> None:
    """What the daemon is doing: training or paused (and why), the swarm, this peer's contribution."""
    import json

    from p2ptrain.control import request

    reply = request(_daemon_dir(data_dir), "status")
    print(json.dumps(reply, indent=2) if as_json else describe_status(reply))


@app.command()
def pause(
    reason: Annotated[str, typer.Option(help="shown in status, e.g. 'seat 12 taken'")] = "p2ptrain pause",
    data_dir: DataDir = None,
) -> None:
    """Pause training (the peer stays in the swarm and gives the GPU back) until `p2ptrain resume`."""
    from p2ptrain.control import request

    print(describe_status(request(_daemon_dir(data_dir), "pause", reason=reason)))


@app.command()
def resume(data_dir: DataDir = None) -> None:
    """Undo `p2ptrain pause` (the idle policy may still hold training, e.g. while a game runs)."""
    from p2ptrain.control import request

    print(describe_status(request(_daemon_dir(data_dir), "resume")))


@app.command()
def leave(data_dir: DataDir = None) -> None:
    """Leave the swarm for good: the daemon stops and will not rejoin that swarm when started again."""
    _stop_daemon(data_dir, "leave")


def describe_status(reply: dict[str, Any]) -> str:
    import time

    peer = reply.get("peer", {})
    state = reply["state"]
    lines = [f"Daemon {reply['daemon_pid']}: {state}"]
    if reply.get("paused_reasons"):
        lines[0] += " — " + "; ".join(reply["paused_reasons"])
    if reply.get("duty", 1.0) < 1.0 and state == "training":
        lines[0] += f" (throttled to {reply['duty']:.0%}: {'; '.join(reply.get('throttled_by', []))})"
    if peer.get("run_id"):
        lines.append(
            f"Swarm {peer['run_id']} ({peer.get('model', '?')}): global step {peer.get('epoch', 0)}, "
            f"{peer.get('peers', 0)} peer(s)"
        )
        if peer.get("reachability"):
            lines.append(f"Reachability: {peer['reachability']}")
        if peer.get("network_role"):
            lines.append(f"Network: {peer['network_role']}{describe_connections(peer)}")
        lines.append(describe_ledger(reply.get("ledger")))
    elif peer.get("state"):
        lines.append(f"Peer: {peer['state']}")
    grid = reply.get("grid")
    if grid:
        lines.append(f"Grid: {grid['g_co2_per_kwh']:.0f} g CO2e/kWh ({grid['source']})")
    if peer.get("error"):
        lines.append(f"Last error: {peer['error']}")
    for event in reply.get("events", [])[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(event["at"]))
        why = f": {'; '.join(event['reasons'])}" if event["reasons"] else ""
        lines.append(f"  {when} {event['event']}{why}")
    return "\n".join(lines)


def describe_connections(peer: dict[str, Any]) -> str:
    """``; connections: 3 direct, 1 hole-punched, 1 relayed`` (what the network watch counted), or a warning."""
    text = ""
    counts = peer.get("connections") or {}
    if counts:
        text = "; connections: " + ", ".join(f"{n} {kind}" for kind, n in counts.items())
    if peer.get("network_isolated"):
        text += " — no member reachable: training waits for a relay"
    elif peer.get("network_no_relay"):
        text += " — the swarm has no relay"
    return text


def describe_ledger(ledger: dict[str, Any] | None) -> str:
    """The persistent ledger's totals for this swarm (they survive restarts), for `status`."""
    if not ledger:
        return "Contributed to this swarm: nothing counted yet (the energy ledger is written once training starts)"
    if "error" in ledger:
        return f"Energy ledger unreadable: {ledger['error']}"
    hours = f"{ledger['device_s'] / 3600:.2f} {ledger['device'].upper()}-hours"
    how = "estimated" if any("estimated" in v for v in (ledger.get("meter") or {}).values()) else "measured"
    return (
        f"Contributed to this swarm: {ledger['samples']:,} samples ({ledger['tokens']:,} tokens), {hours}, "
        f"{ledger['energy_kwh']:.4f} kWh ({how}), {ledger['g_co2e']:.1f} g CO2e. Details: p2ptrain report"
    )


@app.command()
def report(
    swarm: Annotated[bool, typer.Option("--swarm", help="the whole swarm, from the DHT [default: this peer]")] = False,
    run_id: Annotated[str | None, typer.Option(help="which swarm [default: the last one joined]")] = None,
    invite: Annotated[str | None, typer.Option(help="--swarm: reach the swarm through this invite")] = None,
    initial_peers: InitialPeers = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Markdown, for a paper's appendix")] = False,
    chart: Annotated[Path | None, typer.Option(help="also write a PNG of energy and CO2 over time")] = None,
    data_dir: DataDir = None,
    debug: Debug = False,
) -> None:
    """The report card: tokens, peers, GPU-hours, kWh, kg CO2e, per peer, and the same tokens in a datacenter."""
    import json

    from p2ptrain import report as rc

    directory = _daemon_dir(data_dir)
    if swarm:
        _setup_logging(PeerSettings(data_dir=directory, log_level="DEBUG" if debug else "WARNING"), log_file=False)
        card = _swarm_card(directory, run_id, invite, list(initial_peers or []))
    else:
        card = _local_card(directory, run_id)
    if as_json:
        print(json.dumps(rc.card_json(card), indent=2))
    elif markdown:
        print(rc.render_markdown(card), end="")
    else:
        print(rc.render_text(card), end="")
    if chart is not None:
        print(f"Chart: {rc.write_chart(card, chart)}", file=sys.stderr)


def _local_card(directory: Path, run_id: str | None):
    from p2ptrain.errors import ConfigError
    from p2ptrain.ledger import ledger_path, load_ledger
    from p2ptrain.peer import recall_swarm
    from p2ptrain.report import Card

    if run_id is None:
        run_id = recall_swarm(directory).get("run_id")
    if run_id is None:
        found = sorted((directory / "runs").glob("*/ledger.json"))
        run_id = found[-1].parent.name if len(found) == 1 else None
    ledger = load_ledger(ledger_path(directory, run_id)) if run_id else None
    if ledger is None:
        raise ConfigError(
            f"no energy ledger in {directory} for {'swarm ' + run_id if run_id else 'any swarm'} (--data-dir, "
            "--run-id). It is written once this peer trains; for the whole swarm: p2ptrain report --swarm"
        )
    return Card("peer", ledger.run_id, (ledger,))


def _swarm_card(directory: Path, run_id: str | None, invite: str | None, peers: list[str]):
    from p2ptrain.errors import ConfigError
    from p2ptrain.fileio import read_json
    from p2ptrain.invite import decode_invite
    from p2ptrain.ledger_records import gather_swarm
    from p2ptrain.peer import recall_swarm
    from p2ptrain.report import Card

    manifest_hash = None
    remembered = recall_swarm(directory)
    running = read_json(directory / "status.json")  # a peer running here: its invite names its own address
    running = running if isinstance(running, dict) else {}
    if not invite and not peers and not remembered.get("peers") and running.get("invite"):
        invite, run_id = running["invite"], run_id or running.get("run_id")
    if invite:
        decoded = decode_invite(invite)
        peers, manifest_hash = peers or list(decoded.peers), decoded.manifest_hash
    else:
        run_id = run_id or remembered.get("run_id")
        peers = peers or [p for p in remembered.get("peers", []) if isinstance(p, str)]
    if not peers or not (run_id or manifest_hash):
        raise ConfigError(
            "which swarm? Give --invite, or --initial-peers with --run-id (a peer that joined one remembers it)"
        )
    found = gather_swarm(peers, run_id, manifest_hash)
    if not found.ledgers and not found.rejected:
        raise ConfigError(f"no peer of swarm {run_id or 'from the invite'} has published a ledger yet")
    name = found.ledgers[0].run_id if found.ledgers else str(run_id)
    return Card("swarm", name, tuple(found.ledgers), tuple(found.rejected))


@config_app.callback(invoke_without_command=True)
def config_show(ctx: typer.Context) -> None:
    """Every setting, its value, and whether the file sets it (`p2ptrain config set KEY VALUE` to change one)."""
    if ctx.invoked_subcommand is not None:
        return
    from p2ptrain.daemon_config import config_path, describe

    config = _daemon_config()
    print(f"# {config_path(_ENV)}{'' if config_path(_ENV).exists() else ' (not written yet: all defaults)'}")
    for key, value, in_file in describe(config):
        shown = ", ".join(value) if isinstance(value, tuple) else value
        print(f"{key} = {shown}{'' if in_file else '   (default)'}")


@config_app.command("set")
def config_set(key: str, value: str) -> None:
    """Set KEY (table.key, e.g. idle.quiet_period_s) to VALUE; lists are comma-separated."""
    from p2ptrain.daemon_config import set_value

    path = set_value(_ENV, key, value)
    print(f"{key} = {value} (in {path}; a running daemon uses it after `p2ptrain daemon stop` and start)")


@config_app.command("unset")
def config_unset(key: str) -> None:
    """Remove KEY from the file: back to its default."""
    from p2ptrain.daemon_config import set_value

    print(f"{key} back to its default (in {set_value(_ENV, key, None)})")


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the CLI; return the exit code. Tests call this in-process with their own ``env``."""
    global _ENV
    _ENV = os.environ if env is None else env
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="p2ptrain", standalone_mode=False)
        return int(result or 0)
    except typer.Exit as e:
        return e.exit_code
    except ClickException as e:
        e.show()
        return ExitCode.USAGE
    except typer.Abort:
        return ExitCode.INTERRUPTED
    except P2PTrainError as e:
        if debug:
            logger.exception("Details")
        print(f"p2ptrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception:  # noqa: BLE001 - the one place a bug becomes an exit code
        if debug:
            print(_versions(), file=sys.stderr)
            raise
        logger.exception("Internal error")
        print("p2ptrain: error: internal error (above). Rerun with --debug and report it.", file=sys.stderr)
        return ExitCode.INTERNAL


def run() -> None:
    """Console-script entry point."""
    code = main()
    # Everything is stopped and written by now: leave without the interpreter's own shutdown. Its last full
    # garbage collection of torch's, hivemind's and codecarbon's objects took 2-5 s on a busy 2-core machine; and
    # after a shutdown around a training step stuck in hivemind, that step's threads (hivemind's progress tracker,
    # its executor calls into the stopped DHT) are still there: the interpreter waits for executor threads, and
    # one that never returns held a SIGTERMed peer until it was killed (30 s, seen in the swarm test).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
