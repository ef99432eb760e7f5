"""The end of a run (``--max-steps N``): every peer leaves with the swarm's parameters.

hivemind lets a peer run a step or more behind the others (its view of the swarm's progress is seconds old). At
the last step that costs it: its averaging rounds find nobody (the others are done), one averaging timeout each,
and its last updates come from its own gradients alone. So peers say where they are in a DHT record,
``p2ptrain/v1/finishing/<run_id>`` (subkey: the peer id; protocols/dht-records.md):

- a peer that reached step N by averaging lets its last (background) state-averaging round land, then stores
  ``{"epoch": N, "done": true, "digest": <sha256 of its parameters>, "since": <DHT time>}``: it holds a final
  state;
- a peer still training checks for such a record every ``CHECK_EVERY_S``; seeing one, it stops, stores
  ``{"epoch": N, "done": false}``, downloads the state of a peer at step N, then stores ``done: true``. A peer
  whose last update was its own (its round found nobody) does the same, once a peer at N has announced itself
  (at most ``timeout_s`` later: its last state-averaging round has landed by then);
- peers at step N can still hold different parameters: an averaging round that did not include them all (a
  peer killed, or one that restarted, mid-round) parts them, and hivemind's state averaging joins them again
  only if a later round groups them. So the final state is the one announced first (lowest ``since``, then
  subkey): a peer whose digest differs downloads it (``SETTLE_S`` after its own announcement, so that
  announcements made at the same moment are seen by both), and that peer shares its state first (priority);
- a peer at step N stays while another peer's progress record (hivemind's ``{run_id}_progress``) is behind N
  (at most ``timeout_s``) or another peer's record says ``done: false`` (at most ``2 × timeout_s`` in all), and
  until neither has been seen for ``QUIET_S``; a peer at N whose digest differs from the final state's counts as
  downloading it, and so does a peer at N (not a client) that has not announced anything yet: its last
  state-averaging round may be failing, and then it downloads the final state from a peer that must still be here.

Records come from other peers: a malformed one is ignored; a lying one can make a peer wait ``2 × timeout_s``, or
download the liar's state (hivemind's state download trusts whoever serves it, mid-run too).
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import hivemind
import torch
from hivemind.optim.progress_tracker import LocalTrainingProgress
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time
from pydantic.v1 import ValidationError  # hivemind's progress records are pydantic v1 models

from p2ptrain.swarm.discovery import DHT_TIMEOUT_S, bounded

logger = logging.getLogger(__name__)

QUIET_S = 5.0  # nobody behind, nobody downloading, for this long: a straggler just arrived has announced itself
CHECK_EVERY_S = 2.0  # how often a peer still training looks for peers that announced the last step
SETTLE_S = 2.0  # from our announcement to reading which state is final: a store lands in milliseconds
HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Final:
    """A peer's announcement that it holds a final state: who, the state's digest, and since when (DHT time)."""

    peer: str
    digest: str
    since: float


def state_digest(tensors: Iterable[torch.Tensor]) -> str:
    """sha256 of the tensors' bytes, in order: peers that averaged their state together (or downloaded it) match
    bit for bit."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def other_progress(dht: hivemind.DHT, progress_key: str) -> list[LocalTrainingProgress]:
    """Every other peer's progress record (hivemind's ProgressTracker, in the DHT): its global step, client mode.

    A peer that left says so with an empty record; a killed one's record expires (60 s); malformed ones are
    skipped.
    """
    me, found = dht.peer_id.to_bytes(), []
    for record in _records(dht, progress_key).values():
        try:
            progress = LocalTrainingProgress.parse_obj(record.value)
        except (ValidationError, TypeError, AttributeError):
            continue
        if progress.peer_id != me:
            found.append(progress)
    return found


def other_epochs(dht: hivemind.DHT, progress_key: str) -> list[int]:
    """The global step of every other peer with a progress record (``other_progress``)."""
    return [progress.epoch for progress in other_progress(dht, progress_key)]


def _silent(others: list[LocalTrainingProgress], records: dict, epoch: int) -> int:
    """Peers at the last step that have not said which state they hold (their last state-averaging round may still
    be landing, or failing: then they will download the final state, from a peer that must still be here)."""
    said = {subkey for subkey in records if isinstance(subkey, str)}
    return sum(p.epoch >= epoch and not p.client_mode and PeerID(p.peer_id).to_base58() not in said for p in others)


def swarm_finished(dht: hivemind.DHT, key: str, epoch: int) -> bool:
    """Whether another peer announced that it holds the swarm's state at global step ``epoch`` (or later)."""
    return _announced_final(_records(dht, key), dht.peer_id.to_base58(), epoch)


class FinishWatch:
    """``swarm_finished``, polled from the training loop without ever blocking a step: one DHT get at a time,
    started at most every ``CHECK_EVERY_S`` and read once it has answered (given up after discovery's bound)."""

    def __init__(self, dht: hivemind.DHT, key: str, epoch: int):
        self.dht, self.key, self.epoch = dht, key, epoch
        self.done = False
        self._pending, self._started = None, 0.0

    def poll(self) -> bool:
        now = time.monotonic()
        if self.done or (self._pending is None and now - self._started < CHECK_EVERY_S):
            return self.done
        if self._pending is None:
            self._pending, self._started = self.dht.get(self.key, latest=True, return_future=True), now
        elif self._pending.done():
            found, self._pending = self._pending.result(), None
            records = found.value if found is not None and isinstance(found.value, dict) else {}
            self.done = _announced_final(records, self.dht.peer_id.to_base58(), self.epoch)
        elif now - self._started > DHT_TIMEOUT_S:
            self._pending.cancel()
            self._pending = None
        return self.done


def wait_until_finished(dht: hivemind.DHT, key: str, epoch: int, stop: threading.Event, timeout_s: float) -> bool:
    """Wait (at most ``timeout_s``) until another peer announces that it holds the state at step ``epoch``."""
    deadline = time.monotonic() + timeout_s
    while not stop.is_set() and time.monotonic() < deadline:
        if swarm_finished(dht, key, epoch):
            return True
        stop.wait(1.0)
    return False


def announce_final(dht: hivemind.DHT, key: str, epoch: int, digest: str, expiration_s: float) -> Final:
    """Tell the other peers that we hold a state at the last step ``epoch``, with this digest."""
    mine = Final(dht.peer_id.to_base58(), digest, get_dht_time())
    _announce(dht, key, {"epoch": epoch, "done": True, "digest": digest, "since": mine.since}, expiration_s)
    return mine


@contextmanager
def announced_download(
    dht: hivemind.DHT, key: str, epoch: int, expiration_s: float, digest: Callable[[], str]
) -> Iterator[None]:
    """Tell the peers at the last step that we are downloading their state, until the block ends (then: we hold
    the state ``digest()`` names) or the record expires."""
    _announce(dht, key, {"epoch": epoch, "done": False}, expiration_s)
    try:
        yield
    finally:
        announce_final(dht, key, epoch, digest(), expiration_s)


def finals(dht: hivemind.DHT, key: str, epoch: int, mine: Final | None = None) -> list[Final]:
    """Every peer's announcement of a final state at step ``epoch`` (ours as we made it, if given: our store may
    have failed); malformed ones are ignored."""
    return _finals(_records(dht, key), epoch, mine)


def final_state(announced: list[Final]) -> Final | None:
    """The run's final state: the one announced first (ties: the lower peer id)."""
    return min(announced, key=lambda final: (final.since, final.peer), default=None)


def wait_for_stragglers(
    dht: hivemind.DHT,
    progress_key: str,
    finishing: str,
    epoch: int,
    stop: threading.Event,
    timeout_s: float,
    one_state: bool = True,
) -> None:
    """Stay while another peer is behind ``epoch`` (at most ``timeout_s``) or downloading a final state, or holds
    one that is not the run's, or is at ``epoch`` and has not said which state it holds (at most ``2 × timeout_s``
    in all: a straggler's download can begin only after its
    own last, lonely averaging rounds). Without ``one_state`` (mode "local": each peer keeps its own last
    progress on the shared anchor) differing states are expected and not waited for."""
    started, me = time.monotonic(), dht.peer_id.to_base58()
    waited, quiet_since, behind, loading = False, None, 0, 0
    while not stop.is_set():
        others = other_progress(dht, progress_key)
        behind = sum(p.epoch < epoch for p in others)
        records = _records(dht, finishing)
        announced = _finals(records, epoch)
        final = final_state(announced)
        loading = _downloading(records, me) + one_state * (
            sum(other.peer != me and other.digest != final.digest for other in announced)
            + _silent(others, records, epoch)
        )
        now = time.monotonic()
        if now - started >= (2 * timeout_s if loading else timeout_s):
            break
        if behind or loading:
            quiet_since = None
            if not waited:
                logger.info(
                    "Last global step: waiting up to %.0f s for %d peer(s) to catch up", timeout_s, behind + loading
                )
                waited = True
        elif not waited or (quiet_since is not None and now - quiet_since >= QUIET_S):
            return
        elif quiet_since is None:
            quiet_since = now
        stop.wait(1.0)
    if (behind or loading) and not stop.is_set():
        logger.info("Leaving with %d peer(s) still behind the last global step", behind + loading)


def _announce(dht: hivemind.DHT, key: str, value: dict, expiration_s: float) -> None:
    subkey = dht.peer_id.to_base58()
    if not bounded(dht.store(key, value, get_dht_time() + expiration_s, subkey=subkey, return_future=True)):
        logger.info("Could not store our end-of-run record %s in the DHT; the other peers will not see it", value)


def _announced_final(records: dict, me: str, epoch: int) -> bool:
    return any(
        subkey != me
        and isinstance(record.value, dict)
        and record.value.get("done") is True
        and type(record.value.get("epoch")) is int
        and record.value["epoch"] >= epoch
        for subkey, record in records.items()
    )


def _downloading(records: dict, me: str) -> int:
    return sum(
        subkey != me and isinstance(record.value, dict) and record.value.get("done") is False
        for subkey, record in records.items()
    )


def _finals(records: dict, epoch: int, mine: Final | None = None) -> list[Final]:
    found = [] if mine is None else [mine]
    for subkey, record in records.items():
        value = record.value
        if not isinstance(subkey, str) or not isinstance(value, dict) or (mine is not None and subkey == mine.peer):
            continue
        digest, since = value.get("digest"), value.get("since")
        if (
            value.get("done") is True
            and type(value.get("epoch")) is int
            and value["epoch"] == epoch
            and isinstance(digest, str)
            and len(digest) == 64
            and set(digest) <= HEX
            and type(since) is float
            and math.isfinite(since)
        ):
            found.append(Final(subkey, digest, since))
    return found


def _records(dht: hivemind.DHT, key: str) -> dict:
    """A key's subkey records; none if there are none, or the DHT does not answer within discovery's bound."""
    found = bounded(dht.get(key, latest=True, return_future=True))
    return found.value if found is not None and isinstance(found.value, dict) else {}
