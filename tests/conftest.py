"""Shared test helpers: a signing key, a valid manifest for gpt2-tiny, the lab's namespaces, a swarm's DHT node."""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from p2ptrain.swarm.manifest import SwarmManifest, new_manifest

# no test reaches the Hugging Face hub (its client retried for 23 s before failing here); peers inherit this
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the cores: one torch thread each, or both crawl
    import torch

    torch.set_num_threads(1)


def pytest_itemcollected(item) -> None:
    """Swarm tests (``slow``) run one after another on one xdist worker (``--dist loadgroup``): each trains on about
    1.5 of this machine's cores, and two at once stretch their rounds past the averaging timeouts. A light one (a single
    peer, or averagers and DHT nodes that do not train: under one core) is marked ``slow(alone=False)`` and runs
    beside the others. The NAT and distance labs stay in the group: beside other tests, a volunteer's port mapping
    was not confirmed within 2 minutes in one CI run."""
    marker = item.get_closest_marker("slow")
    if marker and marker.kwargs.get("alone", True):
        item.add_marker(pytest.mark.xdist_group("swarm"))


@pytest.fixture(autouse=True)
def _logging_as_it_was():
    """Tests run the CLI in-process, and its ``setup_logging`` replaces the root logger's handlers with one that
    writes to this test's captured stderr, closed after it: every later record in this worker would be a
    "Logging error". Each test leaves the root and hivemind loggers as it found them (pytest's own capturing
    handlers, one per test phase, are pytest's to add and remove)."""

    def ours(handler: logging.Handler) -> bool:
        return not type(handler).__module__.startswith("_pytest")

    loggers = [logging.getLogger(), logging.getLogger("hivemind")]
    saved = [(log, [h for h in log.handlers if ours(h)], log.level, log.propagate) for log in loggers]
    yield
    for log, handlers, level, propagate in saved:
        log.handlers[:] = [h for h in log.handlers if not ours(h)] + handlers
        log.setLevel(level)
        log.propagate = propagate


def netns(tag: int | str | None = None) -> set[str]:
    """The network namespaces of one lab: those named with ``tag`` (netlab's ``p2pt<tag>-…``, bench_wan's
    ``p2pt-<tag>-…``; by default this process's, as both name them), not another test session's."""
    tag = os.getpid() % 100000 if tag is None else tag
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    return {name for name in names if re.match(rf"p2pt-?{tag}-", name)}


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes(range(32)))


@pytest.fixture
def manifest(key) -> SwarmManifest:
    return new_manifest(
        key,
        run_id="test-run",
        model="gpt2-tiny",
        dataset="default",
        tokenizer="bytes",
        seq_len=32,
        target_batch_size=16,
        created_at=1_790_000_000,
    )


class FakeGridApi:
    """A live grid-intensity source on 127.0.0.1 (the machine has no internet): GB's Carbon Intensity API and
    Electricity Maps' routes, answering what the test sets; ``hang_s`` holds every answer (a source that is
    down but accepts connections); ``requests`` records each request's path and auth-token."""

    def __init__(self) -> None:
        import http.server
        import threading
        import time

        self.routes: dict[str, tuple[int, bytes]] = {}
        self.hang_s = 0.0
        self.requests: list[tuple[str, str | None]] = []
        self._stop = threading.Event()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                api.requests.append((self.path, self.headers.get("auth-token")))
                deadline = time.monotonic() + api.hang_s
                while time.monotonic() < deadline and not api._stop.is_set():
                    time.sleep(0.05)
                route = next((r for r in api.routes if self.path.startswith(r)), None)
                status, body = api.routes[route] if route else (404, b'{"error": "no such route"}')
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up (its timeout)

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def answer(self, path_prefix: str, value: object, status: int = 200) -> None:
        import json

        self.routes[path_prefix] = (status, value if isinstance(value, bytes) else json.dumps(value).encode())

    def close(self) -> None:
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def grid_api():
    api = FakeGridApi()
    yield api
    api.close()


def uk_forecast(start: float, values: list[float], actual: float | None = None) -> dict:
    """GB Carbon Intensity API's answer to /intensity/<from>/fw24h: half-hours from ``start`` (unix)."""
    import datetime as dt

    def iso(t: float) -> str:
        return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")

    rows = []
    for i, value in enumerate(values):
        t = start + 1800 * i
        rows.append(
            {
                "from": iso(t),
                "to": iso(t + 1800),
                "intensity": {"forecast": value, "actual": actual if i == 0 else None, "index": "moderate"},
            }
        )
    return {"data": rows}


def swarm_node(directory: Path, run_id: str, initial: list | None = None):  # noqa: ANN201 - hivemind.DHT
    """A loopback DHT node as a member of swarm ``run_id`` runs it: its own libp2p identity (kept in ``directory``)
    and the swarm's validator of signed per-peer records."""
    import hivemind

    from p2ptrain.swarm.identity import ensure_identity, identity_key
    from p2ptrain.swarm.signed_records import PeerRecords

    directory.mkdir(parents=True, exist_ok=True)
    ensure_identity(directory)
    return hivemind.DHT(
        start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(directory / "identity.key"),
        initial_peers=initial or [], record_validators=[PeerRecords([run_id], identity_key(directory))],
    )  # fmt: skip


def swarm_nodes(directory: Path, count: int, run_id: str = "test-run") -> list:
    """``count`` loopback ``swarm_node``s in ``directory``/node<i>, bootstrapped from the first."""
    first = swarm_node(directory / "node0", run_id)
    return [first] + [swarm_node(directory / f"node{i}", run_id, first.get_visible_maddrs()) for i in range(1, count)]


def node_optimizers(directory: Path, nodes: list, models: list, manifest) -> list:  # noqa: ANN001 - a manifest
    """Each of ``swarm_nodes``' optimizer as its peer makes it: its identity signs its progress record and parts."""
    from p2ptrain.settings import PeerSettings
    from p2ptrain.swarm.identity import identity_key
    from p2ptrain.train.optimizers import make_optimizer

    return [
        make_optimizer(
            node, model, manifest, PeerSettings(data_dir=directory / str(i), batch_size=16),
            identity=identity_key(directory / f"node{i}"),
        )
        for i, (node, model) in enumerate(zip(nodes, models, strict=True))
    ]  # fmt: skip
