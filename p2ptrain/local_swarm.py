"""Several real peers on this machine (127.0.0.1): the demo, and the integration tests' swarm.

Each peer is a real `p2ptrain` process in its own session (so a terminal's Ctrl+C reaches only the
launcher, which stops the peers in order), with its own data dir and log file under ``base_dir``.
``LocalSwarm`` owns them: leaving its ``with`` block sends SIGTERM, waits, and kills what is left,
process groups included.

    p2ptrain demo --peers 3 --steps 30
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2ptrain.fileio import read_json

logger = logging.getLogger(__name__)

# A swarm that averages often, for a 2-core machine: small global batches and short timeouts.
DEMO_SWARM_FLAGS = (
    "--target-batch-size",
    "64",
    "--matchmaking-time",
    "2",
    "--averaging-timeout",
    "15",
    "--warmup-epochs",
    "5",
    "--lr",
    "3e-3",
)
DEMO_PEER_FLAGS = (
    "--host", "127.0.0.1", "--port", "0", "--threads", "1", "--batch-size", "8", "--validate-every", "5",
)  # fmt: skip


def loopback_dhts(n: int) -> list[Any]:
    """``n`` hivemind DHT nodes on 127.0.0.1 (random ports), the others bootstrapped from the first: the in-process
    swarm of the tests and benchmarks that drive averagers directly. The caller shuts them down."""
    import hivemind

    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    return [first] + [
        hivemind.DHT(start=True, initial_peers=first.get_visible_maddrs(), host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        for _ in range(n - 1)
    ]


@dataclass
class LocalPeer:
    name: str
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.monotonic)

    def status(self) -> dict[str, Any]:
        found = read_json(self.data_dir / "status.json")
        return found if isinstance(found, dict) else {}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class LocalSwarm:
    def __init__(
        self, base_dir: Path, model: str = "gpt2-tiny", swarm_flags=DEMO_SWARM_FLAGS, peer_flags=DEMO_PEER_FLAGS
    ):
        self.base_dir, self.model = Path(base_dir), model
        self.swarm_flags, self.peer_flags = tuple(swarm_flags), tuple(peer_flags)
        self.peers: dict[str, LocalPeer] = {}

    def _start(self, name: str, args: list[str], prefix: tuple[str, ...] = ()) -> LocalPeer:
        """``prefix``: a command to run the peer under, e.g. ``("ip", "netns", "exec", "ns1")``."""
        data_dir = self.base_dir / name
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "status.json").unlink(missing_ok=True)
        log_path = self.base_dir / f"{name}.log"
        command = [
            *prefix,
            sys.executable,
            "-m",
            "p2ptrain",
            *args,
            "--model",
            self.model,
            "--data-dir",
            str(data_dir),
            *self.peer_flags,
        ]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        peer = LocalPeer(name, data_dir, proc, log_path)
        self.peers[name] = peer
        return peer

    def seed(self, name: str, *extra: str, prefix: tuple[str, ...] = ()) -> LocalPeer:
        return self._start(name, ["seed", *self.swarm_flags, *extra], prefix)

    def join(self, name: str, *extra: str, prefix: tuple[str, ...] = ()) -> LocalPeer:
        return self._start(name, ["join", *extra], prefix)

    def wait_for(self, peer: LocalPeer, condition, timeout_s: float, what: str) -> dict[str, Any]:
        """Poll the peer's status until ``condition(status)``; raise with its log if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = peer.status()
            if status and condition(status):
                return status
            if not peer.alive() and not (status and condition(status)):
                raise RuntimeError(f"{peer.name} exited ({peer.proc.returncode}) before {what}:\n{peer.log()[-3000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"{peer.name}: no {what} within {timeout_s:.0f} s:\n{peer.log()[-3000:]}")

    def invite(self, peer: LocalPeer, timeout_s: float = 120) -> str:
        return self.wait_for(peer, lambda s: bool(s.get("invite")), timeout_s, "invite")["invite"]

    def stop(self, peer: LocalPeer, sig: int = signal.SIGTERM, timeout_s: float = 15) -> float:
        """Signal a peer and wait for it; returns seconds it took. Kills its group if it overstays."""
        started = time.monotonic()
        if peer.alive():
            peer.proc.send_signal(sig)
            try:
                peer.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s did not stop within %.0f s after %s; killing it (its threads' stacks are in its log)",
                    peer.name,
                    timeout_s,
                    signal.Signals(sig).name,
                )
                peer.proc.send_signal(signal.SIGUSR1)  # cli/app.py: faulthandler prints every thread's stack
                time.sleep(1.0)
        _kill_group(peer.proc.pid)
        peer.proc.wait()
        return time.monotonic() - started

    def close(self) -> None:
        for peer in self.peers.values():
            if peer.alive():
                peer.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for peer in self.peers.values():
            try:
                peer.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", peer.name)
            _kill_group(peer.proc.pid)
            peer.proc.wait()

    def __enter__(self) -> LocalSwarm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_demo(peers: int, steps: int, base_dir: Path | None) -> int:
    """Train gpt2-tiny with ``peers`` local peers for ``steps`` global steps; show progress and a summary."""
    from rich.console import Console
    from rich.live import Live

    from p2ptrain.errors import ConfigError

    if not 1 <= peers <= 16 or steps < 1:
        raise ConfigError(f"--peers must be 1-16 and --steps ≥ 1 (got --peers={peers}, --steps={steps})")
    base = Path(base_dir) if base_dir else Path(tempfile.mkdtemp(prefix="p2ptrain-demo-"))
    console = Console(stderr=True)
    console.print(f"Local swarm: {peers} peers training gpt2-tiny for {steps} global steps; files in {base}")
    started = time.monotonic()
    interrupted = False
    with LocalSwarm(base) as swarm:
        common = ("--max-steps", str(steps), "--wait-for-peers", str(peers))
        first = swarm.seed("peer0", *common)
        invite = swarm.invite(first)
        for i in range(1, peers):
            swarm.join(f"peer{i}", "--invite", invite, *common)
        try:
            with Live(_table(swarm, steps), console=console, refresh_per_second=2) as live:
                while any(p.alive() for p in swarm.peers.values()):
                    live.update(_table(swarm, steps))
                    time.sleep(0.5)
                live.update(_table(swarm, steps))
        except KeyboardInterrupt:
            interrupted = True
            console.print("Ctrl+C: stopping the peers…")
    return _summary(console, swarm, time.monotonic() - started, interrupted)


def _table(swarm: LocalSwarm, steps: int):
    from rich.table import Table

    table = Table(title="p2ptrain demo (Ctrl+C stops)")
    for column in ("peer", "state", "global step", "loss", "held-out loss", "peers seen", "samples/s"):
        table.add_column(column)
    for peer in swarm.peers.values():
        s = peer.status()
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(
            peer.name,
            s.get("state", "starting"),
            f"{s.get('epoch', 0)}/{steps}",
            fmt(s.get("loss")),
            fmt(s.get("val_loss")),
            str(s.get("peers", 0)),
            f"{s.get('samples_per_s', 0):.0f}",
        )
    return table


def report_card(swarm: LocalSwarm, statuses: dict[str, dict[str, Any]]) -> str | None:
    """The swarm's report card from the peers' ledger files (`p2ptrain report --swarm` reads the same from the DHT)."""
    from p2ptrain.energy.ledger import ledger_path, load_ledger
    from p2ptrain.energy.report import Card, render_text
    from p2ptrain.errors import LedgerInvalid

    run_id = next((s["run_id"] for s in statuses.values() if s.get("run_id")), None)
    if run_id is None:
        return None
    ledgers = []
    for peer in swarm.peers.values():
        try:
            ledger = load_ledger(ledger_path(peer.data_dir, run_id))
        except LedgerInvalid as e:
            logger.warning("%s: %s", peer.name, e)
            continue
        if ledger is not None:
            ledgers.append(ledger)
    return render_text(Card("swarm", run_id, tuple(ledgers))) if ledgers else None


def _summary(console, swarm: LocalSwarm, wall_s: float, interrupted: bool) -> int:
    statuses = {name: peer.status() for name, peer in swarm.peers.items()}
    history = max((s.get("val_history") or [] for s in statuses.values()), key=len, default=[])
    failed = [name for name, peer in swarm.peers.items() if peer.proc.returncode not in (0, None)]
    console.print(f"\nSummary after {wall_s:.0f} s with {len(statuses)} peers:")
    for name, s in statuses.items():
        console.print(
            f"  {name}: reached global step {s.get('epoch', 0)}, {s.get('samples', 0)} samples, "
            f"state {s.get('state', '?')}, exit code {swarm.peers[name].proc.returncode}"
        )
    if history:
        (e0, l0), (e1, l1) = history[0], history[-1]
        console.print(f"  held-out loss: {l0:.3f} at global step {e0} → {l1:.3f} at global step {e1}")
    card = report_card(swarm, statuses)
    if card is not None:
        console.print()
        console.print(card, markup=False, highlight=False, soft_wrap=True)
    if failed:
        console.print(f"  peers that failed: {', '.join(failed)} (logs in {swarm.base_dir})")
        return 1
    return 130 if interrupted else 0
