"""One peer's whole life, in the order it happens (ARCHITECTURE.md: the processes and who owns them):

1. prepare this machine: data dir (0700, locked for this peer), identity (fixes the peer id), device, free port;
2. `seed`: sign a new manifest and open the dataset *before* touching the network, so bad input
   fails with nothing published;
3. start the energy meter, then one **stay in the swarm** after another (``stay``), until stopped or done:
   a. start the DHT (bootstrapping from the invite, --initial-peers, or peers remembered from last time);
   b. `join`: resolve the swarm (invite hash → manifest; or the remembered swarm; or one advertised for
      --model; or, with none, start a fresh swarm) and verify its signature and hash;
   c. settle the network role: behind NAT, join again through the swarm's relays or as a client (``network``);
   d. build tokenizer, data shard, model (seeded: identical on every peer) and hivemind's Optimizer;
   e. resume from the local checkpoint if there is one;
   f. publish the swarm records and this peer's membership (every member does, so the swarm outlives
      its seeder), print the invite; start the energy ledger (meter, grid intensity, signed DHT record) once;
   g. train in a worker thread (first catching up from peers if they are ahead) until stopped,
      `--max-steps`, or the network watch asks to rejoin (a new role: the next stay resumes from the checkpoint);
   h. leave in a fixed order: abandon the averaging round after a grace period, remember peers, say goodbye
      (Optimizer), write the checkpoint, stop the DHT, reap every child process;
4. at the end, in the last stay's step h while its DHT still runs: write and publish the energy ledger.

Only ``cli.main`` installs signal handlers; they set the ``stop`` event passed in here.
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import hivemind
import torch
from hivemind.p2p import PeerID

from p2ptrain.compat import hivemind as compat
from p2ptrain.curves import curves
from p2ptrain.energy.carbon import IntensityWatcher, alpha3
from p2ptrain.energy.ledger import Accountant, ledger_path, open_ledger
from p2ptrain.energy.meter import EnergyMeter, MeterInfo, open_meter, start_meter
from p2ptrain.energy.records import LedgerValidator, publish_ledger
from p2ptrain.gate import Gate
from p2ptrain.leaving import Leaving
from p2ptrain.processes import die_with_parent, reap_children
from p2ptrain.settings import PeerSettings
from p2ptrain.status import StatusWriter
from p2ptrain.swarm import discovery, joining, nat, network
from p2ptrain.swarm import manifest as mf
from p2ptrain.swarm.file_sharing import provide
from p2ptrain.swarm.grouping import Regrouping
from p2ptrain.swarm.identity import author_key, ensure_identity, ensure_private_dir, identity_key, lock_data_dir
from p2ptrain.swarm.invite import Invite
from p2ptrain.swarm.joining import JoinRequest, SeedRequest
from p2ptrain.swarm.pinned_files import pin_all
from p2ptrain.swarm.reachability import Reach
from p2ptrain.swarm.signed_records import PeerRecords
from p2ptrain.swarm.watch import NetworkWatch, meet_members
from p2ptrain.train.checkpoint import CheckpointInfo, checkpoint_path, load_checkpoint, save_checkpoint
from p2ptrain.train.data import Corpus, open_data
from p2ptrain.train.models import build_model, check_context, count_parameters, model_spec, pick_device
from p2ptrain.train.optimizers import make_optimizer
from p2ptrain.train.stopping import abandon_round, stop_optimizer
from p2ptrain.train.tokenizer import Tokenizer
from p2ptrain.train.trainer import Trainer

logger = logging.getLogger(__name__)


@dataclass
class Run:
    """What lasts across a peer's stays in the swarm (``stay``)."""

    settings: PeerSettings
    data_dir: Path
    status: StatusWriter
    device: torch.device
    peer_id: PeerID
    meter: EnergyMeter
    meter_info: MeterInfo
    intensity: IntensityWatcher
    own_intensity: bool
    announce: Callable[[str], None]
    gate: Gate | None
    seeded: tuple[mf.SwarmManifest, bytes] | None = None
    tokenizer: Tokenizer | None = None
    corpus: Corpus | None = None
    accountant: Accountant | None = None
    dht: hivemind.DHT | None = None  # the current stay's (None between stays)
    reach: Reach | None = None  # what the last stay found out about its reachability (the next one's fallback)
    announced: bool = False
    ledger_closed: bool = False
    stays: int = 0
    failure: list[BaseException] = field(default_factory=list)


def run_peer(
    settings: PeerSettings,
    request: SeedRequest | JoinRequest,
    stop: threading.Event,
    announce: Callable[[str], None] = print,
    gate: Gate | None = None,
    intensity: IntensityWatcher | None = None,
    status: StatusWriter | None = None,
) -> None:
    """Run one peer until ``stop`` is set or ``settings.max_steps`` is reached.

    ``gate``, ``intensity`` and ``status`` come from the volunteer daemon, which owns them (it reads the status in
    this process); without, the peer always trains, watches the grid intensity itself and keeps its own status.

    Raises:
        P2PTrainError: a subclass naming what is wrong with the input, the data or the network.
    """
    # 1. this machine
    compat.check_version()
    data_dir = ensure_private_dir(settings.data_dir)
    with lock_data_dir(data_dir), curves(settings.tensorboard, settings.wandb, data_dir):
        status = status or StatusWriter(data_dir / "status.json")
        status.update(state="starting")
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        device = pick_device(settings.device)
        if device.type == "cuda" and settings.gpu_memory_fraction < 1.0:
            torch.cuda.set_per_process_memory_fraction(settings.gpu_memory_fraction, device)
        settings = replace(settings, port=network.claim_port(settings.host, settings.port))  # the same one every stay
        peer_id = ensure_identity(data_dir)
        own_intensity = intensity is None
        intensity = intensity or IntensityWatcher(settings.energy)  # a bad country fails here, before the network
        status.update(peer_id=peer_id.to_base58())
        logger.info("Peer %s, data in %s, training on %s", peer_id.to_base58(), data_dir, device)
        logger.debug("Settings: %s", settings.to_record())

        # 2. seed: everything that can fail on bad input fails here, before the network
        seeded = tokenizer = corpus = None
        if isinstance(request, SeedRequest):
            key = author_key(data_dir)
            manifest = mf.new_manifest(key, **request.manifest_values, files=pin_all(request.manifest_values))
            check_context(manifest.model, manifest.seq_len)
            seeded = manifest, mf.sign(manifest, key)
            tokenizer, corpus = open_data(manifest, peer_id.to_bytes())

        # 3. the energy meter (before any fork: see energy.meter.start_meter), then the stays in the swarm
        meter = open_meter(settings.energy.meter, settings.energy.tracking)
        meter_info = start_meter(meter)
        die_with_parent()
        run = Run(settings, data_dir, status, device, peer_id, meter, meter_info, intensity, own_intensity, announce,
                  gate, seeded, tokenizer, corpus)  # fmt: skip
        try:
            while stay(run, request, stop) and not stop.is_set():
                run.stays += 1
        finally:
            if run.accountant is None:
                meter.stop()
            elif not run.ledger_closed:  # a stay failed before it could close it (4. happens in stay's 3h)
                run.accountant.stop()
            if own_intensity:
                intensity.stop(timeout_s=0.5)
            error = str(run.failure[0]) if run.failure else ""
            status.update(state="failed" if run.failure else "stopped", error=error)
        if run.failure:
            raise run.failure[0]


def stay(run: Run, request: SeedRequest | JoinRequest, stop: threading.Event) -> bool:
    """One stay in the swarm (steps 3a-3h). True if the peer should join again (its network role changed).

    Each part, once started, puts its stop on ``parts``; leaving (step h) stops them in the reverse order, each
    timed, each whatever the others did (``Leaving.timed``).
    """
    settings, data_dir, status = run.settings, run.data_dir, run.status
    if run.stays and isinstance(request, SeedRequest):
        request = JoinRequest(request.manifest_values["model"])  # the swarm exists now: rejoin it (remembered)
    bootstrap, remembered = joining.first_peers(settings, request, data_dir, rejoining=run.stays > 0)
    known = bootstrap or remembered
    leaving = threading.Event()  # this stay ends: stopped, or rejoining
    ending = Leaving()
    trainer: Trainer | None = None
    watch: NetworkWatch | None = None
    with ExitStack() as parts:
        try:
            parts.callback(ending.summarize)  # the last word: how long each stop took
            # a. the DHT (and its libp2p daemon); whatever children are left at the very end are reaped
            parts.callback(ending.timed("reap children", lambda: reap_children(known=ending.children)))
            run.dht = network.start_dht(settings, data_dir, bootstrap, remembered)
            parts.callback(ending.timed("stop the DHT", stop_dht, run))
            # b. the swarm
            status.update(state="joining")
            manifest, envelope = run.seeded or resolve_swarm(run.dht, request, data_dir)
            admission, token = joining.admit(manifest, run.peer_id, data_dir, request)  # a private swarm's pass or None
            identity = identity_key(data_dir)  # signs this peer's records (its own, and its hivemind progress)
            validators = (LedgerValidator([manifest.run_id]), PeerRecords([manifest.run_id], identity))
            run.dht.add_validators(list(validators))
            # c. the network role (the DHT may start again in it)
            dht, role = network.settle_role(settings, data_dir, run.dht, manifest.run_id, known, validators, run.reach)
            run.dht = dht
            files = provide(dht, manifest, data_dir, stop)  # the tokenizer's, initial weights': checked; served
            if stop.is_set():
                return False
            if run.corpus is None:
                run.tokenizer, run.corpus = open_data(manifest, run.peer_id.to_bytes(), files["tokenizer"])
            tokenizer, corpus = run.tokenizer, run.corpus
            # d. build
            vocab, eos = tokenizer.vocab_size, tokenizer.eos_id
            model = build_model(manifest.model, vocab, manifest.seq_len, manifest.seed, files["init_weights"], eos)
            model.to(run.device)
            sigint = signal.getsignal(signal.SIGINT)
            discovery.read_revocations(dht, admission, joining.revocations_path(data_dir, manifest.run_id))
            optimizer = make_optimizer(dht, model, manifest, settings, role.reach.kind.value, admission, identity)
            signal.signal(signal.SIGINT, sigint)  # hivemind's averager sets SIGINT to SIG_IGN (averager.py:334)
            path = checkpoint_path(data_dir, manifest.run_id)

            def checkpoint() -> None:
                save_checkpoint(
                    path,
                    model,
                    optimizer.state_dict(),
                    CheckpointInfo(
                        optimizer.local_epoch, trainer.local_steps, manifest.hash.hex(), settings.to_record()
                    ),
                )
                status.update(force=True, checkpoint_epoch=optimizer.local_epoch)

            def last_checkpoint() -> None:
                if trainer is not None and trainer.local_steps and not run.failure:
                    save_unless_stepping(trainer, checkpoint)

            parts.callback(ending.timed("checkpoint", last_checkpoint))  # once the averagers have stopped
            parts.callback(ending.timed("say goodbye, stop the averagers", lambda: stop_averagers(optimizer, ending)))
            # e. resume
            local_steps = 0
            if path.exists():
                info, opt_state = load_checkpoint(path, model, manifest.hash.hex())
                optimizer.load_state_dict(opt_state)
                optimizer.resume_at(info.epoch)
                local_steps = info.local_steps
                status.update(resumed_from_epoch=info.epoch, epoch=info.epoch)
                logger.info("Resumed from the local checkpoint at global step %d", info.epoch)

            # f. publish: the swarm records, and this peer as a member now that it is ready to average
            republisher: discovery.Republisher | None = None

            def on_network(changes: dict[str, Any]) -> None:
                status.update(**changes)
                if "reachability" in changes and republisher is not None:
                    republisher.refresh()  # a peer found public offers itself as a relay at once

            watch = NetworkWatch(dht, role, manifest.run_id, on_network, lambda: known)
            optimizer.on_links = watch.prober.neighbours.throughput  # published in the near record
            if manifest.averaging.group_size:  # each round's groups, from the members' records read at its start
                regrouping = Regrouping(dht.peer_id.to_base58(), manifest.averaging.group_size)
                optimizer.passes = lambda: regrouping.passes(*watch.prober.read())

            def relay_addrs() -> list[str]:
                return nat.offered_addrs(dht.get_visible_maddrs()) if watch.reach.public else []

            discovery.publish(dht, manifest, envelope, relay_addrs=relay_addrs(), admission=admission)
            meet_members(dht, manifest.run_id)  # connections (hole-punched behind NAT) ready for averaging
            revocations = joining.revocations_path(data_dir, manifest.run_id)
            republisher = discovery.Republisher(dht, manifest, envelope, relay_addrs, admission, revocations)
            republisher.start()
            parts.callback(
                ending.timed("remember peers", leave_records, republisher, data_dir, manifest, envelope, dht)
            )
            joining.remember_swarm(data_dir, manifest, envelope, dht)
            invite = Invite(manifest.hash, manifest.model, tuple(discovery.shareable_maddrs(dht)), token).encode()
            status.update(
                run_id=manifest.run_id, model=manifest.model, manifest_hash=manifest.hash.hex(), invite=invite
            )
            if not run.announced:
                run.announce(joining.describe_swarm(manifest, run.peer_id, invite, count_parameters(model), token))
                run.announced = True
            if run.accountant is None:
                run.accountant = start_ledger(run, manifest, model)
                if run.own_intensity:
                    run.intensity.start()
            parts.callback(ending.timed("energy ledger", close_ledger, run, ending))  # 4., while the DHT runs
            watch.start()
            parts.callback(ending.timed("stop the network watch", watch.stop))

            trainer = Trainer(
                model, optimizer, corpus, manifest, settings, run.device, status, checkpoint, local_steps,
                [g for g in (run.gate, watch.gate) if g is not None], [run.accountant] if run.accountant else [],
                on_stuck=watch.ask_rejoin,
            )  # fmt: skip

            # g. train
            def work() -> None:
                try:
                    joining.wait_for_members(dht, manifest, settings, leaving)
                    trainer.run(leaving)
                except Exception as e:  # noqa: BLE001 - reported by the owner after shutdown
                    run.failure.append(e)

            status.update(state="training")
            worker = threading.Thread(target=work, name="trainer", daemon=True)
            worker.start()
            ending.worker = worker
            parts.callback(ending.timed("finish the step", abandon_round, worker, optimizer, settings.stop_grace_s))
            while worker.is_alive() and not stop.wait(0.5) and not watch.rejoin.is_set():
                pass
        finally:
            # h. leave: ``parts`` stops what was started, in the reverse order
            leaving.set()
            if watch is not None:
                run.reach = watch.reach
            ending.begin(watch is not None and watch.rejoin.is_set() and not stop.is_set() and not run.failure)
            status.update(state="rejoining" if ending.rejoining else "stopping")
    return ending.rejoining


def stop_dht(run: Run) -> None:
    if run.dht is not None:
        run.dht.shutdown()
        run.dht = None


def stop_averagers(optimizer: Any, ending: Leaving) -> None:
    stop_optimizer(optimizer, step_running=ending.worker is not None and ending.worker.is_alive())


def leave_records(republisher: Any, data_dir: Path, manifest: Any, envelope: bytes, dht: hivemind.DHT) -> None:
    """Stop republishing; remember the peers connected now (while the DHT still answers promptly: start_dht)."""
    republisher.stop()
    joining.remember_swarm(data_dir, manifest, envelope, dht)


def close_ledger(run: Run, ending: Leaving) -> None:
    """The energy ledger's last write and publication, when this peer leaves for good (not to rejoin)."""
    if not ending.rejoining and run.accountant is not None and not run.ledger_closed:
        run.accountant.stop()
        run.ledger_closed = True


def save_unless_stepping(trainer: Trainer, checkpoint: Callable[[], None]) -> None:
    if trainer.lock.acquire(timeout=1.0):
        try:
            checkpoint()
        finally:
            trainer.lock.release()
    else:
        logger.warning("A step was still running at shutdown: kept the previous checkpoint")


def start_ledger(run: Run, manifest: mf.SwarmManifest, model: torch.nn.Module) -> Accountant:
    """This peer's energy ledger for the swarm (``energy/ledger.py``): opened, described, and its thread started. It
    publishes through the DHT of the stay in progress."""
    settings = run.settings
    path = ledger_path(run.data_dir, manifest.run_id)
    ledger = open_ledger(path, manifest.run_id, run.peer_id.to_base58())
    ledger.model, ledger.model_params = manifest.model, count_parameters(model)
    ledger.device = "gpu" if run.device.type == "cuda" else "cpu"
    ledger.country = alpha3(settings.energy.country) if settings.energy.country else ""
    key = identity_key(run.data_dir)

    def publish(led: Any) -> bool:
        dht = run.dht
        return dht is not None and publish_ledger(dht, led, key, timeout_s=FINAL_PUBLISH_S)

    accountant = Accountant(
        path,
        ledger,
        run.meter,
        run.intensity.current,
        settings.energy.ledger_every_s,
        publish=publish,
        started=run.meter_info,
    )
    accountant.start()
    logger.info("Energy ledger %s (grid: %s)", path, run.intensity.current().source)
    return accountant


FINAL_PUBLISH_S = 2.0  # a ledger store waits at most this (the last one is part of a ≤ 10 s shutdown)


def resolve_swarm(dht: hivemind.DHT, request: JoinRequest, data_dir: Path) -> tuple[mf.SwarmManifest, bytes]:
    """The swarm to join; with none to be found, a fresh one."""
    found = joining.find_swarm(dht, request, data_dir)
    if found is not None:
        return found
    logger.info("No swarm found for %s: starting a new one", request.model)
    key = author_key(data_dir)
    manifest = mf.new_manifest(key, **fresh_swarm_values(request.model))
    return manifest, mf.sign(manifest, key)


def fresh_swarm_values(model: str) -> dict[str, Any]:
    spec = model_spec(model)
    return dict(
        run_id=f"{model}-{secrets.token_hex(3)}",
        model=model,
        dataset="default",
        tokenizer=spec.tokenizer,
        seq_len=min(spec.seq_len, spec.n_positions),
        target_batch_size=spec.target_batch_size,
    )
