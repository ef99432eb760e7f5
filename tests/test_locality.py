"""Groups of nearby peers, in a lab with distance: two regions 150 ms apart, peers 5 ms apart inside each.

Real peers (``scripts/bench_scale.py``'s worker: a hivemind DHT node, p2ptrain's averager on a 400 kB vector whose
values are the peer's index, and the prober of ``swarm/proximity.py``) run in the network namespaces of
``scripts/netlab.py``; the distance is real (``scripts/wire.py`` holds every frame), and the peers learn it only by
probing each other. With a group size of 2 among 4 peers, the grid has two levels: at even rounds each peer must
average with the other peer of its own region, at odd rounds with one peer of the other region, and after one
round of each every peer must hold the exact mean of all four values.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import netns

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from netlab import NatLab, missing_tools  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_tools()), reason=f"needs {', '.join(missing_tools())} for a network lab"),
]
BENCH = Path(__file__).parents[1] / "scripts" / "bench_scale.py"
ROUNDS, PERIOD = 3, 7.0


def test_groups_form_inside_regions_first_and_the_swarm_reaches_one_mean(tmp_path):
    before = netns()
    lab = NatLab()
    procs: list[subprocess.Popen] = []
    results, bootstrap = tmp_path / "rounds.jsonl", tmp_path / "bootstrap.txt"
    try:
        eu, asia = lab.region("eu", rtt_ms=75, inside_ms=5), lab.region("asia", rtt_ms=75, inside_ms=5)
        hosts = [eu.host("e0"), asia.host("a0"), eu.host("e1"), asia.host("a1")]
        t0 = time.time() + 28  # started, joined the DHT, and probed each other (every 2 s) by then

        def start(i: int) -> None:
            command = [*hosts[i].prefix, sys.executable, str(BENCH), "--worker", "--index", str(i), "--host",
                       hosts[i].ip, "--t0", str(t0), "--period", str(PERIOD), "--rounds", str(ROUNDS),
                       "--first-round", "0", "--results", str(results), "--matchmaking", "2", "--group-size", "2",
                       "--grouping", "locality", "--probe-every", "2"]  # fmt: skip
            command += ["--announce", str(bootstrap)] if i == 0 else ["--bootstrap", str(bootstrap)]
            log = open(tmp_path / f"peer-{i}.log", "ab")  # noqa: SIM115 - closed with the process
            procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

        start(0)
        deadline = time.monotonic() + 60
        while not bootstrap.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert bootstrap.exists(), (tmp_path / "peer-0.log").read_text()[-3000:]
        for i in range(1, len(hosts)):
            start(i)
        for proc in procs:
            proc.wait(timeout=t0 - time.time() + ROUNDS * PERIOD + 60)
        logs = "\n".join(f"--- peer {i}\n{(tmp_path / f'peer-{i}.log').read_text()[-2000:]}" for i in range(4))
        assert all(proc.returncode == 0 for proc in procs), logs
        rows = [json.loads(line) for line in results.read_text().splitlines()]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        lab.remove()
    region = {row["me"]: "eu" if row["peer"] % 2 == 0 else "asia" for row in rows}
    assert len(region) == 4
    by_round = {r: [row for row in rows if row["round"] == r] for r in range(ROUNDS)}
    for r, peers in by_round.items():
        assert len(peers) == 4 and all(row["level"] == r % 2 for row in peers), peers
        for row in peers:  # the groups every peer derived: inside its region first, across at the next level
            regions = [region[p] for p in row["expected"]]
            assert len(row["expected"]) == 2 and len(set(regions)) == (1 if r % 2 == 0 else 2), (r, row)
    done = [r for r in range(ROUNDS) if all(row["ok"] for row in by_round[r])]
    for r in done:  # the groups that formed are the ones derived
        assert all(row["members"] == row["expected"] for row in by_round[r]), by_round[r]
    pairs = [r for r in range(1, ROUNDS) if r - 1 in done and r in done]
    assert pairs, f"no two consecutive rounds completed on all peers: {rows}"
    mean = statistics.fmean(range(4))
    for r in pairs:  # one round inside regions and one across: everybody at the mean
        assert all(abs(row["value"] - mean) < 1e-4 for row in by_round[r]), by_round[r]
    assert netns() == before
