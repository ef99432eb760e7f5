"""``p2ptrain status`` as a person reads it: the daemon's status reply, in lines."""

from __future__ import annotations

import time
from typing import Any


def describe_status(reply: dict[str, Any]) -> str:
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
        if peer.get("nearest"):
            near = ", ".join(f"…{p[-6:]} {ms:.0f} ms" for p, ms in peer["nearest"])
            lines.append(f"Nearest members: {near}")
        grouped = [r for r in peer.get("last_rounds", []) if r.get("ok") and r.get("levels")]
        if grouped:  # a grouped swarm's last round: with whom, level by level (train/level_rounds.py)
            levels = "; ".join(
                f"level {level} with {', '.join('…' + p[-6:] for p in others)} ({seconds:.2f} s)"
                for level, others, seconds in grouped[-1]["levels"]
            )
            lines.append(f"Last round (global step {grouped[-1]['step']}): {levels}")
        lag = peer.get("falling_behind")
        if lag:  # train/keeping_up.py
            lines.append(
                f"Falling behind: back from each state download ({lag['download_s']:.1f} s; the swarm steps every "
                f"{lag['step_s']:.1f} s) this peer had missed its step's round: it cannot catch up on this link"
            )
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
