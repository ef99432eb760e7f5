"""Looking at a swarm from outside: a client-mode DHT node (no identity of its own, nothing served) that reads the
swarm's records, as ``p2ptrain report --swarm`` and ``p2ptrain dashboard --swarm`` do, and leaves no process behind
(not even when killed with SIGKILL: ``processes.die_with_parent``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import hivemind
import psutil

from p2ptrain.errors import PeerUnreachable


@contextlib.contextmanager
def observe(
    initial_peers: list[str],
    run_id: str | None,
    manifest_hash: bytes | None = None,
    validators: Callable[[str], list[Any]] = lambda _run_id: [],
) -> Iterator[tuple[hivemind.DHT, str]]:
    """Join the swarm's DHT as a client; yield (the node, the swarm's run id), then shut it down.

    ``run_id`` names the swarm; with only ``manifest_hash`` (an invite), the manifest is fetched for it.
    ``validators(run_id)``: the record validators the reader needs (signatures of the records it reads).

    Raises:
        PeerUnreachable: none of ``initial_peers`` answered, or the manifest is not served.
    """
    from hivemind.p2p import P2PDaemonError

    from p2ptrain.compat.hivemind import hold_dht_tasks
    from p2ptrain.processes import descendants, die_with_parent
    from p2ptrain.swarm.discovery import fetch_manifest

    die_with_parent()  # the node's processes (p2pd among them) go with this one, even when it is killed
    before = {p.pid for p in descendants()}  # a caller's own children (a test's DHT nodes) are not ours to reap
    try:
        dht = hivemind.DHT(
            start=True, initial_peers=initial_peers, client_mode=True,
            record_validators=validators(run_id) if run_id else [],
        )  # fmt: skip
    except P2PDaemonError as e:
        raise PeerUnreachable(
            f"none of the {len(initial_peers)} peers answered ({e}). Check --initial-peers / --invite, "
            "or that the swarm is still running."
        ) from None
    children = [p for p in descendants() if p.pid not in before]
    try:
        dht.run_coroutine(hold_dht_tasks)
        if run_id is None:
            run_id = fetch_manifest(dht, manifest_hash)[0].run_id
            dht.add_validators(validators(run_id))
        yield dht, run_id
    finally:
        dht.shutdown()
        _, alive = psutil.wait_procs(children, timeout=3.0)  # only the DHT's own processes (p2pd is one)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
