"""The report card: what a peer, or a whole swarm, trained and what that cost, beside the same work in a datacenter.

    p2ptrain report                          # this peer, in its current swarm (its ledger file)
    p2ptrain report --swarm                  # every peer's signed ledger, from the DHT
    p2ptrain report --swarm --markdown       # for a paper's appendix; --json for scripts
    p2ptrain report --chart energy.png       # energy and CO2 over time (needs matplotlib)

Every number is a sum of ledgers (``ledger.py``); the per-peer table says how each peer's energy was
metered (measured or estimated) and where its grid intensity came from. The datacenter comparison
is an estimate from stated assumptions (``Datacenter``), not a measurement.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from p2ptrain.energy.carbon import J_PER_KWH, country_average
from p2ptrain.energy.ledger import Ledger
from p2ptrain.errors import ConfigError


@dataclass(frozen=True)
class Datacenter:
    """What the same tokens would cost on datacenter GPUs: the assumptions, each with its source."""

    gpu: str = "NVIDIA A100-SXM4-80GB"
    peak_flops: float = 312e12  # dense BF16 tensor-core peak, FLOP/s (NVIDIA A100 datasheet)
    mfu: float = 0.40  # model FLOPs utilization of a well-tuned GPT run (PaLM reached 46%; Chowdhery et al. 2022)
    gpu_power_w: float = 400.0  # the A100 SXM4's TDP, drawn throughout (GPU only: no host CPU, RAM or network)
    pue: float = 1.10  # power usage effectiveness: Google's 2023 fleet average (industry ~1.58, Uptime Institute)
    grid_country: str = "USA"  # the datacenter's grid: codecarbon's yearly average for this country


def datacenter_estimate(tokens: int, n_params: int, dc: Datacenter) -> dict[str, Any]:
    """The same tokens on ``dc``'s GPUs. Training costs ≈ 6 N FLOPs per token (2N forward, 4N backward;
    Kaplan et al. 2020, "Scaling Laws for Neural Language Models", §2.1; attention's share is left out):

        tokens/s  = MFU × peak FLOP/s / (6 N)
        GPU-hours = tokens / (tokens/s) / 3600
        kWh       = GPU-hours × GPU power (kW) × PUE
        g CO2e    = kWh × grid intensity (g CO2e/kWh)
    """
    grid = country_average(dc.grid_country)
    if n_params <= 0:
        return {"assumptions": asdict(dc), "grid": grid.source, "error": "the model's parameter count is unknown"}
    tokens_per_s = dc.mfu * dc.peak_flops / (6 * n_params)
    gpu_hours = tokens / tokens_per_s / 3600
    kwh = gpu_hours * dc.gpu_power_w / 1000 * dc.pue
    return {
        "assumptions": asdict(dc),
        "grid": grid.source,
        "grid_g_co2_per_kwh": grid.g_co2_per_kwh,
        "tokens_per_s": tokens_per_s,
        "gpu_hours": gpu_hours,
        "energy_kwh": kwh,
        "kg_co2e": kwh * grid.g_co2_per_kwh / 1000,
    }


@dataclass(frozen=True)
class Card:
    scope: str  # "peer" (this machine's ledger) or "swarm" (every peer's, from the DHT)
    run_id: str
    ledgers: tuple[Ledger, ...]
    rejected: tuple[str, ...] = ()  # records refused (forged, malformed), "<peer>: why"
    datacenter: Datacenter = field(default_factory=Datacenter)

    @property
    def model(self) -> str:
        return next((led.model for led in self.ledgers if led.model), "?")

    @property
    def model_params(self) -> int:
        return max((led.model_params for led in self.ledgers), default=0)


def totals(ledgers: tuple[Ledger, ...] | list[Ledger]) -> dict[str, Any]:
    """Sums over the ledgers (plain sums: the swarm's numbers are its peers' numbers added up)."""
    kwh = sum(led.energy_j for led in ledgers) / J_PER_KWH
    g = sum(led.g_co2e for led in ledgers)
    return {
        "peers": len(ledgers),
        "samples": sum(led.samples for led in ledgers),
        "tokens": sum(led.tokens for led in ledgers),
        "gpu_hours": sum(led.device_s for led in ledgers if led.device == "gpu") / 3600,
        "cpu_hours": sum(led.device_s for led in ledgers if led.device == "cpu") / 3600,
        "compute_hours": sum(led.compute_s for led in ledgers) / 3600,
        "energy_kwh": kwh,
        "cpu_kwh": sum(led.cpu_j for led in ledgers) / J_PER_KWH,
        "gpu_kwh": sum(led.gpu_j for led in ledgers) / J_PER_KWH,
        "ram_kwh": sum(led.ram_j for led in ledgers) / J_PER_KWH,
        "kg_co2e": g / 1000,
        "mean_g_co2_per_kwh": g / kwh if kwh > 0 else None,
        "since": min((led.started_at for led in ledgers if led.started_at), default=None),
        "until": max((led.updated_at for led in ledgers), default=None),
    }


def peer_row(led: Ledger) -> dict[str, Any]:
    return {
        "peer_id": led.peer_id,
        "device": led.device,
        "hardware": led.gpu_model if led.device == "gpu" and led.gpu_model else led.cpu_model,
        "country": led.country or "—",
        "samples": led.samples,
        "tokens": led.tokens,
        "device_hours": led.device_s / 3600,
        "energy_kwh": led.energy_kwh,
        "g_co2e": led.g_co2e,
        "g_co2_per_kwh": led.g_co2e / led.energy_kwh if led.energy_kwh > 0 else None,
        "intensity_source": led.intensity_source,
        "kwh_by_source": led.kwh_by_source,
        "meter": led.meter,
        "updated_at": led.updated_at,
    }


def card_json(card: Card) -> dict[str, Any]:
    sums = totals(card.ledgers)
    return {
        "scope": card.scope,
        "run_id": card.run_id,
        "model": card.model,
        "model_params": card.model_params,
        "totals": sums,
        "peers": [peer_row(led) for led in card.ledgers],
        "rejected_records": list(card.rejected),
        "datacenter": datacenter_estimate(sums["tokens"], card.model_params, card.datacenter),
    }


def _when(unix: float | None) -> str:
    return "—" if not unix else dt.datetime.fromtimestamp(unix, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _how(meter: dict[str, str]) -> str:
    """measured / estimated / mixed, from the meter's labels of the parts that drew energy."""
    kinds = {("estimated" if "estimated" in v else "measured") for v in meter.values() if "not metered" not in v}
    return "not metered" if not kinds else kinds.pop() if len(kinds) == 1 else "measured + estimated"


def _g(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def energy(kwh: float) -> str:
    """kWh in the unit that keeps 3 significant digits readable: Wh, kWh or MWh."""
    if kwh < 1:
        return f"{kwh * 1000:.3g} Wh"
    return f"{kwh:,.3f} kWh" if kwh < 1000 else f"{kwh / 1000:,.3f} MWh"


def co2(grams: float) -> str:
    """g CO2e as mg, g, kg or t CO2e."""
    if grams < 1:
        return f"{grams * 1000:.3g} mg CO2e"
    if grams < 1000:
        return f"{grams:.3g} g CO2e"
    return f"{grams / 1000:,.3f} kg CO2e" if grams < 1e6 else f"{grams / 1e6:,.3f} t CO2e"


def duration(hours: float) -> str:
    if hours * 3600 < 60:
        return f"{hours * 3600:.3g} s"
    return f"{hours * 60:.3g} min" if hours < 1 else f"{hours:,.2f} h"


def summary_lines(card: Card) -> list[str]:
    data = card_json(card)
    t, dc = data["totals"], data["datacenter"]
    what = f"swarm {card.run_id}" if card.scope == "swarm" else f"this peer in swarm {card.run_id}"
    lines = [
        f"Report card: {what} ({card.model}, {card.model_params / 1e6:.2f}M parameters)",
        f"  ledgers from {_when(t['since'])} to {_when(t['until'])}",
        f"Tokens trained   {t['tokens']:,} ({t['samples']:,} samples)",
        f"Peers            {t['peers']}",
        f"GPU-hours        {t['gpu_hours']:.4f}   (CPU-only peers: {t['cpu_hours']:.4f} CPU-hours; "
        f"in forward/backward: {duration(t['compute_hours'])})",
        f"Energy           {energy(t['energy_kwh'])} = {t['energy_kwh']:.6f} kWh   (CPU {energy(t['cpu_kwh'])}, "
        f"GPU {energy(t['gpu_kwh'])}, RAM {energy(t['ram_kwh'])})",
        f"Emissions        {co2(t['kg_co2e'] * 1000)} = {t['kg_co2e']:.6f} kg CO2e   "
        f"(mean {_g(t['mean_g_co2_per_kwh'])} g CO2e/kWh)",
    ]
    if "error" in dc:
        lines.append(f"Datacenter       no comparison: {dc['error']}")
    else:
        a = dc["assumptions"]
        lines += [
            f"Datacenter       the same tokens on {a['gpu']} (estimated): {duration(dc['gpu_hours'])} of one GPU, "
            f"{energy(dc['energy_kwh'])}, {co2(dc['kg_co2e'] * 1000)}",
            f"  assuming {dc['tokens_per_s']:,.0f} tokens/s = MFU {a['mfu']:.0%} × "
            f"{a['peak_flops'] / 1e12:.0f} TFLOP/s / (6 FLOPs × {card.model_params:,} parameters per token),",
            f"  {a['gpu_power_w']:.0f} W per GPU (its TDP; GPU only), PUE {a['pue']:.2f}, "
            f"grid {dc['grid_g_co2_per_kwh']:.0f} g CO2e/kWh ({dc['grid']})",
        ]
    return lines


def render_text(card: Card, width: int = 140) -> str:
    """The card for a terminal: the summary, the per-peer table (rich), the meter paths."""
    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=width, no_color=True, highlight=False)
    for line in summary_lines(card):
        console.print(line, markup=False)
    table = Table(title=None, box=None, pad_edge=False)
    numbers = ("tokens", "device-h", "kWh", "g CO2e", "g/kWh")
    for column in ("peer", "device", "hardware", "grid", *numbers, "meter"):
        table.add_column(column, justify="right" if column in numbers else "left")
    for led in card.ledgers:
        row = peer_row(led)
        table.add_row(
            led.peer_id[:14] + "…",
            led.device,
            (row["hardware"] or "?")[:28],
            row["country"],
            f"{led.tokens:,}",
            f"{row['device_hours']:.4f}",
            f"{row['energy_kwh']:.6f}",
            f"{led.g_co2e:.4f}",
            _g(row["g_co2_per_kwh"]),
            _how(led.meter),
        )
    console.print()
    console.print(table)
    console.print()
    for line in notes(card):
        console.print(line, markup=False)
    return out.getvalue()


def notes(card: Card) -> list[str]:
    """How the energy was metered and where the intensities came from, each distinct path once."""
    paths = sorted({f"{part.upper()}: {label}" for led in card.ledgers for part, label in led.meter.items()})
    sources = sorted({led.intensity_source for led in card.ledgers if led.intensity_source})
    lines = ["Meter paths: " + "; ".join(paths) if paths else "Meter paths: none recorded"]
    lines += [f"Grid intensity: {source}" for source in sources]
    if card.rejected:
        lines.append(f"Refused {len(card.rejected)} ledger record(s) that failed verification:")
        lines += [f"  {why}" for why in card.rejected[:10]]
    return lines


def render_markdown(card: Card) -> str:
    data = card_json(card)
    t, dc = data["totals"], data["datacenter"]
    scope = f"swarm `{card.run_id}`" if card.scope == "swarm" else f"one peer of swarm `{card.run_id}`"
    out = [
        f"### Compute, energy and emissions: {scope}",
        "",
        f"Model {card.model} ({card.model_params:,} parameters); ledgers from {_when(t['since'])} to "
        f"{_when(t['until'])}.",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| tokens trained | {t['tokens']:,} |",
        f"| peers | {t['peers']} |",
        f"| GPU-hours | {t['gpu_hours']:.4f} |",
        f"| CPU-hours (CPU-only peers) | {t['cpu_hours']:.4f} |",
        f"| energy (kWh) | {t['energy_kwh']:.6f} |",
        f"| of which CPU / GPU / RAM (kWh) | {t['cpu_kwh']:.6f} / {t['gpu_kwh']:.6f} / {t['ram_kwh']:.6f} |",
        f"| emissions (kg CO2e) | {t['kg_co2e']:.6f} |",
        f"| mean grid intensity (g CO2e/kWh) | {_g(t['mean_g_co2_per_kwh'])} |",
        "",
        "| peer | device | hardware | grid | tokens | device-hours | kWh | g CO2e | metered |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for led in card.ledgers:
        row = peer_row(led)
        out.append(
            f"| `{led.peer_id[:14]}…` | {led.device} | {row['hardware'] or '?'} | {row['country']} | {led.tokens:,} | "
            f"{row['device_hours']:.4f} | {row['energy_kwh']:.6f} | {led.g_co2e:.3f} | {_how(led.meter)} |"
        )
    out.append("")
    if "error" not in dc:
        a = dc["assumptions"]
        out += [
            f"The same tokens on {a['gpu']} (estimate): {duration(dc['gpu_hours'])} of one GPU, "
            f"{energy(dc['energy_kwh'])}, {co2(dc['kg_co2e'] * 1000)}. Assumptions: training costs 6 FLOPs "
            f"per parameter per token (Kaplan et al. 2020); {dc['tokens_per_s']:,.0f} tokens/s at "
            f"{a['mfu']:.0%} MFU of {a['peak_flops'] / 1e12:.0f} TFLOP/s; {a['gpu_power_w']:.0f} W per GPU "
            f"(TDP, GPU only); PUE {a['pue']:.2f}; {dc['grid_g_co2_per_kwh']:.0f} g CO2e/kWh ({dc['grid']}).",
            "",
        ]
    out += [f"- {line}" for line in notes(card)]
    return "\n".join(out) + "\n"


def series(ledgers: tuple[Ledger, ...] | list[Ledger]) -> list[tuple[float, float, float]]:
    """(unix time, energy J, g CO2e) of the ledgers together: each one's cumulative history, held between points."""
    times = sorted({point[0] for led in ledgers for point in led.history})
    out = []
    for t in times:
        energy = g = 0.0
        for led in ledgers:
            last = None
            for point in led.history:
                if point[0] > t:
                    break
                last = point
            if last is not None:
                energy, g = energy + last[1], g + last[2]
        out.append((t, energy, g))
    return out


def write_chart(card: Card, path: Path) -> Path:
    """A PNG of cumulative energy (kWh) and emissions (g CO2e) over time. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("the chart needs matplotlib (--chart): pip install matplotlib") from None
    points = series(card.ledgers)
    if not points:
        raise ConfigError("no history to chart yet: the ledger has no points (--chart)")
    start = points[0][0]
    minutes = [(t - start) / 60 for t, _, _ in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.step(minutes, [e / J_PER_KWH for _, e, _ in points], where="post", color="tab:orange")
    top.set_ylabel("energy (kWh)")
    bottom.step(minutes, [g for _, _, g in points], where="post", color="tab:green")
    bottom.set_ylabel("emissions (g CO2e)")
    bottom.set_xlabel(f"minutes since {_when(start)}")
    who = f"swarm {card.run_id}, {len(card.ledgers)} peer(s)" if card.scope == "swarm" else f"this peer, {card.run_id}"
    top.set_title(f"p2ptrain: cumulative energy and emissions ({who})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
