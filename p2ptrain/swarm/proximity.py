"""How far other peers are: round trips and throughput measured to the peers this one talks to, and a network
coordinate that lets any peer estimate the distance between two peers it never measured.

- ``Neighbours``: the last measurements to at most ``MAX_NEIGHBOURS`` peers (least recently seen dropped first):
  round-trip time from light probes (a DHT ping, the smaller of two so that a fresh connection's handshake does not
  count; the peer's round trip is the smallest of its last ``RTT_WINDOW`` samples, which is what the coordinate
  moves by, so that a queue or a busy scheduler's spike moves neither), and the throughput this peer's part
  streams to it achieved in averaging rounds (``shares.link_rates``, smoothed; null for a peer never averaged with).
- ``Vivaldi``: a network coordinate (Dabek et al., SIGCOMM 2004; the height variant that Serf and Consul use): two
  dimensions plus a height, in milliseconds, moved a little towards agreement with each round trip measured to a
  peer whose coordinate is known. The distance between two coordinates estimates their round trip.
- The record ``p2ptrain/v1/near/<run_id>/<shard>``, subkey ``<peer id>`` (signed by its peer:
  ``signed_records.py``): this peer's coordinate and its nearest measured neighbours, ``{"c": [x, y, height,
  error], "n": [[peer id, rtt ms, Mbit/s or None], ...]}``. ``read_near`` checks every field before anyone uses it;
  ``Prober`` refreshes it. The shard is the first byte of sha256(peer id) mod ``SHARDS``: in hivemind's DHT every
  node answering the lookup that precedes a ``store`` sends back the whole value it holds for the key, so one
  dictionary of all members would make each peer's refresh cost O(N) bytes; a shard holds ~N / 16.

Memory and traffic per peer for the measurements do not grow with the swarm: at most ``MAX_NEIGHBOURS``
measurements, ``PROBES`` pings per ``PROBE_EVERY_S``, one record of at most ``PUBLISHED_NEIGHBOURS`` neighbours.
Reading everybody's records (to derive the groups) costs ~300 bytes per member, once per ``READ_EVERY_S``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from p2ptrain.swarm.discovery import RECORD_TTL_S, bounded, member_ids

logger = logging.getLogger(__name__)

MAX_NEIGHBOURS = 64
PUBLISHED_NEIGHBOURS = 8
PROBES = 4  # pings per probe cycle, peers never measured first
PROBE_EVERY_S = 30.0
READ_EVERY_S = 120.0  # everybody's records, for the groups: once per regrouping is enough
MAX_COORD_MS = 100_000.0  # farther than any place on earth: a coordinate beyond it is refused
MAX_RTT_MS = 60_000.0


SHARDS = 16  # the near records are spread over this many keys (see the module docstring)


def near_key(run_id: str, shard: int = 0) -> str:
    return f"p2ptrain/v1/near/{run_id}/{shard}"


def near_keys(run_id: str) -> list[str]:
    return [near_key(run_id, shard) for shard in range(SHARDS)]


def shard_of(peer: str) -> int:
    return hashlib.sha256(peer.encode()).digest()[0] % SHARDS


RTT_WINDOW = 5  # round trips kept per peer: its measured round trip is the smallest of them


@dataclass
class Measured:
    rtt_ms: float | None = None  # the smallest of the last ``RTT_WINDOW`` samples (``Neighbours.rtt``)
    mbit_s: float | None = None  # what this peer's part streams to it achieved in averaging rounds (EWMA 0.3)
    samples: deque = field(default_factory=lambda: deque(maxlen=RTT_WINDOW), repr=False, compare=False)


class Neighbours:
    """The latest measurements to at most ``capacity`` peers; the least recently measured one goes first."""

    def __init__(self, capacity: int = MAX_NEIGHBOURS):
        self.capacity = capacity
        self._peers: OrderedDict[str, Measured] = OrderedDict()
        self._lock = threading.Lock()

    def _entry(self, peer: str) -> Measured:
        entry = self._peers.pop(peer, None) or Measured()
        self._peers[peer] = entry
        while len(self._peers) > self.capacity:
            self._peers.popitem(last=False)
        return entry

    def rtt(self, peer: str, rtt_ms: float) -> float:
        """Take a round-trip sample; return the peer's measured round trip, the smallest of its recent samples: a
        sample is the path's delay plus whatever queue or busy scheduler it met (on a loaded machine, hundreds of
        ms), and the smallest is the path's. A path that really got longer shows after ``RTT_WINDOW`` samples."""
        with self._lock:
            entry = self._entry(peer)
            entry.samples.append(rtt_ms)
            entry.rtt_ms = min(entry.samples)
            return entry.rtt_ms

    def throughput(self, links: dict[str, float]) -> None:
        """What this peer's part streams achieved in a round, Mbit/s by peer id (``shares.link_rates``)."""
        with self._lock:
            for peer, mbit_s in links.items():
                entry = self._entry(peer)
                entry.mbit_s = mbit_s if entry.mbit_s is None else 0.7 * entry.mbit_s + 0.3 * mbit_s

    def get(self, peer: str) -> Measured | None:
        with self._lock:
            return self._peers.get(peer)

    def nearest(self, count: int = PUBLISHED_NEIGHBOURS) -> list[tuple[str, Measured]]:
        with self._lock:
            timed = [(p, m) for p, m in self._peers.items() if m.rtt_ms is not None]
        return sorted(timed, key=lambda pm: (pm[1].rtt_ms, pm[0]))[:count]

    def __contains__(self, peer: str) -> bool:
        with self._lock:
            return peer in self._peers

    def __len__(self) -> int:
        with self._lock:
            return len(self._peers)


@dataclass(frozen=True)
class Coord:
    """A point in Vivaldi's space (milliseconds): ``x``, ``y``, a ``height`` (the access link's own delay, added to
    every distance) and ``error``, the owner's confidence in it (1: none yet)."""

    x: float = 0.0
    y: float = 0.0
    height: float = 0.0
    error: float = 1.0

    def distance(self, other: Coord) -> float:
        """Estimated round trip between the two owners, ms."""
        return math.hypot(self.x - other.x, self.y - other.y) + self.height + other.height


MIN_HEIGHT_MS = 0.01


SETTLED_ERROR = 0.5  # a coordinate is settled once its error first gets this low (``Vivaldi.published``)


class Vivaldi:
    """This peer's coordinate, moved by each measured round trip (``ce``, ``cc``: the paper's constants)."""

    def __init__(self, seed: str = "", ce: float = 0.25, cc: float = 0.25):
        self.coord = Coord(height=MIN_HEIGHT_MS)
        self.ce, self.cc = ce, cc
        self.settled = False  # once true, for good
        self._random = random.Random(seed)

    def published(self) -> Coord:
        """The coordinate as the near record carries it: error 1 until it has settled (its error at or below
        ``SETTLED_ERROR`` once), then at most ``SETTLED_ERROR``. Readers estimate distances only between settled
        coordinates (``grouping.distances``): a newcomer's moves with every sample, and an error that went up and
        down across the threshold would make peers reading at different moments place it differently. Settling
        happens once per peer, so it changes the groups once."""
        error = min(self.coord.error, SETTLED_ERROR) if self.settled else 1.0
        return Coord(self.coord.x, self.coord.y, self.coord.height, error)

    def observe(self, rtt_ms: float, remote: Coord) -> Coord:
        own = self.coord
        rtt_ms = max(rtt_ms, 0.01)
        weight = own.error / max(own.error + remote.error, 1e-6)
        estimate = own.distance(remote)
        sample_error = abs(estimate - rtt_ms) / rtt_ms
        error = min(1.0, sample_error * self.ce * weight + own.error * (1 - self.ce * weight))
        force = self.cc * weight * (rtt_ms - estimate)
        dx, dy = own.x - remote.x, own.y - remote.y
        magnitude = math.hypot(dx, dy)
        if magnitude < 1e-6:  # the same point: push apart in a random direction
            angle = self._random.uniform(0, 2 * math.pi)
            dx, dy, magnitude = math.cos(angle), math.sin(angle), 1.0
        x, y = own.x + force * dx / magnitude, own.y + force * dy / magnitude
        height = own.height
        if magnitude > 1e-6:
            height = max(MIN_HEIGHT_MS, own.height + force * (own.height + remote.height) / (magnitude + 1e-9))
        self.coord = Coord(_clamp(x), _clamp(y), min(height, MAX_COORD_MS), error)
        self.settled = self.settled or error <= SETTLED_ERROR
        return self.coord


def _clamp(value: float) -> float:
    return max(-MAX_COORD_MS, min(MAX_COORD_MS, value))


@dataclass(frozen=True)
class Near:
    """A peer's published record: its coordinate and its measured neighbours (peer id → (rtt ms, Mbit/s))."""

    coord: Coord
    neighbours: dict[str, tuple[float, float | None]]


def encode_near(coord: Coord, nearest: list[tuple[str, Measured]]) -> dict:
    rounded = [round(v, 2) for v in (coord.x, coord.y, coord.height, coord.error)]
    rows = [[p, round(m.rtt_ms, 2), None if m.mbit_s is None else round(min(m.mbit_s, 1e6), 2)] for p, m in nearest]
    return {"c": rounded, "n": rows[:PUBLISHED_NEIGHBOURS]}


def decode_near(value: object) -> Near:
    """A near record's value, checked. Raises ValueError for anything but what ``encode_near`` writes."""
    if not isinstance(value, dict) or set(value) != {"c", "n"}:
        raise ValueError("not a near record")
    c, rows = value["c"], value["n"]
    if not isinstance(c, list) or len(c) != 4 or not all(_number(v, MAX_COORD_MS) for v in c):
        raise ValueError("bad coordinate")
    if c[2] < 0 or not 0 <= c[3] <= 1:
        raise ValueError("bad height or error")
    if not isinstance(rows, list) or len(rows) > PUBLISHED_NEIGHBOURS:
        raise ValueError("bad neighbours")
    neighbours: dict[str, tuple[float, float | None]] = {}
    for row in rows:
        if not (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and len(row[0]) <= 64):
            raise ValueError("bad neighbour")
        if not _number(row[1], MAX_RTT_MS) or row[1] < 0:
            raise ValueError("bad round trip")
        if row[2] is not None and (not _number(row[2], 1e6) or row[2] < 0):
            raise ValueError("bad throughput")
        neighbours[row[0]] = (float(row[1]), None if row[2] is None else float(row[2]))
    return Near(Coord(*(float(v) for v in c)), neighbours)


def _number(value: object, limit: float) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    return math.isfinite(value) and abs(value) <= limit


def ask_near(dht: hivemind.DHT, run_id: str) -> list:
    """The lookups of every shard of the near records, started (``read_near`` reads their answers)."""
    return [dht.get(key, latest=True, return_future=True) for key in near_keys(run_id)]


def read_near(dht: hivemind.DHT, run_id: str, futures: list | None = None) -> dict[str, Near]:
    """Every member's near record that checks out (peer id → ``Near``), from every shard (``futures``: the shards'
    lookups, already started by ``ask_near``); malformed ones, and ones in another peer's shard, are skipped."""
    futures = futures or ask_near(dht, run_id)
    records: dict[str, Near] = {}
    for shard, future in enumerate(futures):
        found = bounded(future)
        if found is None or not isinstance(found.value, dict):
            continue
        for peer, entry in found.value.items():
            try:
                if isinstance(peer, str) and shard_of(peer) == shard:
                    records[peer] = decode_near(getattr(entry, "value", None))
            except ValueError as e:
                logger.debug("Ignoring the near record of %s: %s", peer, e)
    return records


async def _ping(peers: list[str], _dht: hivemind.DHT, node: hivemind.DHTNode) -> dict[str, float]:
    """In the DHT's process: the smaller of two DHT pings to each peer (ms); peers that did not answer left out."""
    times: dict[str, float] = {}
    for peer in peers:
        try:
            peer_id = PeerID.from_base58(peer)  # member ids come from the DHT: anything
        except Exception:  # noqa: BLE001 - base58's and multihash's errors differ
            continue
        best = None
        for _ in range(2):
            start = time.perf_counter()
            if await node.protocol.call_ping(peer_id) is None:
                break
            elapsed = (time.perf_counter() - start) * 1000
            best = elapsed if best is None else min(best, elapsed)
        if best is not None:
            times[peer] = best
    return times


class Prober:
    """Measures round trips to a few members every ``every_s``, moves this peer's coordinate, and publishes the
    near record (owned and stopped by the peer). Reads the members' and their near records every
    ``read_every_s`` only: those reads cost O(N) bytes (every member's record), the pings O(1)."""

    def __init__(
        self,
        dht: hivemind.DHT,
        run_id: str,
        every_s: float = PROBE_EVERY_S,
        probes: int = PROBES,
        read_every_s: float = READ_EVERY_S,
        on_probe: Callable[[list[tuple[str, Measured]]], None] = lambda nearest: None,
    ):
        """``on_probe`` gets the nearest measured members after each cycle (for the status)."""
        self.dht, self.run_id, self.every_s, self.probes, self.read_every_s = dht, run_id, every_s, probes, read_every_s
        self.on_probe = on_probe
        self.me = dht.peer_id.to_base58()
        self.neighbours = Neighbours()
        self.vivaldi = Vivaldi(seed=self.me)
        self.members: list[str] = []  # the last read of the swarm's members (this peer excluded)
        self.records: dict[str, Near] = {}  # the last read of everybody's near records
        self._read_at = -math.inf
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prober", daemon=True)
        self._random = random.Random()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.probe_once()
            except (RuntimeError, OSError, TimeoutError) as e:  # the DHT is shutting down or unreachable
                logger.debug("Probing failed: %s", e)
            self._stop.wait(self.every_s * self._random.uniform(0.8, 1.2))

    def probe_once(self) -> None:
        """Ping up to ``probes`` members (never measured ones first), move the coordinate, publish it; read the
        members and their near records first if the last read is ``read_every_s`` old."""
        since = time.monotonic() - self._read_at
        if since >= self.read_every_s or (not self.members and since >= self.every_s):  # or nobody seen yet
            self.read()
        fresh = [p for p in self.members if p not in self.neighbours]
        known = [p for p in self.members if p in self.neighbours]
        self._random.shuffle(fresh)
        self._random.shuffle(known)
        chosen = (fresh + known)[: self.probes]
        times = self.dht.run_coroutine(functools.partial(_ping, chosen)) if chosen else {}
        for peer, sample_ms in times.items():
            rtt_ms = self.neighbours.rtt(peer, sample_ms)
            remote = self.records.get(peer)
            if remote is not None:  # the filtered round trip: one spike would throw the coordinate far off
                self.vivaldi.observe(rtt_ms, remote.coord)
        self.publish()
        self.on_probe(self.neighbours.nearest())

    def read(self) -> tuple[dict[str, Near], list[str]]:
        """Read the members and everybody's near records now (a grouped swarm's peers do at each round's start, so
        that their views of the swarm differ as little as possible); the last read if this one fails."""
        try:  # the shards' lookups and the members' at once: a round waits for the slowest, not for their sum
            shards = ask_near(self.dht, self.run_id)
            members = [p for p in member_ids(self.dht, self.run_id) if p != self.me and len(p) <= 64]
            self.records, self.members = read_near(self.dht, self.run_id, shards), members
            self._read_at = time.monotonic()
        except (RuntimeError, OSError, TimeoutError) as e:  # the DHT is shutting down or unreachable
            logger.debug("Reading the members failed: %s", e)
        return self.records, self.members

    def publish(self) -> bool:
        value = encode_near(self.vivaldi.published(), self.neighbours.nearest())
        expiration = get_dht_time() + RECORD_TTL_S
        key = near_key(self.run_id, shard_of(self.me))
        future = self.dht.store(key, value, expiration, subkey=self.me, return_future=True)
        return bool(bounded(future))
