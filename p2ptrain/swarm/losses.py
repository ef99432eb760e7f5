"""Each member's losses in the DHT, for the swarm's health page (``dashboard --swarm``): after each held-out
evaluation a member writes ``[global step, held-out loss, training loss or None]`` under its own peer id, signed like
its other records (``signed_records.PeerRecords``). Spread over ``SHARDS`` keys by peer id, as the near records
are (``proximity``): a store returns the whole value the answering nodes hold, so one key for all members would
cost every member O(N) bytes per write.
"""

from __future__ import annotations

import math
from typing import Any

import hivemind
from hivemind.utils import get_dht_time

from p2ptrain.swarm.discovery import bounded
from p2ptrain.swarm.proximity import SHARDS, shard_of

TTL_S = 600.0  # a member that stopped evaluating drops off the page after this
MAX_LOSS = 1e4
MAX_READ = 1024  # records read per shard, at most


def losses_key(run_id: str, shard: int = 0) -> str:
    return f"p2ptrain/v1/losses/{run_id}/{shard}"


def publish_losses(dht: hivemind.DHT, run_id: str, epoch: int, val_loss: float, loss: float | None) -> None:
    """Write this member's losses at global step ``epoch`` (in the background: the caller does not wait)."""
    peer = dht.peer_id.to_base58()
    value = [int(epoch), float(val_loss), None if loss is None else float(loss)]
    dht.store(losses_key(run_id, shard_of(peer)), value, get_dht_time() + TTL_S, subkey=peer, return_future=True)


def decode_losses(value: Any) -> tuple[int, float, float | None] | None:
    """A record's (global step, held-out loss, training loss), or None if it is not one."""
    if not isinstance(value, list) or len(value) != 3:
        return None
    epoch, val, loss = value
    if type(epoch) is not int or epoch < 0 or not _loss(val) or not (loss is None or _loss(loss)):
        return None
    return epoch, float(val), None if loss is None else float(loss)


def _loss(x: Any) -> bool:
    return isinstance(x, float | int) and not isinstance(x, bool) and math.isfinite(x) and 0 <= x <= MAX_LOSS


def read_losses(dht: hivemind.DHT, run_id: str) -> dict[str, tuple[int, float, float | None]]:
    """Every member's latest losses that check out (peer id → (global step, held-out, training)), from every shard;
    malformed ones, and ones in another peer's shard, are skipped."""
    futures = [dht.get(losses_key(run_id, shard), latest=True, return_future=True) for shard in range(SHARDS)]
    found: dict[str, tuple[int, float, float | None]] = {}
    for shard, future in enumerate(futures):
        record = bounded(future)
        if record is None or not isinstance(record.value, dict):
            continue
        for peer, entry in list(record.value.items())[:MAX_READ]:
            losses = decode_losses(getattr(entry, "value", None))
            if isinstance(peer, str) and shard_of(peer) == shard and losses is not None:
                found[peer] = losses
    return found
