"""After every global step, peers check that they hold the same parameters, and a peer that does not takes the
swarm's.

Members of a gradient round receive one average, bit for bit (``group_rounds``: hivemind's own all-reduce leaves
each member off the average by the fp16 rounding of its own part), so peers that averaged together and apply the
same update hold the same parameters. What must not happen is a member leaving with a different update: a round
that failed for it (it proceeded with its own gradients) or lost a part, a kill or a restart mid-round. Such a
member would train on alone, and hivemind's state averaging pulls it back only if a later round happens to group
it with the others.

So each peer publishes, at global step N, a **sketch** of its parameters: ``SKETCH_SIZE`` coordinates chosen by a
generator seeded with the run id and N (every peer picks the same), with N in front, under
``p2ptrain/v1/params/<run_id>/<N mod 16>`` (subkey: peer id, signed by its key: ``swarm/signed_records.py``, which
must know every key in advance, hence 16 keys in turn and not one per step; protocols/dht-records.md). At its
next step it reads the others' sketches for N. Two sketches **agree** when at most ``DIFFER_SHARE`` of their
coordinates are more than ``TOLERANCE`` × the learning rate apart (room for float rounding on different hardware; a
member that took its own gradients for a part of the vector moves those coordinates by about a tenth of the learning
rate, AdamW).

Measured on a 4-peer gpt2-tiny swarm on loopback (fp16, 19 steps, the numbers are in the ``--log-level DEBUG``
log): every pair of peers at every step, bit for bit equal. Before one average for all: a median 0.01-0.06
learning rates apart, up to 0.6.

Each peer compares its sketch with those of the members of the gradient round that led to step N, or with
every peer's if its round failed and its update was its own. A peer that agrees with none of them while some of
them agree among themselves, or, against one other peer, whose last update was its own, has left the swarm's
parameters: it logs it and downloads the swarm's state. When everybody differs from everybody (seen after a
state-averaging round that grouped only some of four peers), the camps below are of one peer each, and the state
of the smallest peer id wins: that peer offers its state first, the others download it.

Rounds that found each its own group leave **camps**: members that agree among themselves and differ from the other
camps (seen behind NATs, when a volunteer's daemon misses a matchmaking and a step's round splits in two; the round
check above passes in every camp). The swarm has no bound on its groups, so every camp is a failure's trace, and
waiting for a state-averaging round to group them all may be waiting for good. So each peer also sorts every sketch
it read for N into camps (peers linked by agreeing sketches): the largest camp holds the swarm's parameters, the one
with the smallest peer id among equals; its members offer their state first, and a peer of another camp downloads
it. A read may miss a sketch (peers read the DHT at different moments): with equal camps, two peers that each missed
one member of the other camp would each find their own camp the larger, and neither would download. So the peers met
whose sketch we read at a recent check (``READ_STEPS``) but not at this one count against ours: our camp leads only
if it would still lead with them all in the strongest other camp, and otherwise we download. Only peers met in one
of our rounds of the last ``MET_STEPS`` steps count in camps: anybody can publish sketches under new peer ids, and a
camp of such ids would otherwise send every honest peer to download a state that those same ids vouch for
(``state_download``). (When groups are bounded in size, camps are the design, not a failure, and this rule is not
for them.)

The check never blocks a step: its DHT reads run in the background and are looked at once they have answered.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import hivemind
import numpy as np
import torch
from hivemind.utils import get_dht_time

from p2ptrain.swarm.discovery import DHT_TIMEOUT_S, PARAM_SLOTS, params_key

logger = logging.getLogger(__name__)

SKETCH_SIZE = 256
TOLERANCE = 1e-3  # × learning rate: a coordinate this far apart differs
DIFFER_SHARE = 0.01  # sketches with more differing coordinates than this disagree
RECORD_TTL_S = 120.0
MAX_SKETCHES = 64  # read per step
MET_STEPS = 50  # peers met in a round this many steps back count in camps
READ_STEPS = 4  # a peer whose sketch was read this many steps back but not now counts against our camp (two checks)
SKETCH_BYTES = SKETCH_SIZE * 4
STEP = struct.Struct("<Q")  # the global step, before the sketch


def sketch_key(run_id: str, epoch: int) -> str:
    return params_key(run_id, epoch % PARAM_SLOTS)


def encode_sketch(epoch: int, values: np.ndarray) -> bytes:
    return STEP.pack(epoch) + values.astype("<f4").tobytes()


def positions(run_id: str, epoch: int, total: int, size: int = SKETCH_SIZE) -> np.ndarray:
    """The coordinates every peer samples at ``epoch``, sorted."""
    seed = int.from_bytes(hashlib.sha256(f"{run_id}/{epoch}".encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(total, size=min(size, total), replace=False))


def sketch(params: Sequence[torch.Tensor], run_id: str, epoch: int) -> np.ndarray:
    """float32 values of the parameters at ``positions`` (in the order of ``params``, each flattened)."""
    sizes = [p.numel() for p in params]
    picks = positions(run_id, epoch, sum(sizes))
    starts = np.cumsum([0, *sizes])
    out = np.empty(len(picks), dtype=np.float32)
    with torch.no_grad():
        for i, param in enumerate(params):
            mine = (picks >= starts[i]) & (picks < starts[i + 1])
            if mine.any():
                flat = param.detach().reshape(-1)
                index = torch.from_numpy(picks[mine] - starts[i])
                out[mine] = flat[index.to(flat.device)].float().cpu().numpy()
    return out


def agree(a: np.ndarray, b: np.ndarray, lr: float) -> bool:
    if a.shape != b.shape:
        return False
    far = np.abs(a.astype(np.float64) - b.astype(np.float64)) > TOLERANCE * max(lr, 1e-12)
    return bool(far.mean() <= DIFFER_SHARE) and bool(np.isfinite(a).all() and np.isfinite(b).all())


@dataclass(frozen=True)
class Verdict:
    epoch: int
    others: int  # peers whose sketch for ``epoch`` was read
    agreeing: int  # of them, those that agree with ours
    left: bool  # we left the swarm's parameters: resynchronise
    lead: bool = False  # ours is the state the others take (the largest camp's)
    camps: int = 1  # groups of agreeing peers among every sketch read (ours included)
    unread: int = 0  # peers read at a recent check but not at this one, counted against our camp

    def reason(self) -> str:
        """Why we left the swarm's parameters, for the log."""
        if self.camps > 1 and self.unread:
            return (
                f"the peers we met are in {self.camps} camps that differ, and ours is not the largest if the "
                f"{self.unread} peer(s) read before but not now are in another"
            )
        if self.camps > 1:
            return f"the peers we met are in {self.camps} camps that differ, and ours is not the largest"
        if self.others > 1:
            return f"none of {self.others} peers of our last round agrees with ours, they agree among themselves"
        return "the one peer of our last round differs, and our last update was our own"


def judge(
    mine: np.ndarray,
    theirs: dict[str, np.ndarray],
    lr: float,
    epoch: int,
    our_own_update: bool,
    me: str,
    everyone: dict[str, np.ndarray] | None = None,
    unread: frozenset[str] = frozenset(),
) -> Verdict:
    """Did we (peer id ``me``) leave the swarm's parameters at ``epoch``? ``theirs``: the sketches of our round's
    members; ``everyone``: all the others' sketches read, for the camps; ``unread``: peers read at a recent check
    whose sketch was not read at this one (see the module docstring)."""
    verdict = _against_our_round(mine, theirs, lr, epoch, our_own_update)
    if verdict.left or not everyone:
        return verdict
    found = camps({me: mine, **everyone}, lr)
    if len(found) == 1:
        return verdict
    ours = next(camp for camp in found if me in camp)
    if all(_rank(ours) < _rank(camp | unread) for camp in found if camp is not ours):
        return replace(verdict, lead=True, camps=len(found))
    return replace(verdict, left=True, camps=len(found), unread=len(unread) if ours is found[0] else 0)


def _against_our_round(
    mine: np.ndarray, theirs: dict[str, np.ndarray], lr: float, epoch: int, our_own_update: bool
) -> Verdict:
    others = list(theirs.values())
    agreeing = sum(agree(mine, other, lr) for other in others)
    if agreeing or not others:
        return Verdict(epoch, len(others), agreeing, False)
    if len(others) == 1:
        return Verdict(epoch, 1, 0, our_own_update)
    # none agrees with us: we left, if they agree among themselves; if everybody differs from everybody, the camps
    # (singletons, the smallest peer id's first) decide which state the others take
    return Verdict(epoch, len(others), 0, any(agree(x, y, lr) for i, x in enumerate(others) for y in others[i + 1 :]))


def camps(sketches: dict[str, np.ndarray], lr: float) -> list[frozenset[str]]:
    """Peers linked by agreeing sketches, the swarm's first: the largest camp, then the smallest peer id."""
    ids = sorted(sketches)
    root = {peer: peer for peer in ids}

    def find(peer: str) -> str:
        while root[peer] != peer:
            peer = root[peer]
        return peer

    for i, x in enumerate(ids):
        for y in ids[i + 1 :]:
            if find(x) != find(y) and agree(sketches[x], sketches[y], lr):
                root[max(find(x), find(y))] = min(find(x), find(y))
    members: dict[str, set[str]] = {}
    for peer in ids:
        members.setdefault(find(peer), set()).add(peer)
    return sorted((frozenset(m) for m in members.values()), key=_rank)


def _rank(camp: frozenset[str]) -> tuple[int, str]:
    """Camps' order: the largest first, then the one with the smallest peer id."""
    return -len(camp), min(camp)


def read_sketches(found: object, own: str, epoch: int) -> dict[str, np.ndarray]:
    """The others' sketches of global step ``epoch`` in a DHT answer; malformed ones and other steps' skipped."""
    records = getattr(found, "value", None)
    if not isinstance(records, dict):
        return {}
    out = {}
    for peer, entry in list(records.items())[:MAX_SKETCHES]:
        value = getattr(entry, "value", None)
        if not (isinstance(value, bytes) and len(value) == STEP.size + SKETCH_BYTES):
            continue
        if isinstance(peer, str) and peer != own and STEP.unpack_from(value)[0] == epoch:
            sketch = np.frombuffer(value, dtype="<f4", offset=STEP.size)
            if np.isfinite(sketch).all():  # a NaN would disagree with everybody: a broken or lying peer's
                out[peer] = sketch
    return out


class ParamCheck:
    """Owned by the trainer: ``after_step(epoch, params, lr, own_update)`` at each global step returns a verdict on
    the previous step once the others' sketches for it have been read (None until then)."""

    def __init__(self, dht: hivemind.DHT, run_id: str):
        self.dht, self.run_id, self.own = dht, run_id, dht.peer_id.to_base58()
        self._mine: dict[int, tuple] = {}  # epoch → (sketch, lr, own update, group or None)
        self._pending: tuple[int, object, float] | None = None  # (epoch, future, started)
        self._met: dict[str, int] = {}  # peer id → the last step it was in our round
        self._read: dict[str, int] = {}  # peer id → the last step whose sketch of it we read
        self.last: Verdict | None = None

    def after_step(
        self,
        epoch: int,
        params: Sequence[torch.Tensor],
        lr: float,
        own_update: bool,
        group: Sequence[str] | None = None,
    ) -> Verdict | None:
        """``group``: the peer ids of the round that led to ``epoch`` (None: compare with every peer's)."""
        self.publish(epoch, params, lr, own_update, group)
        return self.poll(epoch - 1)

    def publish(
        self,
        epoch: int,
        params: Sequence[torch.Tensor],
        lr: float,
        own_update: bool = False,
        group: Sequence[str] | None = None,
    ) -> None:
        """Publish this peer's sketch for ``epoch`` and keep it for the check one step later (``after_step``; after a
        download, the state taken: a peer that resynchronises every other step is checked too)."""
        mine = sketch(params, self.run_id, epoch)
        self._met.update(dict.fromkeys(group or (), epoch))
        self._met = {peer: at for peer, at in self._met.items() if at > epoch - MET_STEPS}
        self._mine = {e: v for e, v in self._mine.items() if e >= epoch - 2}
        self._mine[epoch] = (mine, lr, own_update, None if group is None else frozenset(group))
        self.dht.store(
            sketch_key(self.run_id, epoch), encode_sketch(epoch, mine), get_dht_time() + RECORD_TTL_S,
            subkey=self.own, return_future=True,
        )  # fmt: skip

    def poll(self, epoch: int) -> Verdict | None:
        """Read (in the background) and judge the sketches for ``epoch``; None while the read is in flight."""
        now = time.monotonic()
        if self._pending is None:
            if epoch in self._mine:
                future = self.dht.get(sketch_key(self.run_id, epoch), latest=True, return_future=True)
                self._pending = (epoch, future, now)
            return None
        pending_epoch, future, started = self._pending
        if not future.done():
            if now - started > DHT_TIMEOUT_S:
                future.cancel()
                self._pending = None
            return None
        self._pending = None
        try:
            found = future.result()
        except Exception as e:  # noqa: BLE001 - a DHT hiccup: no verdict this step
            logger.debug("Reading parameter sketches failed: %r", e)
            return None
        mine, lr, own_update, group = self._mine.get(pending_epoch, (None, 0.0, False, None))
        if mine is None:
            return None
        everyone = read_sketches(found, self.own, pending_epoch)
        theirs = everyone if group is None else {peer: value for peer, value in everyone.items() if peer in group}
        met = {peer: value for peer, value in everyone.items() if peer in self._met}
        recent = {peer for peer, at in self._read.items() if at >= pending_epoch - READ_STEPS and peer in self._met}
        unread = frozenset(recent - set(everyone))
        self._read.update(dict.fromkeys(everyone, pending_epoch))
        self._read = {peer: at for peer, at in self._read.items() if peer in self._met}
        self.last = judge(mine, theirs, lr, pending_epoch, own_update, self.own, met, unread)
        for peer, other in everyone.items():
            apart = np.abs(mine.astype(np.float64) - other) / max(lr, 1e-12)
            logger.debug(
                "Parameters at step %d vs %s: median %.2g, max %.2g learning rates apart, %.1f%% beyond %g",
                pending_epoch,
                peer,
                np.median(apart),
                apart.max(),
                100 * (apart > TOLERANCE).mean(),
                TOLERANCE,
            )
        return self.last
