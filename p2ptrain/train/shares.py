"""How much of a group's vector each member aggregates: by reachability, and by the uplink each one measured.

hivemind shares a group's vector among its members by the bandwidth each reports in the all-gather
(``load_balance_peers``: the shares that minimise the slowest member's time, a member's traffic being
vector × (1 + (n − 2) × share)); with none reported, equally. A member on a link 5× slower than the others' then
holds the whole group back as an aggregator. Here:

- a member that cannot be reached directly aggregates nothing (``nat.aggregates``; ``group_rounds`` item 1);
- every other member reports the uplink it **measured** in its last rounds (``uplink``: bytes ÷ seconds of the part
  streams it sent, from ``TimedSends``), once its sends were large enough to get past the buffers on their way
  (``MIN_MEASURED_BYTES``); before that, nothing (hivemind then takes the others' mean);
- each member also publishes the rate of each of its part streams, per peer, as the throughput slot of its near
  record (``link_rates``, ``proximity.encode_near``);
- a reported bandwidth is bounded by ``BANDWIDTH_BOUND`` × the group's median, so a member cannot take most of the
  vector (and the parts it aggregates) by claiming a huge uplink.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any

from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.group_info import GroupInfo

from p2ptrain.swarm.nat import aggregates, cannot_average

logger = logging.getLogger(__name__)

MIN_MEASURED_BYTES = 4_000_000  # below, the unix socket, the daemon and the stream's window hold a round's sends
MIN_LINK_BYTES = 1_000_000  # one stream's, for its rate to the peer (published in the near record)
BANDWIDTH_BOUND = 4.0


def with_shares(group_info: GroupInfo, serializer: Any) -> GroupInfo:
    """``group_info`` with each member's reported [bandwidth, kind] replaced by the bandwidth hivemind shares the
    vector by: 0 for a member that cannot aggregate, the others' bounded by ``BANDWIDTH_BOUND`` × their median."""
    entries = [serializer.loads(raw) for raw in group_info.gathered]
    reported = [entry[0][:2] if isinstance(entry[0], list) else entry[0] for entry in entries]  # pass left out
    if not all(isinstance(r, list) and len(r) == 2 and isinstance(r[1], str) for r in reported):
        raise AllreduceException("a group member did not report its reachability (not a p2ptrain averager)")
    kinds = [r[1] for r in reported]
    if cannot_average(kinds):
        raise AllreduceException(
            f"no member of this group of {len(kinds)} can be reached directly by all the others (reachability "
            f"{', '.join(kinds)}): looking for another group"
        )
    chosen = aggregates(kinds)
    bandwidths = bounded([r[0] if ok else 0.0 for r, ok in zip(reported, chosen, strict=True)])
    gathered = tuple(
        serializer.dumps([bandwidth, *entry[1:]]) for bandwidth, entry in zip(bandwidths, entries, strict=True)
    )
    if not all(chosen):
        logger.debug(
            "Group %s: members %s only send (reachability %s)",
            group_info.group_id.hex()[:8],
            [str(p)[-6:] for p, ok in zip(group_info.peer_ids, chosen, strict=True) if not ok],
            kinds,
        )
    return dataclasses.replace(group_info, gathered=gathered)


def bounded(bandwidths: list[Any]) -> list[float | None]:
    """Reported bandwidths as hivemind's load balancing takes them: None (not measured) for anything that is not a
    positive finite number, 0 kept (cannot aggregate), the rest at most ``BANDWIDTH_BOUND`` × their median."""
    clean = [b if type(b) in (int, float) and math.isfinite(b) and b >= 0 else None for b in bandwidths]
    positive = [b for b in clean if b]
    if not positive:
        return clean
    limit = BANDWIDTH_BOUND * statistics.median(positive)
    return [min(b, limit) if b else b for b in clean]


def uplink(sends: dict[int, tuple[int, float]]) -> float | None:
    """This member's uplink (bytes/s) from its part streams of one round (aggregator → (bytes, seconds)), or None
    if they were too small to tell. The streams run at once: the rate is the most bytes sent by the end of any one
    stream, over that time (each stream taken as steady), so an aggregator slow to receive does not count as a slow
    uplink."""
    if sum(size for size, _ in sends.values()) < MIN_MEASURED_BYTES:
        return None
    rates = []
    for _, until in sends.values():
        if until > 0:
            done = sum(size * min(1.0, until / seconds) if seconds > 0 else size for size, seconds in sends.values())
            rates.append(done / until)
    return max(rates, default=None)


def link_rates(sends: dict[int, tuple[int, float]], peer_ids: Any) -> dict[str, float]:
    """Mbit/s each part stream of a round achieved to its aggregator (by base58 peer id), for the streams large
    enough to tell: what ``proximity`` publishes as this peer's throughput to its neighbours."""
    return {
        peer_ids[index].to_base58(): size * 8 / 1e6 / seconds
        for index, (size, seconds) in sends.items()
        if size >= MIN_LINK_BYTES and seconds > 0
    }


def take_measurements(averager: Any, outcome: Any, on_links: Any) -> None:
    """After a round: the next groups share the vector by this member's measured uplink (its averager's reported
    bandwidth), and ``on_links`` (when set: the prober's ``Neighbours.throughput``) learns the per-link rates."""
    if getattr(outcome, "uplink", None):
        averager.bandwidth = outcome.uplink
    if getattr(outcome, "links", None) and on_links is not None:
        on_links(outcome.links)


def add_sends(sends: dict[int, tuple[int, float]], runner: Any) -> None:
    """Adds a finished runner's part streams (``TimedSends``) to a round's ``sends``: PowerSGD runs two all-reduces
    in a round, one after the other, and the round's streams are both."""
    for index, (size, seconds) in getattr(runner, "sends", {}).items():
        before = sends.get(index, (0, 0.0))
        sends[index] = (before[0] + size, before[1] + seconds)


class TimedSends:
    """All-reduce runner mixin: the bytes and seconds of each part stream this member sends (``sends``, by the
    aggregator's index): from the first part asked for to the last written."""

    sends: dict[int, tuple[int, float]]

    async def generate_input_for_peer(self, peer_index: int) -> AsyncIterator[Any]:
        if not hasattr(self, "sends"):
            self.sends = {}
        started, size = time.perf_counter(), 0
        async for message in super().generate_input_for_peer(peer_index):
            size += len(message.tensor_part.buffer)
            yield message
        self.sends[peer_index] = (size, time.perf_counter() - started)
