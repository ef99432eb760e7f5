"""The dashboard's HTTP server: the page, its data, and ``/metrics``; read-only, on 127.0.0.1 unless told otherwise.

It reads the data directory's ``status.json`` (what the running peer writes every few seconds) and the current
swarm's energy ledger, and keeps what it read every ``SAMPLE_EVERY_S`` for the page's curves (the last
``HISTORY_POINTS``: two hours). The page (``static/index.html``) asks ``/api/status`` for them every second and draws
them with uPlot (MIT, vendored in ``static/``: nothing is fetched at run time). The server is the standard library's
threading HTTP server: one thread per request, no request body ever read, GET only; with ``--control``, POST of
pause and resume too, for the holder of a token (``_Handler.do_POST``).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections import deque
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any

from p2ptrain.dashboard.metrics import CONTENT_TYPE, metrics_text
from p2ptrain.energy.ledger import Ledger, ledger_path, load_ledger
from p2ptrain.errors import LedgerInvalid, P2PTrainError
from p2ptrain.fileio import read_json
from p2ptrain.volunteer import control_socket

logger = logging.getLogger(__name__)

NO_DAEMON = (
    "no volunteer daemon runs for this data directory (p2ptrain daemon start); a peer run by seed or join stops with "
    "Ctrl+C and cannot be paused"
)
SAMPLE_EVERY_S = 2.0
HISTORY_POINTS = 3600
STATIC = {  # what the page may load: name → content type
    "index.html": "text/html; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "swarm.html": "text/html; charset=utf-8",
    "swarm.js": "text/javascript; charset=utf-8",
    "common.js": "text/javascript; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}


class Dashboard:
    """What the server shows for one data directory, and the history it has gathered since it started."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.history: deque[list[float | None]] = deque(maxlen=HISTORY_POINTS)
        self._lock = threading.Lock()

    def status(self) -> dict[str, Any]:
        found = read_json(self.data_dir / "status.json")
        return found if isinstance(found, dict) else {}

    def ledger(self, status: dict[str, Any]) -> Ledger | None:
        run_id = status.get("run_id")
        if not isinstance(run_id, str) or not run_id or "/" in run_id:
            return None
        try:
            return load_ledger(ledger_path(self.data_dir, run_id))
        except LedgerInvalid as e:
            logger.debug("ledger: %s", e)
            return None

    def sample(self) -> None:
        """Add a point to the curves: time, global step, loss, held-out loss, samples/s, kWh, g CO2e."""
        status = self.status()
        ledger = self.ledger(status)
        point = [time.time(), *(_number(status.get(k)) for k in ("epoch", "loss", "val_loss", "samples_per_s"))]
        point += [ledger.energy_kwh if ledger else None, ledger.g_co2e if ledger else None]
        with self._lock:
            if self.history and self.history[-1][1:] == point[1:]:  # the peer wrote nothing new
                return
            self.history.append(point)

    def snapshot(self) -> dict[str, Any]:
        status = self.status()
        ledger = self.ledger(status)
        energy = None
        if ledger is not None:
            energy = {"kwh": ledger.energy_kwh, "g_co2e": ledger.g_co2e, "tokens": ledger.tokens,
                      "device_hours": ledger.device_s / 3600}  # fmt: skip
        with self._lock:
            history = list(self.history)
        return {"now": time.time(), "status": status, "energy": energy, "history": history}

    def run_sampler(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001 - a half-written file: the next sample reads it whole
                logger.debug("dashboard sample: %s", e)
            stop.wait(SAMPLE_EVERY_S)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


class _Handler(BaseHTTPRequestHandler):
    dashboard: Dashboard  # set on the subclass ``serve`` makes
    swarm: Any = None  # ``swarm_health.SwarmHealth`` with ``--swarm``: the page at / is then the swarm's
    control_token: str | None = None  # with ``--control``: what a pause/resume request must carry
    server_version = "p2ptrain-dashboard"

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        """``/api/pause`` and ``/api/resume``, forwarded to the volunteer daemon's control socket, for whoever holds
        the token printed when the dashboard started (header ``X-P2PTrain-Token``); the body is never read. A page
        of another site cannot send that header here without a CORS preflight, which this server does not answer."""
        command = {"/api/pause": "pause", "/api/resume": "resume"}.get(self.path.split("?", 1)[0])
        if self.control_token is None or command is None:
            self._send(HTTPStatus.NOT_IMPLEMENTED, "text/plain; charset=utf-8", b"read-only\n")
            return
        given = self.headers.get("X-P2PTrain-Token", "")
        if not hmac.compare_digest(given.encode(), self.control_token.encode()):
            self._reply(HTTPStatus.FORBIDDEN, {"ok": False, "error": "this page was not opened with the owner's token"})
            return
        try:
            reply = control_socket.request(self.dashboard.data_dir, command, reason="from the dashboard")
        except control_socket.DaemonNotRunning:
            self._reply(HTTPStatus.CONFLICT, {"ok": False, "error": NO_DAEMON})
        except P2PTrainError as e:
            self._reply(HTTPStatus.BAD_GATEWAY, {"ok": False, "error": str(e)})
        else:
            logger.info("Dashboard: %s sent to the daemon", command)
            self._reply(HTTPStatus.OK, {"ok": True, "state": reply.get("state")})

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(body).encode())

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.split("?", 1)[0]
        if path in ("/", "/swarm") and self.swarm is not None:
            self._static("swarm.html")
        elif path == "/api/swarm" and self.swarm is not None:
            self._send(HTTPStatus.OK, "application/json", json.dumps(self.swarm.snapshot()).encode())
        elif path in ("/", "/index.html"):
            self._static("index.html")
        elif path.startswith("/static/") and path.removeprefix("/static/") in STATIC:
            self._static(path.removeprefix("/static/"))
        elif path == "/api/status":
            self._send(HTTPStatus.OK, "application/json", json.dumps(self.dashboard.snapshot()).encode())
        elif path == "/metrics":
            status = self.dashboard.status()
            self._send(HTTPStatus.OK, CONTENT_TYPE, metrics_text(status, self.dashboard.ledger(status)).encode())
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

    def _static(self, name: str) -> None:
        body = resources.files("p2ptrain.dashboard").joinpath("static", name).read_bytes()
        self._send(HTTPStatus.OK, STATIC[name], body)

    def _send(self, status: HTTPStatus, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", "default-src 'self'; style-src 'self' 'unsafe-inline'")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        logger.debug("dashboard: " + format, *args)


def serve(
    data_dir: Path, host: str, port: int, swarm: Any = None, control_token: str | None = None
) -> tuple[ThreadingHTTPServer, Dashboard]:
    """A started server (``serve_forever`` runs in a daemon thread); ``server.server_address`` says the port.
    ``swarm``: a ``swarm_health.SwarmHealth``, whose page then answers at / and its data at ``/api/swarm`` (this
    peer's page moves to /index.html; ``/api/status`` and ``/metrics`` stay). ``control_token``: pause and resume
    the volunteer daemon of ``data_dir`` for requests that carry it (None: read-only)."""
    dashboard = Dashboard(data_dir)
    handler = type("Handler", (_Handler,), {"dashboard": dashboard, "swarm": swarm, "control_token": control_token})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="dashboard-http", daemon=True).start()
    return server, dashboard
