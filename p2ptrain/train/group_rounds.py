"""Averaging rounds among peers that may sit behind NAT: who aggregates a part, and what counts as a round done.

hivemind cuts a group's vector into parts, each member aggregates its share of them from everybody and sends the
average back (parts of a quarter of a share here: ``codecs.part_size``). Two things go wrong behind NAT routers;
this module fixes both for every averager p2ptrain runs, as a mixin, and makes the average the same on every member:

1. **Who aggregates.** A member nobody can open a direct connection to cannot aggregate: every other member's
   part for it would have to cross a relay, which is no data path (``nat.py``). Each member reports its
   reachability kind with its bandwidth in the group's all-gather; from the same reports every member derives
   the same shares (``nat.aggregates``): a member that cannot aggregate gets a share of 0 and only sends its part
   and receives the average, as hivemind's client-mode peers do. The others' shares follow the uplinks they
   measured (``shares.py``): each round's ``RoundOutcome`` carries what this member's part streams achieved.
2. **A round that lost a part is not a success.** hivemind's all-reduce does not fail when one member's exchange
   with another fails: the sender keeps its own values for that part, the aggregator leaves the sender out, and
   the round still returns as averaged with everybody, so members end the step with different values and nobody
   says so. Here an aggregator fails every part it could not average with every member, and a member whose
   result is missing a part fails the round (``same_average``): every member fails alike, and hivemind retries the
   round or reports it failed ("proceeding with local gradients"). The parameter check after each global step
   (``param_check.py``) finds and resynchronises a member whose parameters left the group's all the same.
3. **One average for all.** hivemind's aggregator sends each member the compressed *difference* between the
   average and that member's part, which each adds to its own values: with fp16 every member ends off the average
   by the rounding of its *own* part. Here the aggregator sends the average itself, compressed, and each member,
   the aggregator included, takes that decompressed average (``same_average``): all hold the same values. Members
   of older versions must not be in the same group (they would add an average as a difference): ``VERSION`` is in
   the key prefix.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator  # noqa: UP035 - hivemind reads handlers' stream types from typing's only

from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.group_info import GroupInfo
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, as_aiter

from p2ptrain.compat.hivemind import AveragerHooks, allreduce_to_values
from p2ptrain.swarm.admission import Admission, NotAdmitted
from p2ptrain.swarm.discovery import accusations_key, passes_key, revoked_key
from p2ptrain.swarm.nat import REPORTED_KINDS
from p2ptrain.swarm.reachability import Kind
from p2ptrain.train.accusations import READ_EVERY_S, Accusations, rms
from p2ptrain.train.bans import Bans
from p2ptrain.train.codecs import part_size
from p2ptrain.train.policy import Plan
from p2ptrain.train.robust import AverageBound
from p2ptrain.train.same_average import SameAverageRunner, check_whole
from p2ptrain.train.shares import add_sends, link_rates, uplink, with_shares
from p2ptrain.train.signed_parts import PartSigner

logger = logging.getLogger(__name__)


class RoundOutcome(dict):
    """What an averager's round returns (``step()``): the members' gathered data, plus what this round cost. The
    compressed averagers fill in the codec's fields; every averager here, hivemind's own too, the measured ones."""

    level: int = -1  # LADDER index when adaptive, else -1
    codec: str = ""
    ratio: float = 1.0  # < 1: only shared_indices(group_id, numel, ratio) were averaged; the rest are 0
    group_id: bytes = b""
    round_s: float = 0.0
    bytes_sent: float = 0.0
    group_size: int = 0
    plan: Plan | None = None  # adaptive: the prediction the level was chosen by
    levels: tuple = ()  # a grouped round's (``level_rounds``): (level, the other members, seconds) of each level
    uplink: float | None = None  # bytes/s this member's part streams measured (``shares.uplink``); None: too small
    links: dict | None = None  # Mbit/s of each part stream, by peer id (``shares.link_rates``)


class GroupRounds(Accusations, AveragerHooks):
    """Mixin for hivemind's ``DecentralizedAverager`` subclasses (listed first among the bases).

    ``reach_kind``: this peer's reachability kind (``reachability.Kind``), reported in each round's all-gather;
    ``aggregation``: how the parts this peer aggregates are checked and reduced (``robust.AGGREGATIONS``, from the
    manifest: every member of a swarm uses the same rule); ``admission``: a private swarm's rules (None: open), by
    which every member's pass is checked when it asks to join a group, when a group begins, and before it may
    download this peer's state; ``signer``: this peer's part key, with which this averager signs its parts, refuses
    unsigned ones, keeps evidence and judges other peers' (``accusations.py``; None: none of that, for tests)."""

    runner_type = SameAverageRunner  # what runs each all-reduce (a subclass in tests)

    def __init__(
        self,
        *args: Any,
        reach_kind: str = Kind.UNKNOWN,
        aggregation: str = "centered_clip",
        bans: Bans | None = None,
        admission: Admission | None = None,
        signer: PartSigner | None = None,
        read_accusations_every_s: float = READ_EVERY_S,
        **kwargs: Any,
    ):
        self.reach_kind = reach_kind.value if isinstance(reach_kind, Kind) else reach_kind  # a plain string on the wire
        if self.reach_kind not in REPORTED_KINDS:
            raise ValueError(f"unknown reachability kind {reach_kind!r}")
        self.aggregation = aggregation
        self.bans = bans or Bans()  # used in the averager's process, where rounds and handlers run
        self.admission = admission
        self._admitted: dict[str, float] = {}  # peer id → when its pass last checked out (bounded: _remember)
        self._refused_logged: dict[str, float] = {}
        self._revocations_read = -float("inf")
        self._tasks: set[asyncio.Task] = set()
        self._sends: dict[bytes, dict[int, tuple[int, float]]] = {}  # a running round's part streams (``TimedSends``)
        if admission is not None or hasattr(self, "check_served_state"):  # hivemind's state download opens its
            self.get_stub = self._download_stub  # streams with ``self.get_stub``, and nothing else does
        self.signer = signer
        self.accusations_key = accusations_key(kwargs["prefix"]) if kwargs.get("prefix") else None
        self._init_accusations(read_accusations_every_s)
        if kwargs.get("prefix"):
            kwargs["prefix"] = f"{kwargs['prefix']}_{VERSION}"
        super().__init__(*args, **kwargs)

    # hivemind gathers [bandwidth, mode, user data] from each member (averager.py step()); the bandwidth slot
    # carries [bandwidth, reach kind] between p2ptrain's averagers, and is turned back before hivemind reads it.
    @property
    def bandwidth(self) -> list[Any]:
        if self.admission is not None:  # a private swarm's members also show their pass
            return [self._bandwidth, self.reach_kind, self.admission.own_pass]
        return [self._bandwidth, self.reach_kind]

    @bandwidth.setter
    def bandwidth(self, value: float | None) -> None:
        self._bandwidth = value

    async def aggregate_with_group(self, group_info: GroupInfo, *args: Any, **kwargs: Any) -> Any:
        self.read_accusations()
        if self.admission is not None:
            for peer_id, raw in zip(group_info.peer_ids, group_info.gathered, strict=True):
                reason = self._refusal(peer_id, _shown_pass(self.serializer, raw))
                if reason:
                    raise AllreduceException(f"group member {peer_id} is not admitted to this private swarm: {reason}")
        if kwargs.get("tensor_infos"):  # hivemind's averagers; p2ptrain's compressed ones size their parts themselves
            bytes_per_value = 4 * kwargs["compression"].estimate_compression_ratio(kwargs["tensor_infos"][0])
            kwargs["part_size_bytes"] = part_size(self.total_size * bytes_per_value, group_info.group_size)
        started = time.perf_counter()
        try:
            result = await super().aggregate_with_group(with_shares(group_info, self.serializer), *args, **kwargs)
        finally:
            sends = self._sends.pop(group_info.group_id, {})
        outcome = result if isinstance(result, RoundOutcome) else RoundOutcome(result)
        outcome.round_s = outcome.round_s or time.perf_counter() - started  # the compressed ones time the all-reduce
        outcome.uplink, outcome.links = uplink(sends), link_rates(sends, group_info.peer_ids)
        return outcome

    async def run_allreduce_inplace(self, tensors: Any, group_info: GroupInfo, group_id: bytes | None = None, **kw):
        bound = AverageBound(tensors, where=", ".join(map(str, group_info.peer_ids)))
        self.own_rms = rms(tensors)
        runner = await allreduce_to_values(
            self, self.runner_type, tensors, group_info, group_id, refusal=bound.refusal,
            aggregation=self.aggregation, bans=self.bans, signer=self.signer, accuse=self.accuse, **kw,
        )  # fmt: skip
        add_sends(self._sends.setdefault(group_info.group_id, {}), runner)
        check_whole(runner, group_info)
        return runner

    # hivemind's handlers: a banned peer may not join a group this peer leads, nor download its state. In a group
    # that another member leads it stays a member (leaving would fail the round for everybody); the parts it sends
    # are left out by the reducer.

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self.bans.banned(context.remote_id):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_LOOKING_FOR_GROUP)
            return
        shown = _shown_pass(self.serializer, request.gather)
        if self.admission is not None and self._refusal(context.remote_id, shown):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        if self.bans.banned(context.remote_id):
            return
        if self.admission is not None and not await self.admits(context.remote_id):
            return
        async for message in super().rpc_download_state(request, context):
            yield message

    # a private swarm's admission (``swarm/admission.py``), checked in this averager's process

    def _refusal(self, peer_id: Any, shown: object) -> str:
        """Why ``peer_id``, showing pass ``shown``, may not take part ("" if it may); each refusal is logged at
        WARNING (at most once a minute per peer)."""
        self._read_revocations()
        try:
            self.admission.check(peer_id.to_bytes(), shown)
        except NotAdmitted as e:
            now, key = time.monotonic(), str(peer_id)
            if now - self._refused_logged.get(key, -float("inf")) > 60:
                self._refused_logged = _remember(self._refused_logged, key, now)
                logger.warning("Refused peer %s in private swarm %s: %s", key, self.admission.run, e)
            return str(e)
        self._admitted = _remember(self._admitted, str(peer_id), time.monotonic())
        return ""

    async def admits(self, peer_id: Any) -> bool:
        """Whether this peer may exchange state with ``peer_id`` (serve it, or download from it): its pass checked out
        in a group lately, or the pass it published in the DHT checks out."""
        if time.monotonic() - self._admitted.get(str(peer_id), -float("inf")) < ADMITTED_FOR_S:
            self._read_revocations()
            return True
        found = await dht_get(self.dht, passes_key(self.admission.run), DHT_WAIT_S)
        entry = found.value.get(peer_id.to_base58()) if found is not None and isinstance(found.value, dict) else None
        return not self._refusal(peer_id, getattr(entry, "value", None))

    def _download_stub(self, p2p: Any, peer: Any, **kwargs: Any) -> Any:
        return _CheckedDownload(type(self).get_stub(p2p, peer, **kwargs), peer, self)

    def _read_revocations(self) -> None:
        """Start reading the author's revocations from the DHT, at most once a minute (in the background)."""
        now = time.monotonic()
        if now - self._revocations_read < REVOCATIONS_EVERY_S:
            return
        self._revocations_read = now

        async def read() -> None:
            found = await dht_get(self.dht, revoked_key(self.admission.run), DHT_WAIT_S)
            if found is not None:
                self.admission.take_revocations(found.value)

        task = asyncio.get_running_loop().create_task(read())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _CheckedDownload:
    """A stub for downloading ``peer``'s state: in a private swarm, only from an admitted peer; and, where the
    averager checks served states (``state_download.CheckedStateDownload``), only a state that passes. Otherwise the
    download is empty, which hivemind skips ("did not send its state") for the next peer."""

    def __init__(self, stub: Any, peer: Any, owner: GroupRounds):
        self._stub, self._peer, self._owner = stub, peer, owner

    async def rpc_download_state(self, request: Any) -> Any:
        owner, check = self._owner, getattr(self._owner, "check_served_state", None)
        if owner.admission is not None and not await owner.admits(self._peer):
            return as_aiter()
        try:  # opening waits on the daemon's dial (through a relay, to a peer gone): hivemind sets no bound
            stream = await asyncio.wait_for(self._stub.rpc_download_state(request), OPEN_S)
        except asyncio.TimeoutError:
            logger.info("Peer %s did not open a state download within %g s", self._peer, OPEN_S)
            return as_aiter()
        if check is None:
            return stream
        try:
            messages = [m async for m in aiter_with_timeout(stream, owner.next_chunk_timeout or owner.request_timeout)]
        except asyncio.TimeoutError:
            logger.info("Peer %s stopped sending its state", self._peer)
            return as_aiter()
        return as_aiter(*messages) if await check(self._peer, messages) else as_aiter()


OPEN_S = 15.0  # a state download's stream opens within this, or the next peer is asked
ADMITTED_FOR_S = 600.0  # a pass seen in a group admits its peer's state downloads this long
REVOCATIONS_EVERY_S = 60.0
DHT_WAIT_S = 5.0
MAX_REMEMBERED = 1024


def _shown_pass(serializer: Any, gathered: bytes) -> object:
    """The pass a member put in its all-gather entry ([[bandwidth, kind, pass], mode, user data]), or None."""
    try:
        entry = serializer.loads(gathered)
        reported = entry[0]
        return reported[2] if isinstance(reported, list) and len(reported) == 3 else None
    except Exception:  # noqa: BLE001 - a stranger's bytes: any failure means "no pass"
        return None


def _remember(seen: dict[str, float], key: str, now: float) -> dict[str, float]:
    seen[key] = now
    if len(seen) > MAX_REMEMBERED:
        seen = dict(sorted(seen.items(), key=lambda item: item[1])[-MAX_REMEMBERED // 2 :])
    return seen


async def dht_get(dht: Any, key: str, timeout_s: float = 5.0) -> Any:
    """``dht.get(key, latest=True)`` from an averager's event loop; None if it fails or takes over ``timeout_s``."""
    try:
        return await asyncio.wait_for(dht.get(key, latest=True, return_future=True), timeout_s)
    except (asyncio.TimeoutError, RuntimeError, OSError):
        return None


VERSION = "p2pt4"  # in every averager's key prefix: bumped when what members exchange in a round changes
