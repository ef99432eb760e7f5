"""The report card: sums of ledgers, the datacenter estimate's arithmetic, the CLI's outputs and the chart."""

from __future__ import annotations

import json

import pytest

from p2ptrain.cli.app import main
from p2ptrain.energy.ledger import Ledger, ledger_path, save_ledger
from p2ptrain.energy.report import Card, Datacenter, datacenter_estimate, render_markdown, render_text, series, totals
from p2ptrain.errors import ExitCode
from p2ptrain.volunteer.status_text import describe_status

KWH = 3.6e6


def peers() -> list[Ledger]:
    common = dict(run_id="run", model="gpt2-small", model_params=124_000_000, started_at=1.8e9)
    return [
        Ledger(
            peer_id="QmAlice",
            samples=100,
            tokens=102_400,
            device="gpu",
            device_s=7200.0,
            compute_s=3600.0,
            gpu_j=2 * KWH,
            cpu_j=0.5 * KWH,
            ram_j=0.25 * KWH,
            g_co2e=2.75 * 56,
            gpu_model="1 x NVIDIA GeForce RTX 3080",
            country="FRA",
            meter={"cpu": "RAPL (measured)", "gpu": "NVML energy counter (measured)", "ram": "x (estimated)"},
            history=[[1.8e9, 0.0, 0.0, 0.0], [1.8e9 + 3600, 1.375 * KWH, 77.0, 51_200.0]],
            updated_at=1.8e9 + 7200,
            **common,
        ),
        Ledger(
            peer_id="QmBob",
            samples=50,
            tokens=51_200,
            device="cpu",
            device_s=3600.0,
            compute_s=1800.0,
            cpu_j=KWH,
            g_co2e=400.0,
            cpu_model="AMD EPYC",
            country="POL",
            meter={"cpu": "TDP × load (estimated)"},
            history=[[1.8e9 + 1800, 0.5 * KWH, 200.0, 25_600.0]],
            updated_at=1.8e9 + 3600,
            **common,
        ),
    ]


def test_totals_are_the_sums_of_the_peers_ledgers():
    t = totals(peers())
    assert (t["peers"], t["samples"], t["tokens"]) == (2, 150, 153_600)
    assert (t["gpu_hours"], t["cpu_hours"], t["compute_hours"]) == (2.0, 1.0, 1.5)
    assert (t["energy_kwh"], t["gpu_kwh"], t["cpu_kwh"], t["ram_kwh"]) == (3.75, 2.0, 1.5, 0.25)
    assert t["kg_co2e"] == pytest.approx((2.75 * 56 + 400) / 1000, rel=1e-15)
    assert t["mean_g_co2_per_kwh"] == pytest.approx((2.75 * 56 + 400) / 3.75)
    assert (t["since"], t["until"]) == (1.8e9, 1.8e9 + 7200)


def test_the_datacenter_estimate_follows_its_stated_formula():
    dc = Datacenter()
    got = datacenter_estimate(10**9, 124_000_000, dc)
    tokens_per_s = 0.40 * 312e12 / (6 * 124e6)  # 167,742 tokens/s on one A100
    hours = 1e9 / tokens_per_s / 3600
    assert got["tokens_per_s"] == pytest.approx(tokens_per_s) and got["gpu_hours"] == pytest.approx(hours)
    assert got["energy_kwh"] == pytest.approx(hours * 0.4 * 1.1)
    assert got["kg_co2e"] == pytest.approx(hours * 0.4 * 1.1 * got["grid_g_co2_per_kwh"] / 1000)
    assert "United States" in got["grid"] and got["assumptions"]["pue"] == 1.1
    assert "error" in datacenter_estimate(10, 0, dc)


def test_the_swarm_series_adds_each_peers_cumulative_history_held_between_points():
    assert series(peers()) == [
        (1.8e9, 0.0, 0.0),
        (1.8e9 + 1800, 0.5 * KWH, 200.0),  # Alice still at her first point
        (1.8e9 + 3600, 1.875 * KWH, 277.0),
    ]


def test_text_and_markdown_show_every_peer_and_say_what_is_estimated():
    card = Card("swarm", "run", tuple(peers()), rejected=("QmMallory…: the signature … does not verify",))
    text = render_text(card)
    assert "Tokens trained   153,600" in text and "GPU-hours        2.0000" in text
    assert "QmAlice" in text and "QmBob" in text and "RTX 3080" in text
    assert "measured + estimated" in text and "TDP × load (estimated)" in text
    assert "Refused 1 ledger record(s)" in text and "NVIDIA A100-SXM4-80GB" in text and "PUE 1.10" in text
    markdown = render_markdown(card)
    assert "| tokens trained | 153,600 |" in markdown and "| `QmAlice…` | gpu |" in markdown
    assert "6 FLOPs per parameter per token (Kaplan et al. 2020)" in markdown


def run_cli(capsys, tmp_path, *argv):
    code = main(list(argv), env={"HOME": str(tmp_path)})
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_of_this_peer_through_the_cli(capsys, tmp_path):
    data_dir = tmp_path / "data"
    alice = peers()[0]
    save_ledger(ledger_path(data_dir, "run"), alice)
    code, out, _ = run_cli(capsys, tmp_path, "report", "--data-dir", str(data_dir))
    assert code == 0 and "this peer in swarm run" in out and "102,400" in out
    code, out, _ = run_cli(capsys, tmp_path, "report", "--data-dir", str(data_dir), "--json")
    data = json.loads(out)
    assert code == 0 and data["totals"]["tokens"] == 102_400 and data["peers"][0]["peer_id"] == "QmAlice"
    assert data["totals"]["energy_kwh"] == 2.75 and data["datacenter"]["assumptions"]["gpu"] == "NVIDIA A100-SXM4-80GB"
    code, out, err = run_cli(
        capsys, tmp_path, "report", "--data-dir", str(data_dir), "--markdown", "--chart", str(tmp_path / "c.png")
    )
    assert code == 0 and out.startswith("### Compute, energy and emissions") and "c.png" in err
    png = (tmp_path / "c.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_without_a_ledger_is_one_clear_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, tmp_path, "report", "--data-dir", str(tmp_path / "empty"))
    assert code == ExitCode.USAGE and err.startswith("p2ptrain: error: no energy ledger in") and "Traceback" not in err
    code, _, err = run_cli(capsys, tmp_path, "report", "--swarm", "--data-dir", str(tmp_path / "empty"))
    assert code == ExitCode.USAGE and "which swarm? Give --invite" in err


def test_status_shows_the_persistent_ledger_instead_of_this_runs_counters():
    reply = {
        "daemon_pid": 7,
        "state": "training",
        "peer": {"run_id": "run", "model": "gpt2-small", "epoch": 3, "peers": 2, "samples": 5},
        "ledger": {
            "samples": 1_000,
            "tokens": 1_024_000,
            "device": "gpu",
            "device_s": 5400.0,
            "energy_kwh": 0.3,
            "g_co2e": 16.8,
            "meter": {"gpu": "NVML energy counter (measured)"},
        },
        "grid": {"g_co2_per_kwh": 56.0, "source": "country average for France"},
    }
    text = describe_status(reply)
    assert "Last round" not in text  # not a grouped swarm
    grouped = {"step": 7, "ok": True, "peers": 4, "levels": [[0, ["QmNearby123456"], 0.08], [1, ["QmFar654321"], 0.4]]}
    reply["peer"]["last_rounds"] = [grouped, {"step": 8, "ok": False, "reason": "timeout"}]
    assert "Last round (global step 7): level 0 with …123456 (0.08 s); level 1 with …654321 (0.40 s)" in (
        describe_status(reply)
    )
    assert "Contributed to this swarm: 1,000 samples (1,024,000 tokens), 1.50 GPU-hours, 0.3000 kWh (measured)" in text
    assert "16.8 g CO2e" in text and "Grid: 56 g CO2e/kWh (country average for France)" in text
    assert "Contributed since start" not in text
    assert "nothing counted yet" in describe_status({**reply, "ledger": None})


def test_report_of_the_swarm_finds_it_through_the_peer_running_here(capsys, tmp_path, monkeypatch, manifest):
    """No flags: the invite of the peer running in --data-dir (its status file) reaches the swarm."""
    from p2ptrain.energy.records import SwarmLedgers
    from p2ptrain.swarm.invite import Invite

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    address = "/ip4/127.0.0.1/tcp/4001/p2p/QmSBoh5NCsUGDKbnVUKhvd78osN82HdGPSjZvu3AjK7N6u"
    invite = Invite(manifest.hash, "gpt2-small", (address,)).encode()
    (data_dir / "status.json").write_text(json.dumps({"run_id": "run", "invite": invite, "state": "training"}))
    asked = []

    def gather(initial_peers, run_id, manifest_hash=None):
        asked.append((initial_peers, run_id))
        return SwarmLedgers(peers(), ["QmMallory…: the signature does not verify"])

    monkeypatch.setattr("p2ptrain.energy.records.gather_swarm", gather)
    code, out, _ = run_cli(capsys, tmp_path, "report", "--swarm", "--data-dir", str(data_dir))
    assert code == 0 and asked == [([address], "run")]
    assert "Peers            2" in out and "Refused 1 ledger record(s)" in out


def test_status_says_how_a_peer_behind_nat_is_connected():
    peer = {"run_id": "run", "model": "gpt2-tiny", "epoch": 3, "peers": 4}
    peer |= {"reachability": "behind NAT (11.77.0.7)", "network_role": "reachable through 2 relay(s)"}
    peer["connections"] = {"direct": 3, "hole-punched": 1, "relayed": 0}
    text = describe_status({"daemon_pid": 7, "state": "training", "peer": peer, "ledger": None})
    assert "Network: reachable through 2 relay(s); connections: 3 direct, 1 hole-punched, 0 relayed" in text
    text = describe_status({"daemon_pid": 7, "state": "training", "peer": peer | {"network_isolated": True}})
    assert "no member reachable: training waits for a relay" in text


def test_status_names_the_nearest_members_and_their_round_trips():
    nearest = [["12D3KooWAbcdefXYZ123", 4.26], ["12D3KooWQqq999", 151.0]]
    peer = {"run_id": "run", "model": "gpt2-tiny", "nearest": nearest}
    text = describe_status({"daemon_pid": 7, "state": "training", "peer": peer, "ledger": None})
    assert "Nearest members: …XYZ123 4 ms, …Qqq999 151 ms" in text


def test_status_says_when_a_peer_cannot_catch_up_with_the_swarm():
    peer = {"run_id": "run", "model": "gpt2-tiny", "falling_behind": {"downloads": 3, "download_s": 3.4, "step_s": 2.5}}
    text = describe_status({"daemon_pid": 7, "state": "training", "peer": peer, "ledger": None})
    expected = "Falling behind: back from each state download (3.4 s; the swarm steps every 2.5 s) this peer had missed"
    assert expected in text
