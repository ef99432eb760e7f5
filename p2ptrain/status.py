"""What a peer is doing: ``PeerStatus``, kept by its ``StatusWriter``.

In the peer's process (the volunteer daemon's control socket) it is read as an object (``snapshot``); for other
processes (`demo`, tests, `report`) the writer keeps ``<data_dir>/status.json``, written atomically (readers never
see half a file) at most once a second, and at every state change.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2ptrain.fileio import atomic_write_json


@dataclass
class PeerStatus:
    state: str = "starting"  # starting → joining → training (⇄ paused) → [finishing] → stopping → stopped (or failed)
    pid: int = field(default_factory=os.getpid)
    peer_id: str = ""
    run_id: str = ""
    model: str = ""
    manifest_hash: str = ""
    invite: str = ""  # share it: `p2ptrain join --model <model> --invite <invite>`
    epoch: int = 0  # global step this peer's parameters are at
    local_steps: int = 0  # forward/backward passes this peer made in this run
    samples: int = 0  # samples this peer contributed since it started
    loss: float | None = None  # training loss, moving average over recent steps
    val_loss: float | None = None  # latest held-out loss
    val_history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, held-out loss)
    peers: int = 0  # swarm members this peer currently sees (itself included)
    reachability: str = ""  # whether other peers can connect to this one (reachability.Reach.describe)
    network_role: str = ""  # how it takes part given that (nat.Role.describe)
    network_no_relay: bool = False  # behind NAT and no member reachable directly: nobody new can reach it
    network_isolated: bool = False  # ... and not connected to any member either: training waits (watch.NetworkWatch)
    connections: dict[str, int] = field(default_factory=dict)  # direct / hole-punched / relayed
    nearest: list[list] = field(default_factory=list)  # [peer id, round trip ms] of the nearest measured members
    param_history: list[list] = field(default_factory=list)  # [global step, peers agreeing, compared, resynced]
    rounds: dict[str, Any] = field(default_factory=dict)  # {"ok": n, "failed": {reason: n}} (train/round_log.py)
    bytes_sent: float = 0.0  # the rounds' payload, this peer's side
    bytes_received: float = 0.0
    last_rounds: list[dict] = field(default_factory=list)  # the last 20: step, ok, peers, codec, bytes, seconds…
    resynced_at: int | None = None  # global step reached by downloading the swarm's state after parting from it
    falling_behind: dict | None = None  # each download ends a step behind: downloads, download_s, step_s (keeping_up)
    samples_per_s: float = 0.0
    compute_s: float = 0.0  # seconds in forward/backward since training started
    optimizer_s: float = 0.0  # ... in the optimizer's own update (utilization = (compute_s + optimizer_s) / wall)
    val_s: float = 0.0  # seconds spent measuring the held-out loss
    training_since: float | None = None  # unix time the training loop started
    resumed_from_epoch: int | None = None  # set when the local checkpoint was loaded
    loaded_state_from_peers_at: int | None = None  # epoch reached by downloading the swarm's state
    checkpoint_epoch: int | None = None  # epoch of the last checkpoint written
    paused_reasons: list[str] = field(default_factory=list)  # why the volunteer daemon paused training
    paused_since: float | None = None  # unix time
    error: str = ""
    updated_at: float = 0.0


HISTORIES = ("val_history", "param_history")  # long lists: in the file, not in the control socket's replies


class StatusWriter:
    def __init__(self, path: Path, min_interval_s: float = 1.0):
        self.path, self.status, self._min_interval_s, self._last = path, PeerStatus(), min_interval_s, 0.0
        self._lock = threading.Lock()  # the trainer, the network watch and the peer update; the daemon reads

    def update(self, force: bool = False, **changes: Any) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(self.status, key, value)
            now = time.time()
            if force or "state" in changes or now - self._last >= self._min_interval_s:
                self.status.updated_at, self._last = now, now
                atomic_write_json(self.path, asdict(self.status))

    def snapshot(self) -> PeerStatus:
        """A copy of the status as it is now, for a reader in this process."""
        with self._lock:
            return copy.deepcopy(self.status)
