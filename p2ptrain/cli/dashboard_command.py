"""``p2ptrain dashboard``: this peer's page and ``/metrics`` on a local port (``p2ptrain/dashboard``)."""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import Annotated

import typer

from p2ptrain.cli.daemon_commands import daemon_dir
from p2ptrain.cli.options import DataDir, Debug
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
    data_dir: DataDir = None,
    debug: Debug = False,
) -> None:
    """Serve a live page of this peer (state, loss, throughput, energy) and Prometheus /metrics. Read-only."""
    from p2ptrain.dashboard.server import serve

    directory = daemon_dir(data_dir)
    setup_logging(PeerSettings(data_dir=directory, log_level="DEBUG" if debug else "INFO"), log_file=False)
    try:
        if not ipaddress.ip_address(host).is_loopback:
            logger.warning("Serving the dashboard on %s: anyone who can reach this address sees it", host)
    except ValueError:
        raise ConfigError(f"--dashboard-host {host!r} is not an IP address") from None
    try:
        server, board = serve(directory, host, port)
    except OSError as e:
        raise PortInUse(f"cannot serve on {host}:{port} ({e.strerror}): choose another --port") from None
    bound = server.server_address[1]
    print(f"Dashboard of {directory}: http://{host}:{bound}/  (Prometheus: http://{host}:{bound}/metrics)", flush=True)

    def run(stop: threading.Event) -> None:
        try:
            board.run_sampler(stop)
        finally:
            server.shutdown()
            server.server_close()

    until_signalled(run)
