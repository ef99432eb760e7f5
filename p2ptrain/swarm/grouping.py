"""Who averages with whom: bounded groups of nearby peers that still mix across the whole swarm.

Every peer derives the same groups from the same signed near records (``proximity.py``), with no coordinator:

1. **Distance** between two peers: the round trip one of them measured to the other (the mean if both did), else
   the estimate from their Vivaldi coordinates once both have settled (``proximity.Vivaldi.published``), else
   unknown. Measured distances count first because, in a small swarm, they
   exist for every pair after a few probes, while coordinates take a while to settle.
2. **Clusters** (``clusters``): ``k = ceil(N / size)`` clusters of at most ``ceil(N / k)`` peers each (balanced,
   so that every cluster has about as many ranks as the others), by average-linkage agglomeration: the two closest
   clusters that fit together merge, until ``k`` are left; if none fit before that, the smallest clusters are
   dissolved into the nearest ones with room. Clustering compares distance *classes*, not milliseconds
   (``CLASS_EDGES_MS``: nearby, one continent, across an ocean, farther): every peer derives the groups from its own
   read of records that change with every probe, and in its few milliseconds a round trip moves by its jitter, a
   coordinate with every sample, and a pair drops in and out of a peer's published nearest. Whole milliseconds let
   all of that reorder the merges (at 32 peers in one lab 8 of 32 derived the same groups as their partners); classes
   change only when a pair crosses an edge, and ties merge in peer-id order, the same everywhere. Agglomeration
   costs O(N²) memory and O(N³) time, so a swarm larger than ``BLOCK`` is first cut into blocks along its
   coordinates: 0.4 s at 300 peers, 0.5 s at 1,000, 2.8 s at 10,000.
3. **Levels** (``group``), Moshpit SGD's grid (Ryabinin et al., NeurIPS 2021) laid over the clusters: a peer's
   place is (its rank in its cluster, its cluster's digits in base ``size``). At level 0 a group is one cluster —
   nearby peers, every global step that is a multiple of ``levels``; at level ``l >= 1`` it is the peers of one rank
   in the clusters that differ only in digit ``l`` — one per cluster (two from a cluster one peer larger than the
   smallest it meets: ``all_groups``), across regions. Averaging at every level in turn gives every peer the exact
   mean of the whole swarm when the grid is full, and contracts the differences between peers by the group size per
   round when it is not (Moshpit's analysis). With ``N <= size`` there is one level and one group: everybody.
   Moshpit runs one level per step, averaging parameters; ``seed``/``join`` run every level of a pass within each
   step (``pass_groups``, ``Regrouping``; ``train/level_rounds.py`` says why), and so do
   ``scripts/bench_scale.py`` and ``scripts/simulate_swarm.py``.

The group key is a short hash of (level, the place's other coordinates), turned into hivemind's group bits, so
peers of one group meet on one DHT key and nobody else's matchmaking reads it; a round mixes its global step into it
(``step_bits``), so that a member a step behind its partners (its tracker a moment late) meets nobody rather than
their next step's group.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from p2ptrain.swarm.proximity import SETTLED_ERROR, Coord, Near

KEY_BITS = 24


# Upper edges of the distance classes, in ms of round trip: a metro area (or one lab: a probe through the DHT's RPC
# takes a few ms even on one machine, so no edge can tell a LAN from a city), a continent, across an ocean; beyond.
CLASS_EDGES_MS = (20.0, 80.0, 250.0)


def distance_class(rtt_ms: float) -> float:
    """The class of a round trip (0 for nearby, one more per ``CLASS_EDGES_MS`` edge it reaches; inf: unknown)."""
    return float(bisect.bisect_right(CLASS_EDGES_MS, rtt_ms)) if math.isfinite(rtt_ms) else math.inf


def distances(records: Mapping[str, Near], peers: list[str]) -> dict[tuple[str, str], float]:
    """The distance class (``distance_class``) between every two of ``peers``, of the round trip measured where
    either measured it, else estimated from their coordinates if both have settled, else unknown."""
    table: dict[tuple[str, str], float] = {}
    for i, a in enumerate(peers):
        for b in peers[i + 1 :]:
            measured = [
                r.neighbours[other][0]
                for me, other in ((a, b), (b, a))
                if (r := records.get(me)) is not None and other in r.neighbours
            ]
            if measured:
                value = sum(measured) / len(measured)
            elif a in records and b in records and max(records[a].coord.error, records[b].coord.error) <= SETTLED_ERROR:
                value = records[a].coord.distance(records[b].coord)
            else:
                value = math.inf  # no record, or a coordinate not settled yet (``Vivaldi.published``): unknown
            table[a, b] = table[b, a] = distance_class(value)
    return table


def clusters(records: Mapping[str, Near], peers: list[str], size: int) -> list[list[str]]:
    """``peers`` in balanced clusters of nearby peers (each sorted by peer id), in an order where consecutive
    clusters are near each other. Deterministic: the same records and peers give the same clusters anywhere."""
    peers = sorted(set(peers))
    if size < 2 or len(peers) <= size:
        return [peers] if peers else []
    return [g for block in _blocks(records, peers, size) for g in _agglomerate(records, block, size)]


BLOCK = 256  # peers clustered together at most; a larger swarm is first cut into blocks by coordinates


def _blocks(records: Mapping[str, Near], peers: list[str], size: int) -> list[list[str]]:
    """``peers`` cut in halves along their coordinates' wider axis (at a multiple of ``size``) until each part
    has at most ``BLOCK``: O(N log N), so that the O(N³) agglomeration only ever sees ``BLOCK`` peers."""
    if len(peers) <= BLOCK:
        return [peers]
    origin = Near(Coord(), {})
    xy = [(records.get(p, origin).coord.x, records.get(p, origin).coord.y, p) for p in peers]
    spans = [max(v[a] for v in xy) - min(v[a] for v in xy) for a in (0, 1)]
    axis = 0 if spans[0] >= spans[1] else 1
    ordered = [v[2] for v in sorted(xy, key=lambda v: (v[axis], v[2]))]
    cut = max(size, round(len(ordered) / 2 / size) * size)
    return _blocks(records, ordered[:cut], size) + _blocks(records, ordered[cut:], size)


def _agglomerate(records: Mapping[str, Near], peers: list[str], size: int) -> list[list[str]]:
    peers = sorted(peers)
    count = math.ceil(len(peers) / size)
    capacity = math.ceil(len(peers) / count)
    dist = distances(records, peers)
    n = len(peers)
    index = {p: i for i, p in enumerate(peers)}
    original = np.zeros((n, n))
    for (a, b), value in dist.items():
        original[index[a], index[b]] = min(value, UNKNOWN)
    matrix = original.copy()
    np.fill_diagonal(matrix, np.inf)
    members: list[list[int]] = [[i] for i in range(n)]
    sizes = np.ones(n)
    alive = np.ones(n, dtype=bool)
    while alive.sum() > count:
        pair = _closest_pair(matrix, sizes, alive, capacity)
        if pair is None:
            break  # no two clusters fit together: dissolve the smallest ones below
        i, j = pair
        merged = (sizes[i] * matrix[i] + sizes[j] * matrix[j]) / (sizes[i] + sizes[j])  # average linkage
        matrix[i], matrix[:, i] = merged, merged
        matrix[i, i] = np.inf
        matrix[j], matrix[:, j] = np.inf, np.inf
        members[i] += members[j]
        sizes[i] += sizes[j]
        alive[j] = False
    groups = [members[i] for i in range(n) if alive[i]]
    while len(groups) > count:  # dissolve the smallest cluster into the nearest ones with room
        smallest = min(groups, key=lambda g: (len(g), min(g)))
        groups.remove(smallest)
        for k in smallest:
            room = [g for g in groups if len(g) < capacity]
            nearest = min(room, key=lambda g: (float(original[k, g].mean()), min(g)))
            nearest.append(k)
    return [[peers[k] for k in sorted(g)] for g in _chain(groups, original)]


UNKNOWN = 1e6  # the distance to a peer with no near record: farther than any class, still finite


def _closest_pair(matrix: np.ndarray, sizes: np.ndarray, alive: np.ndarray, limit: float) -> tuple[int, int] | None:
    """The two live clusters at the smallest average distance whose sizes add up to at most ``limit``."""
    fits = (sizes[:, None] + sizes[None, :] <= limit) & alive[:, None] & alive[None, :]
    candidates = np.where(fits, matrix, np.inf)
    np.fill_diagonal(candidates, np.inf)
    flat = int(np.argmin(candidates))
    i, j = divmod(flat, matrix.shape[0])
    if not np.isfinite(candidates[i, j]):
        return None
    return (i, j) if i < j else (j, i)


def _chain(groups: list[list[int]], dist: np.ndarray) -> list[list[int]]:
    """Clusters in nearest-neighbour order (by their closest members) from the one holding the first peer."""
    groups = sorted(groups, key=min)
    ordered = [groups.pop(0)]
    while groups:
        last = ordered[-1]
        nearest = min(groups, key=lambda g: (float(dist[np.ix_(last, g)].min()), min(g)))
        groups.remove(nearest)
        ordered.append(nearest)
    return ordered


def levels(cluster_count: int, size: int) -> int:
    """How many levels the grid over ``cluster_count`` clusters has: 1 + its digits in base ``size``."""
    digits = 0
    while size**digits < cluster_count:
        digits += 1
    return 1 + digits


@dataclass(frozen=True)
class Group:
    level: int
    key_bits: str  # hivemind group bits: peers with the same bits meet on one matchmaking key
    members: tuple[str, ...]  # who should be in it (by the caller's view of the swarm), sorted
    share: float = field(default=1.0, compare=False)  # 1 / the members of its own cluster: its weight's share


def group(peer: str, cluster_list: list[list[str]], size: int, step: int) -> Group:
    """``peer``'s group at global step ``step`` (level ``step % levels``) among ``cluster_list`` (``clusters``)."""
    found = all_groups(cluster_list, size, step)
    if peer not in found:
        raise KeyError(f"{peer} is not among the clustered peers")
    return found[peer]


def all_groups(cluster_list: list[list[str]], size: int, step: int) -> dict[str, Group]:
    """Every clustered peer's group at global step ``step``, in O(N).

    At a level above 0, a cluster larger than the smallest one it meets there (balanced clusters differ by one peer)
    folds its extra ranks onto the first ones (rank mod the smallest size), so that every group holds a member of
    every cluster it meets; members of one cluster in one group hold the same values, so each takes ``share`` of its
    weight and the group's weighted mean is still the mean over its clusters."""
    level_count = levels(len(cluster_list), size)
    level = step % level_count
    coordinates: dict[str, tuple[int, ...]] = {}
    if level == 0:
        for c, members in enumerate(cluster_list):
            for p in members:
                coordinates[p] = (0, *_digits(c, size, level_count - 1))  # one cluster
    else:
        blocks: dict[tuple[int, ...], list[int]] = {}  # the clusters that differ only in digit ``level``
        for c in range(len(cluster_list)):
            digits = _digits(c, size, level_count - 1)
            blocks.setdefault((*digits[: level - 1], *digits[level:]), []).append(c)
        for block, found in blocks.items():
            smallest = min(len(cluster_list[c]) for c in found)
            for c in found:
                for rank, p in enumerate(cluster_list[c]):
                    coordinates[p] = (level, rank % smallest, *block)
    together: dict[tuple[int, ...], list[str]] = {}
    for p, where in coordinates.items():
        together.setdefault(where, []).append(p)
    cluster_of = {p: c for c, members in enumerate(cluster_list) for p in members}
    groups: dict[str, Group] = {}
    for where, members in together.items():
        bits = _hash_bits(repr(where), KEY_BITS)
        for p in members:
            own = sum(cluster_of[q] == cluster_of[p] for q in members) if level else 1
            groups[p] = Group(level, bits, tuple(sorted(members)), 1.0 / own)
    return groups


def step_bits(key_bits: str, step: int) -> str:
    """A group's matchmaking bits for its round of global step ``step``. Without the step, a member whose round began
    a step late met its partners' next round on the same key: it mixed pseudo-gradients of two steps, or failed
    their parameter round (``--sync-every``) and every level after it."""
    return _hash_bits(f"{key_bits}/{step}", len(key_bits))


def _hash_bits(text: str, count: int) -> str:
    """The first ``count`` (at most 32) bits of sha256(``text``), as hivemind's group bits."""
    digest = hashlib.sha256(text.encode()).digest()
    return bin(int.from_bytes(digest[:4], "big"))[2:].rjust(32, "0")[:count]


def pass_groups(peer: str, cluster_list: list[list[str]], size: int) -> list[Group]:
    """``peer``'s groups at every level of the grid, level 0 first: averaging each level's result in the next gives
    every peer the weighted mean of the whole swarm when the clusters fill the grid (``level_rounds``)."""
    return [group(peer, cluster_list, size, level) for level in range(levels(len(cluster_list), size))]


def _digits(index: int, base: int, count: int) -> tuple[int, ...]:
    return tuple((index // base**i) % base for i in range(count))


class Regrouping:
    """This peer's groups at each global step: every level of one pass (``pass_groups``), from clusters derived again
    at each step's start from the records then read, so that a newcomer is placed at once and every level of the
    step uses the same clusters, which the exact mean after the step needs."""

    def __init__(self, me: str, size: int):
        self.me, self.size = me, size
        self.clusters: list[list[str]] = []

    def passes(self, records: Mapping[str, Near], members: list[str]) -> list[Group]:
        """This peer's groups at every level of one pass (``pass_groups``), from clusters derived again each time."""
        self.clusters = clusters(records, [*members, self.me], self.size)
        return pass_groups(self.me, self.clusters, self.size)
