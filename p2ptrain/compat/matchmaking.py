"""Matchmaking for a group whose members every member knows, in hivemind's averager (part of ``compat.hivemind``:
the private names it touches are hivemind 1.1.12's, ``SUPPORTED`` there)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import AsyncIterator  # noqa: UP035 - hivemind reads handlers' stream types from typing's only

from hivemind.averaging.key_manager import GroupKeyManager
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.mpfuture import MPFuture

KNOWN_POLL_S = 0.25  # how often a member of a known group asks its potential leaders again


class KnownGroupKeys(GroupKeyManager):
    """hivemind's group keys, and a group whose members every member knows (``members``; None: hivemind's way).

    hivemind's matchmaking finds a group through the DHT: each member stores itself under the group's key, reads who
    else did, and asks the one that declared the earliest expiration (then the lowest peer id) to lead. With known
    members none of that needs the DHT, one store and one lookup per round (O(log N) requests across the swarm,
    at each level of a grouped round): a member's potential leaders are the known members before it in peer-id
    order, the first one first, so every member asks the lowest one and falls back to the next where it does not
    answer (hivemind redirects a leader's followers when it joins another)."""

    members: tuple[PeerID, ...] | None = None  # in peer-id order (their bytes)
    _polled: tuple[str, float] = ("", -float("inf"))

    async def declare_averager(
        self, group_key: str, peer_id: PeerID, expiration_time: float, looking_for_group: bool = True
    ) -> bool:
        if self.members is None:
            return await super().declare_averager(group_key, peer_id, expiration_time, looking_for_group)
        return True

    async def get_averagers(self, group_key: str, only_active: bool) -> list[tuple[PeerID, float]]:
        if self.members is None:
            return await super().get_averagers(group_key, only_active)
        key, last = self._polled  # hivemind asks again as soon as its queue is empty: a DHT lookup's pace, here
        if key == group_key:
            await asyncio.sleep(max(0.0, last + KNOWN_POLL_S - time.monotonic()))
        self._polled = (group_key, time.monotonic())
        mine = self.peer_id.to_bytes()
        before = [m for m in self.members if m.to_bytes() < mine]
        now = get_dht_time()  # an expiration ahead, rising in peer-id order: hivemind asks the earliest first
        return [(peer, now + 1.0 + i * 1e-3) for i, peer in enumerate(before)]


class KnownGroups:
    """Mixin for hivemind's ``DecentralizedAverager`` (through ``AveragerHooks``): ``set_group``."""

    def set_group(self, bits: str, members: Sequence[str], *, through_dht: bool = False) -> None:
        """The next round's group: its key bits and its members (peer ids, base58: a grouped swarm derives them from
        signed records). The group waits for all of them (hivemind takes ``target_group_size`` once, at
        construction) and they meet without the DHT (``KnownGroupKeys``), or, ``through_dht``, as hivemind's
        matchmaking meets whoever declared the key (a benchmark's baseline). In the averager's process, like
        hivemind's own ``set_group_bits``."""
        future = MPFuture()
        known = None if through_dht else list(members)
        self._outer_pipe.send(("_set_group", [], dict(bits=bits, size=len(members), known=known, future=future)))
        future.result()

    async def _set_group(self, bits: str, size: int, known: list[str] | None, future: MPFuture) -> None:
        try:
            matchmaking = self._matchmaking
            keys = matchmaking.group_key_manager
            if not isinstance(keys, KnownGroupKeys):
                keys = matchmaking.group_key_manager = KnownGroupKeys(
                    keys.dht, keys.prefix, keys.group_bits, keys.target_group_size
                )
            keys.group_bits = bits
            keys.members = None if known is None else tuple(sorted(map(PeerID.from_base58, known), key=PeerID.to_bytes))
            matchmaking.target_group_size = matchmaking.potential_leaders.target_group_size = size
            future.set_result(None)
        except Exception as e:  # noqa: BLE001 - reported to the caller
            future.set_exception(e)

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """hivemind's handler; a known member of this peer's group is taken whatever its declared expiration (the
        order among known members is their peer ids', ``KnownGroupKeys``: each declared its own time)."""
        matchmaking = getattr(self, "_matchmaking", None)
        keys = matchmaking.group_key_manager if matchmaking is not None else None
        if isinstance(keys, KnownGroupKeys) and keys.members is not None and context.remote_id in keys.members:
            declared = matchmaking.potential_leaders.declared_expiration_time
            if declared < float("inf"):
                request.expiration = max(request.expiration, declared)
        async for message in super().rpc_join_group(request, context):
            yield message
