"""The swarm's health page (``p2ptrain dashboard --swarm``): every peer of one swarm as its signed DHT records show
it, as Petals' health page shows its servers, but read by the dashboard itself from the DHT: no central server.

An observer node (``swarm.observer``: client mode, no identity, serving nothing) reads every ``READ_EVERY_S``:

- membership records: who is in the swarm; relay records: who is reachable directly (and relays for the others);
- progress records (hivemind's, signed with each peer's identity key): global step, samples/s, client mode;
- ledgers: tokens, device-hours, energy and emissions; near records: round trips to the nearest measured peers;
- losses records: each member's held-out (and training) loss at its last evaluation; the swarm's held-out loss
  is their median (one liar cannot move it far).

Its validators refuse forged membership, relay, near and ledger records, and hivemind's progress records whose
signature does not verify; a progress record signed by another key than the peer it names is left out
(``progress.bound_to_signers``). What is shown is what the peers say of themselves, signed by them: a peer can
still lie about its own numbers, not about anybody else's.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.p2p import PeerID

from p2ptrain.energy.ledger import Ledger
from p2ptrain.energy.records import LedgerValidator, fetch_ledgers
from p2ptrain.swarm.discovery import bounded, find_relays, member_ids
from p2ptrain.swarm.losses import read_losses
from p2ptrain.swarm.proximity import Near, read_near
from p2ptrain.swarm.signed_records import PeerRecords
from p2ptrain.train.progress import bound_to_signers

logger = logging.getLogger(__name__)

READ_EVERY_S = 10.0
MAX_PEERS = 1024  # rows shown, at most
HISTORY_POINTS = 720  # readings kept for the curves: two hours


def validators(run_id: str) -> list[Any]:
    """What the observer checks the records it reads with."""
    return [PeerRecords([run_id]), LedgerValidator([run_id]), RSASignatureValidator()]


def progress_records(dht: Any, run_id: str) -> dict[str, LocalTrainingProgress]:
    """Each peer's progress record (peer id → record), only those signed by the peer they name."""
    found = bounded(dht.get(f"{run_id}_progress", latest=True, return_future=True))
    if found is None or not isinstance(found.value, dict):
        return {}
    kept, _ = bound_to_signers(found.value)
    records = {}
    for entry in list(kept.values())[:MAX_PEERS]:
        try:
            record = LocalTrainingProgress.parse_obj(entry.value)
            records[PeerID(record.peer_id).to_base58()] = record
        except Exception as e:  # noqa: BLE001 - a malformed record is left out
            logger.debug("progress record: %r", e)
    return records


def health(
    members: list[str],
    relays: list[str],
    progress: dict[str, LocalTrainingProgress],
    ledgers: list[Ledger],
    near: dict[str, Near],
    now: float,
    losses: dict[str, tuple[int, float, float | None]] | None = None,
) -> dict[str, Any]:
    """The page's data: one row per peer that any record names, and the swarm's totals."""
    by_ledger, losses = {led.peer_id: led for led in ledgers}, losses or {}
    relaying = {addr.rsplit("/p2p/", 1)[-1] for addr in relays}
    peers = sorted(set(members) | relaying | set(progress) | set(by_ledger))[:MAX_PEERS]
    rows = []
    for peer in peers:
        record, led, measured = progress.get(peer), by_ledger.get(peer), near.get(peer)
        if peer in relaying:
            reach = "direct (relays for others)"
        elif record is not None and record.client_mode:
            reach = "client (behind NAT)"
        elif record is not None:
            reach = "full peer (no public address)"  # reached on its LAN, or it has not found its public one yet
        else:
            reach = "unknown"
        rtts = sorted(rtt for rtt, _ in measured.neighbours.values()) if measured else []
        rows.append({
            "peer": peer,
            "member": peer in members,
            "reachability": reach,
            "global_step": record.epoch if record else None,
            "samples_per_s": _finite(record.samples_per_second) if record else None,
            "seen_s_ago": _finite(max(0.0, now - record.time)) if record else None,
            "tokens": led.tokens if led else None,
            "device_hours": led.device_s / 3600 if led else None,
            "kwh": led.energy_kwh if led else None,
            "g_co2e": led.g_co2e if led else None,
            "country": led.country if led else None,
            "nearest_ms": rtts[0] if rtts else None,
            "neighbours": len(rtts),
            "held_out_loss": losses[peer][1] if peer in losses else None,
            "loss_step": losses[peer][0] if peer in losses else None,
        })  # fmt: skip
    training = [row for row in rows if row["global_step"] is not None]
    held_out = sorted(row["held_out_loss"] for row in rows if row["held_out_loss"] is not None)
    total = lambda key: sum(row[key] or 0 for row in rows)  # noqa: E731
    return {
        "read_at": now,
        "peers": rows,
        "totals": {
            "members": len(members),
            "training": len(training),
            "reachable_directly": len(relaying),
            "global_step": max((row["global_step"] for row in training), default=None),
            "samples_per_s": total("samples_per_s"),
            "tokens": total("tokens"),
            "device_hours": total("device_hours"),
            "kwh": total("kwh"),
            "g_co2e": total("g_co2e"),
            "held_out_loss": held_out[len(held_out) // 2] if held_out else None,  # the median (upper, if even)
        },
    }


def _finite(value: float) -> float | None:
    """A stranger's number as the page can show it: NaN and infinities (which JSON cannot carry) become None."""
    return value if math.isfinite(value) else None


class SwarmHealth:
    """What the health page shows: read by ``run`` every ``READ_EVERY_S`` from an observer node."""

    def __init__(self, dht: Any, run_id: str):
        self.dht, self.run_id = dht, run_id
        self._lock = threading.Lock()
        self._latest: dict[str, Any] = {"run_id": run_id, "read_at": None, "peers": [], "totals": {}}
        self.history: deque[list[float | None]] = deque(maxlen=HISTORY_POINTS)  # [time, training peers, samples/s,
        # kWh, g CO2e, held-out loss] of every reading, for the page's curves

    def read(self) -> dict[str, Any]:
        ledgers = fetch_ledgers(self.dht, self.run_id)
        found = health(
            member_ids(self.dht, self.run_id), find_relays(self.dht, self.run_id),
            progress_records(self.dht, self.run_id), ledgers.ledgers, read_near(self.dht, self.run_id), time.time(),
            read_losses(self.dht, self.run_id),
        )  # fmt: skip
        found.update(run_id=self.run_id, refused=ledgers.rejected)
        point = [found["read_at"], *(found["totals"][k] for k in ("training", "samples_per_s", "kwh", "g_co2e",
                                                                  "held_out_loss"))]  # fmt: skip
        with self._lock:
            self._latest = found
            self.history.append(point)
        return found

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"now": time.time(), **self._latest, "history": list(self.history)}

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.read()
            except Exception as e:  # noqa: BLE001 - a DHT hiccup: the page keeps the last reading
                logger.warning("Could not read the swarm's records: %r", e)
            stop.wait(READ_EVERY_S)
