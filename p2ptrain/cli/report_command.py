"""``p2ptrain report``: the report card of this peer (its ledger) or of the swarm (from the DHT)."""

from __future__ import annotations

import logging
import logging.handlers
import sys
from pathlib import Path
from typing import Annotated

import typer

from p2ptrain.cli.daemon_commands import daemon_dir
from p2ptrain.cli.options import DataDir, Debug, InitialPeers
from p2ptrain.cli.session import setup_logging
from p2ptrain.settings import PeerSettings

logger = logging.getLogger("p2ptrain")


def report(
    swarm: Annotated[bool, typer.Option("--swarm", help="the whole swarm, from the DHT (default: this peer)")] = False,
    run_id: Annotated[str | None, typer.Option(help="which swarm (default: the last one joined)")] = None,
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

    from p2ptrain.energy import report as rc

    directory = daemon_dir(data_dir)
    if swarm:
        setup_logging(PeerSettings(data_dir=directory, log_level="DEBUG" if debug else "WARNING"), log_file=False)
        card = swarm_card(directory, run_id, invite, list(initial_peers or []))
    else:
        card = local_card(directory, run_id)
    if as_json:
        print(json.dumps(rc.card_json(card), indent=2))
    elif markdown:
        print(rc.render_markdown(card), end="")
    else:
        print(rc.render_text(card), end="")
    if chart is not None:
        print(f"Chart: {rc.write_chart(card, chart)}", file=sys.stderr)


def local_card(directory: Path, run_id: str | None):
    from p2ptrain.energy.ledger import ledger_path, load_ledger
    from p2ptrain.energy.report import Card
    from p2ptrain.errors import ConfigError
    from p2ptrain.swarm.joining import recall_swarm

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


def which_swarm(directory: Path, run_id: str | None, invite: str | None, peers: list[str]):
    """(initial peers, run id or None, manifest hash or None) of the swarm to look at from outside: the invite's,
    the given peers', a running peer's here, or the one this data directory last joined."""
    from p2ptrain.errors import ConfigError
    from p2ptrain.fileio import read_json
    from p2ptrain.swarm.invite import decode_invite
    from p2ptrain.swarm.joining import recall_swarm

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
    return peers, run_id, manifest_hash


def swarm_card(directory: Path, run_id: str | None, invite: str | None, peers: list[str]):
    from p2ptrain.energy.records import gather_swarm
    from p2ptrain.energy.report import Card
    from p2ptrain.errors import ConfigError

    peers, run_id, manifest_hash = which_swarm(directory, run_id, invite, peers)
    found = gather_swarm(peers, run_id, manifest_hash)
    if not found.ledgers and not found.rejected:
        raise ConfigError(f"no peer of swarm {run_id or 'from the invite'} has published a ledger yet")
    name = found.ledgers[0].run_id if found.ledgers else str(run_id)
    return Card("swarm", name, tuple(found.ledgers), tuple(found.rejected))
