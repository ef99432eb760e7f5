"""Accusations that other peers can check for themselves: signed parts, evidence, and each peer's own judgement.

An aggregator that refuses a member's part (``robust.py``) bans it locally after a few rounds (``bans.py``), but
the other peers of the swarm never see that part: believing the aggregator's word would let one liar get honest
peers banned everywhere. As in BTARD (Gorbunov et al. 2022), what is shared is evidence, not words:

- **Signed parts** (``signed_parts.py``): every part a member sends in a round is signed with a key its libp2p
  identity certifies, and an aggregator refuses a part that is not: a member cannot keep its parts deniable.
- **Evidence.** A part an aggregator refuses becomes evidence: the part as received, its signature and the
  certificate. The aggregator keeps its last ``KEEP`` pieces, serves them to any peer that asks, and lists them
  in the DHT under its own peer id (``discovery.accusations_key``, a signed peer record) for ``LISTED_S``.
- **Judgement.** A peer that reads an accusation fetches the evidence and judges it itself (``judge``): the
  certificate must tie the part key to the accused peer id, the signature must cover exactly these bytes sent
  to this accuser in this averager, and the part must be damning by this peer's own measure: values that are
  not finite, or a root mean square over ``EVIDENCE_BOUND`` times that of this peer's own last contribution to
  the same averager. Only then does it count a strike against the accused, for that round, as if it had refused
  the part itself (three rounds ban it: ``bans.STRIKES``).

An accuser cannot frame an honest peer: it holds that peer's signature only over what the peer sent, and no
honest part is damning by another honest peer's measure. Lies within the bound (a flipped sign, a small shift)
are still refused or clipped by the aggregators that see them, and banned by those, but not shared.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
from hivemind.compression import deserialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import runtime_pb2
from hivemind.utils import get_dht_time

from p2ptrain.train import codecs  # noqa: F401 - evidence decodes with p2ptrain's codecs, which it registers
from p2ptrain.train.signed_parts import MAX_EVIDENCE_BYTES, Unverified, part_digest, read_cert, verify

logger = logging.getLogger(__name__)

EVIDENCE_BOUND = 100.0  # a part whose RMS exceeds this many times the judge's own is damning
KEEP = 8  # pieces of evidence an aggregator keeps and serves
LISTED_S = 600.0  # how long an accusation stays in the DHT
READ_EVERY_S = 30.0  # how often a peer reads the accusations of an averager it runs
FETCH_PER_READ = 4  # pieces of evidence fetched per read, at most
FETCH_TIMEOUT_S = 10.0
SERVED_PER_MINUTE = 16  # evidence requests answered per asking peer
MAX_JUDGED = 1024  # evidence ids remembered as judged


@dataclass(frozen=True)
class Evidence:
    """A part as an aggregator received it: enough for anyone to check who sent it, where, and what it holds."""

    prefix: str
    group_id: bytes
    aggregator: bytes  # the accuser's peer id (bytes), to whom the part was sent
    part_index: int
    part: runtime_pb2.Tensor
    cert: bytes
    signature: bytes

    def encode(self) -> bytes:
        part = [bytes(self.part.buffer), list(self.part.size), self.part.dtype, int(self.part.compression)]
        fields = [self.prefix, self.group_id, self.aggregator, self.part_index, part, self.cert, self.signature]
        return msgpack.packb(fields, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes) -> Evidence:
        """Raises ``Unverified`` for anything but well-formed evidence within ``MAX_EVIDENCE_BYTES``."""
        try:
            if len(data) > MAX_EVIDENCE_BYTES:
                raise Unverified(f"evidence of {len(data)} bytes")
            prefix, group_id, aggregator, part_index, part, cert, signature = msgpack.unpackb(data, raw=False)
            buffer, size, dtype, compression = part
            checks = (
                isinstance(prefix, str) and isinstance(group_id, bytes) and isinstance(aggregator, bytes),
                isinstance(part_index, int) and 0 <= part_index < 2**31 and isinstance(buffer, bytes),
                isinstance(size, list) and len(size) <= 8 and all(isinstance(s, int) and 0 <= s < 2**32 for s in size),
                isinstance(dtype, str) and isinstance(compression, int) and 0 <= compression < 2**31,
                isinstance(cert, bytes) and isinstance(signature, bytes),
            )
            if not all(checks):
                raise Unverified("evidence with fields of the wrong types")
            tensor = runtime_pb2.Tensor(buffer=buffer, size=size, dtype=dtype, compression=compression)
            return cls(prefix, group_id, aggregator, part_index, tensor, cert, signature)
        except Unverified:
            raise
        except Exception as e:  # noqa: BLE001 - a stranger's bytes
            raise Unverified(f"evidence does not decode ({type(e).__name__})") from None

    def sender(self) -> str:
        """The peer id that signed this part; raises ``Unverified``."""
        peer_id, key = read_cert(self.cert)
        digest = part_digest(self.prefix, self.group_id, self.aggregator, self.part_index, self.part)
        verify(key, self.signature, digest)
        return peer_id


def rms(tensors: Sequence[torch.Tensor]) -> float:
    """The root mean square of the values of ``tensors`` together."""
    numel = sum(t.numel() for t in tensors)
    squares = sum(float(t.detach().double().square().sum()) for t in tensors)
    return math.sqrt(squares / numel) if numel else 0.0


def judge(evidence: Evidence, prefix: str, accuser: bytes, own_rms: float | None) -> tuple[str, str]:
    """(the accused peer id, why the evidence convinces this peer); the reason is "" if it does not.

    ``prefix``: this peer's averager, which the evidence must be about; ``accuser``: the peer id (bytes) that served
    it, to which the part must have been sent; ``own_rms``: this peer's own last contribution to that averager (None:
    none yet, so only values that are not finite convince it). Raises ``Unverified`` for evidence that does not check
    out: forged, about another averager or accuser, or a part that does not decode."""
    if evidence.prefix != prefix or evidence.aggregator != accuser:
        raise Unverified("the evidence is about a part sent to another averager or peer")
    accused = evidence.sender()
    try:
        values = deserialize_torch_tensor(evidence.part)
    except Exception as e:  # noqa: BLE001 - the accused's own bytes, signed: a part that does not decode
        raise Unverified(f"the part does not decode ({type(e).__name__})") from None
    if values.numel() == 0:
        return accused, ""
    if not torch.isfinite(values).all():
        return accused, "it sent values that are not finite (NaN/inf)"
    ratio = rms([values]) / own_rms if own_rms else 0.0
    if ratio > EVIDENCE_BOUND:
        return accused, f"it sent a part {ratio:.3g}× larger (RMS) than this peer's own values"
    return accused, ""


class Docket:
    """An aggregator's evidence (the last ``KEEP`` pieces, by id) and a peer's memory of what it judged."""

    def __init__(self, keep: int = KEEP):
        self.keep = keep
        self._evidence: OrderedDict[bytes, tuple[str, bytes]] = OrderedDict()  # id → (accused, evidence)
        self._judged: OrderedDict[tuple[str, bytes], None] = OrderedDict()

    def add(self, accused: str, evidence: bytes) -> bytes:
        evidence_id = hashlib.sha256(evidence).digest()[:16]
        self._evidence[evidence_id] = (accused, evidence)
        while len(self._evidence) > self.keep:
            self._evidence.popitem(last=False)
        return evidence_id

    def get(self, evidence_id: bytes) -> bytes | None:
        found = self._evidence.get(evidence_id)
        return None if found is None else found[1]

    def listing(self) -> list[list[Any]]:
        """The DHT record's value: [[accused peer id, evidence id], ...]."""
        return [[accused, evidence_id] for evidence_id, (accused, _) in self._evidence.items()]

    def judged(self, accuser: str, evidence_id: bytes) -> bool:
        """Whether this peer has judged this accuser's piece of evidence already."""
        return (accuser, evidence_id) in self._judged

    def remember(self, accuser: str, evidence_id: bytes) -> None:
        self._judged[(accuser, evidence_id)] = None
        while len(self._judged) > MAX_JUDGED:
            self._judged.popitem(last=False)


def listed(value: object) -> list[tuple[str, bytes]]:
    """The (accused, evidence id) pairs of an accuser's DHT record; what does not parse is left out."""
    if not isinstance(value, list):
        return []
    return [
        (entry[0], entry[1])
        for entry in value[: 2 * KEEP]
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], bytes)
        and len(entry[0]) < 128 and len(entry[1]) == 16
    ]  # fmt: skip


class Packed(dict):
    """The evidence handler's request ({"id": evidence id}) and answer ({"evidence": bytes}, or {} if it is not
    kept): a msgpack map with the two methods hivemind's P2P calls on a protobuf message."""

    @classmethod
    def FromString(cls, data: bytes) -> Packed:  # noqa: N802 - hivemind's protobuf-style name
        if len(data) > MAX_EVIDENCE_BYTES + 64:
            raise ValueError(f"an evidence message of {len(data)} bytes")
        value = msgpack.unpackb(data, raw=False)
        if not isinstance(value, dict):
            raise ValueError("an evidence message is not a map")
        return cls(value)

    def SerializeToString(self) -> bytes:  # noqa: N802
        return msgpack.packb(dict(self), use_bin_type=True)


class Accusations:
    """Mixin for ``group_rounds.GroupRounds``: this averager's docket, the evidence handler, and the reading and
    judging of other peers' accusations (all in the averager's process). ``GroupRounds`` sets ``signer``,
    ``bans``, ``accusations_key`` and ``read_accusations_every_s``, and calls ``accuse`` and ``read_accusations``."""

    signer: Any
    bans: Any
    accusations_key: str | None

    def _init_accusations(self, read_every_s: float) -> None:
        self.docket, self.own_rms = Docket(), None  # own_rms: of this peer's last contribution (``judge``)
        self.read_accusations_every_s, self._accusations_read = read_every_s, -math.inf
        self._asked: dict[str, list[float]] = {}
        self._accusation_tasks: set[asyncio.Task] = set()

    @property
    def evidence_handler(self) -> str:
        return f"{self.prefix}::evidence"

    async def add_p2p_handlers(self, p2p: Any, *args: Any, **kwargs: Any) -> None:
        await super().add_p2p_handlers(p2p, *args, **kwargs)
        if self.signer is not None:
            await p2p.add_protobuf_handler(self.evidence_handler, self._serve_evidence, Packed)

    def accuse(self, accused: str, evidence: bytes) -> None:
        """Keep ``evidence`` against ``accused`` (a part this peer refused) and list it in the DHT."""
        if len(evidence) > MAX_EVIDENCE_BYTES:
            return
        self.docket.add(accused, evidence)
        if self.accusations_key is not None:
            self._in_background(
                self.dht.store(
                    self.accusations_key, self.docket.listing(), get_dht_time() + LISTED_S,
                    subkey=self.peer_id.to_base58(), return_future=True,
                )
            )  # fmt: skip

    async def _serve_evidence(self, request: Packed, context: P2PContext) -> Packed:
        now, asker = time.monotonic(), str(context.remote_id)
        recent = [t for t in self._asked.get(asker, []) if now - t < 60.0]
        if len(recent) >= SERVED_PER_MINUTE:
            raise ValueError("asked for evidence too often")
        self._asked[asker] = [*recent, now]
        if len(self._asked) > MAX_JUDGED:
            self._asked.clear()
        evidence_id = request.get("id")
        found = self.docket.get(evidence_id) if isinstance(evidence_id, bytes) else None
        return Packed() if found is None else Packed(evidence=found)

    def read_accusations(self) -> None:
        """Read and judge the accusations listed for this averager, in the background, at most every
        ``read_accusations_every_s`` (only where this peer signs: a peer without a part key has no judge's seat)."""
        now = time.monotonic()
        if self.signer is None or self.accusations_key is None:
            return
        if now - self._accusations_read < self.read_accusations_every_s:
            return
        self._accusations_read = now
        self._in_background(self._judge_accusations())

    async def _judge_accusations(self) -> None:
        from p2ptrain.train.group_rounds import DHT_WAIT_S, dht_get  # group_rounds imports this module

        found = await dht_get(self.dht, self.accusations_key, DHT_WAIT_S)
        if found is None or not isinstance(found.value, dict):
            return
        own, todo = self.peer_id.to_base58(), []
        for accuser, entry in found.value.items():
            if not isinstance(accuser, str) or accuser == own:
                continue
            for accused, evidence_id in listed(getattr(entry, "value", None)):
                if accused != own and not self.bans.banned(accused) and not self.docket.judged(accuser, evidence_id):
                    todo.append((accuser, evidence_id))
        for accuser, evidence_id in todo[:FETCH_PER_READ]:
            self.docket.remember(accuser, evidence_id)
            await self._judge_one(accuser, evidence_id)

    async def _judge_one(self, accuser: str, evidence_id: bytes) -> None:
        try:
            accuser_id = PeerID.from_base58(accuser)
            reply = await asyncio.wait_for(
                self.p2p.call_protobuf_handler(accuser_id, self.evidence_handler, Packed(id=evidence_id), Packed),
                FETCH_TIMEOUT_S,
            )
            if not isinstance(reply.get("evidence"), bytes):
                logger.debug("Peer %s no longer holds the evidence it listed", accuser)
                return
            evidence = Evidence.decode(reply["evidence"])
            accused, why = await asyncio.get_running_loop().run_in_executor(
                None, judge, evidence, self.prefix, accuser_id.to_bytes(), self.own_rms
            )
        except Unverified as e:
            logger.warning("Did not believe an accusation by peer %s: %s", accuser, e)
            return
        except Exception as e:  # noqa: BLE001 - an unreachable or misbehaving accuser: its accusation is dropped
            logger.debug("Could not fetch evidence from peer %s: %r", accuser, e)
            return
        if not why:
            logger.info(
                "Peer %s accused peer %s, but its evidence does not convince this peer (a part within %g× this "
                "peer's own values)", accuser, accused, EVIDENCE_BOUND,
            )  # fmt: skip
            return
        logger.warning(
            "Peer %s showed evidence against peer %s (round %s): %s; counted as a refused round",
            accuser, accused, evidence.group_id.hex()[:8], why,
        )  # fmt: skip
        self.bans.strike(accused, evidence.group_id, f"evidence shown by peer {accuser}: {why}")

    def _in_background(self, awaitable: Any) -> None:
        async def run() -> None:
            try:
                await asyncio.wait_for(awaitable, FETCH_TIMEOUT_S * (FETCH_PER_READ + 1))
            except Exception as e:  # noqa: BLE001 - a failed store or read is tried again next time
                logger.debug("Accusations: %r", e)

        task = asyncio.get_running_loop().create_task(run())
        self._accusation_tasks.add(task)
        task.add_done_callback(self._accusation_tasks.discard)
