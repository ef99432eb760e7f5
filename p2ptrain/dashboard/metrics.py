"""This peer's numbers in Prometheus' text exposition format (version 0.0.4), from its status and energy ledger."""

from __future__ import annotations

import math
from typing import Any

from p2ptrain.energy.ledger import Ledger

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name, type, help, the status key it reads
FROM_STATUS = (
    ("p2ptrain_global_step", "gauge", "The swarm's global step this peer is at.", "epoch"),
    ("p2ptrain_local_steps_total", "counter", "Forward and backward passes this peer did in this run.", "local_steps"),
    ("p2ptrain_samples_total", "counter", "Training samples this peer processed in this run.", "samples"),
    ("p2ptrain_samples_per_second", "gauge", "This peer's training throughput.", "samples_per_s"),
    ("p2ptrain_loss", "gauge", "Training loss of this peer's last step.", "loss"),
    ("p2ptrain_validation_loss", "gauge", "Held-out loss at the last measurement.", "val_loss"),
    ("p2ptrain_swarm_peers", "gauge", "Peers in the swarm, as the progress records count them.", "peers"),
    ("p2ptrain_compute_seconds_total", "counter", "Seconds this peer spent in forward and backward.", "compute_s"),
    ("p2ptrain_optimizer_seconds_total", "counter", "Seconds in the optimizer's own update.", "optimizer_s"),
)


def metrics_text(status: dict[str, Any], ledger: Ledger | None) -> str:
    """The exposition: what ``status`` (``status.json``) and ``ledger`` hold; a number they lack is left out."""
    out: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
        samples = [(labels, value) for labels, value in samples if _finite(value)]
        if samples:
            out.extend([f"# HELP {name} {text}", f"# TYPE {name} {kind}"])
            out.extend(f"{name}{labels} {float(value)!r}" for labels, value in samples)

    run = {"run_id": status.get("run_id"), "model": status.get("model"), "peer_id": status.get("peer_id")}
    info = ",".join(f'{k}="{_escape(v)}"' for k, v in run.items() if isinstance(v, str))
    metric("p2ptrain_info", "gauge", "The swarm and peer this dashboard shows.", [("{" + info + "}", 1)])
    state = status.get("state")
    if isinstance(state, str):
        current = [(f'{{state="{_escape(state)}"}}', 1)]
        metric("p2ptrain_state", "gauge", "The peer's state (1 for the current one).", current)
    paused = status.get("paused_reasons")
    if isinstance(paused, list):
        metric("p2ptrain_paused", "gauge", "1 while training is paused for the volunteer.", [("", 1 if paused else 0)])
    for name, kind, text, key in FROM_STATUS:
        metric(name, kind, text, [("", status.get(key))])
    rounds = status.get("rounds")
    if isinstance(rounds, dict):
        failed = rounds.get("failed") if isinstance(rounds.get("failed"), dict) else {}
        counts = [('{outcome="ok",reason=""}', rounds.get("ok"))] + [
            (f'{{outcome="failed",reason="{_escape(reason)}"}}', n) for reason, n in sorted(failed.items())
            if isinstance(reason, str)
        ]  # fmt: skip
        metric("p2ptrain_rounds_total", "counter", "Averaging rounds this peer took part in, by outcome.", counts)
    sent, received = status.get("bytes_sent"), status.get("bytes_received")
    metric("p2ptrain_round_bytes_total", "counter", "Bytes the averaging rounds moved (payload), by direction.",
           [('{direction="sent"}', sent), ('{direction="received"}', received)])  # fmt: skip
    connections = status.get("connections")
    if isinstance(connections, dict):
        by_kind = [(f'{{kind="{_escape(k)}"}}', v) for k, v in sorted(connections.items()) if isinstance(k, str)]
        metric("p2ptrain_connections", "gauge", "Open connections by kind (direct, hole-punched, relayed).", by_kind)
    if ledger is not None:
        metric("p2ptrain_energy_joules_total", "counter", "Energy this peer used training (CPU, GPU, RAM).",
               [(f'{{part="{part}"}}', getattr(ledger, f"{part}_j")) for part in ("cpu", "gpu", "ram")])  # fmt: skip
        metric("p2ptrain_emissions_grams_total", "counter", "Emissions of that energy, g CO2e.", [("", ledger.g_co2e)])
        metric("p2ptrain_tokens_total", "counter", "Tokens this peer trained on (the ledger's count).",
               [("", ledger.tokens)])  # fmt: skip
    return "\n".join(out) + "\n"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
