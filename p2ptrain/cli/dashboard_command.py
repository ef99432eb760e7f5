"""``p2ptrain dashboard``: this peer's page and ``/metrics`` on a local port (``p2ptrain/dashboard``)."""

from __future__ import annotations

import ipaddress
import logging
import secrets
import threading
from pathlib import Path
from typing import Annotated, Any

import typer

from p2ptrain.cli.daemon_commands import daemon_dir
from p2ptrain.cli.options import DataDir, Debug, InitialPeers
from p2ptrain.cli.session import setup_logging, until_signalled
from p2ptrain.errors import ConfigError, PortInUse
from p2ptrain.settings import PeerSettings

logger = logging.getLogger("p2ptrain")
DEFAULT_PORT = 8470


def dashboard(
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free one)")] = DEFAULT_PORT,
    host: Annotated[
        str, typer.Option("--dashboard-host", help="address to serve on; anything but loopback shows it to others")
    ] = "127.0.0.1",
    swarm: Annotated[
        bool, typer.Option("--swarm", help="the whole swarm's health page, from the peers' signed DHT records")
    ] = False,
    run_id: Annotated[str | None, typer.Option(help="--swarm: which swarm (default: the last one joined)")] = None,
    invite: Annotated[str | None, typer.Option(help="--swarm: reach the swarm through this invite")] = None,
    initial_peers: InitialPeers = None,
    control: Annotated[
        bool, typer.Option("--control", help="pause/resume buttons, for whoever opens the printed URL (its token)")
    ] = False,
    data_dir: DataDir = None,
    debug: Debug = False,
) -> None:
    """Serve a live page of this peer (state, loss, throughput, rounds, energy) and Prometheus /metrics, or with
    --swarm every peer of the swarm as the DHT shows it. Read-only."""
    directory = daemon_dir(data_dir)
    setup_logging(PeerSettings(data_dir=directory, log_level="DEBUG" if debug else "INFO"), log_file=False)
    try:
        if not ipaddress.ip_address(host).is_loopback:
            logger.warning("Serving the dashboard on %s: anyone who can reach this address sees it", host)
    except ValueError:
        raise ConfigError(f"--dashboard-host {host!r} is not an IP address") from None
    if control and not ipaddress.ip_address(host).is_loopback:
        raise ConfigError("--control works on loopback only: its token would cross the network in clear text")
    token = secrets.token_urlsafe(18) if control else None
    if not swarm:
        return _serve(directory, host, port, None, token)
    from p2ptrain.cli.report_command import which_swarm
    from p2ptrain.dashboard.swarm_health import SwarmHealth, validators
    from p2ptrain.swarm.observer import observe

    peers, run_id, manifest_hash = which_swarm(directory, run_id, invite, list(initial_peers or []))
    with observe(peers, run_id, manifest_hash, validators) as (dht, run):
        _serve(directory, host, port, SwarmHealth(dht, run), token)


def _serve(directory: Path, host: str, port: int, swarm: Any, token: str | None) -> None:
    """Serve until SIGINT/SIGTERM; ``swarm``: a ``SwarmHealth`` to read and show (None: this peer's page);
    ``token``: what pause/resume requests must carry (None: read-only)."""
    from p2ptrain.dashboard.server import serve

    try:
        server, board = serve(directory, host, port, swarm, token)
    except OSError as e:
        raise PortInUse(f"cannot serve on {host}:{port} ({e.strerror}): choose another --port") from None
    bound = server.server_address[1]
    url = f"http://{host}:{bound}/"
    if swarm is not None:
        print(f"Swarm {swarm.run_id}: {url}  (every peer, from the DHT; this peer's page: {url}index.html)", flush=True)
    else:
        print(f"Dashboard of {directory}: {url}  (Prometheus: {url}metrics)", flush=True)
    if token is not None:
        print(f"Pause/resume buttons (keep this URL to yourself): {url}index.html?token={token}", flush=True)

    def run(stop: threading.Event) -> None:
        reader = None
        if swarm is not None:
            reader = threading.Thread(target=swarm.run, args=(stop,), name="swarm-health", daemon=True)
            reader.start()
        try:
            board.run_sampler(stop)
        finally:
            server.shutdown()
            server.server_close()
            if reader is not None:
                reader.join(10)

    until_signalled(run)
