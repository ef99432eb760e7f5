"""A grouped swarm's round (level_rounds.py): real optimizers on real DHT nodes average level by level."""

from __future__ import annotations

import dataclasses
import re
import threading
import time

import pytest
import torch
from conftest import node_optimizers, swarm_nodes
from safetensors.torch import load_file

from p2ptrain.local_swarm import DEMO_PEER_FLAGS, LocalSwarm
from p2ptrain.swarm.grouping import pass_groups
from p2ptrain.train.stopping import stop_optimizer

EPOCHS = 6
READ_S = 2.0  # a grouped round's read of the swarm's records, made slow
SAMPLES = 32  # each peer's since the last global step: its weight (capped at its group's median: robust.py)


@pytest.fixture
def nodes(tmp_path):
    started = swarm_nodes(tmp_path, 4)
    yield started
    for node in started:
        node.shutdown()


def grouped(manifest, **averaging):
    averaging = {"mode": "local", "aggregation": "mean", "group_size": 2, **averaging}
    spec = dataclasses.replace(manifest.averaging, **averaging)
    return dataclasses.replace(manifest, averaging=spec)


def test_four_peers_in_two_clusters_take_the_swarms_mean_in_two_levels(nodes, manifest, tmp_path):
    """Clusters {0, 1} and {2, 3}: level 0 averages inside each, level 1 across (0 with 2, 1 with 3). Every peer then
    takes the same outer step, with the mean of all four pseudo-gradients, as one group of four would; no peer ever
    averaged with more than one other."""
    manifest = grouped(manifest, compression="none")
    torch.manual_seed(0)
    models = [torch.nn.Linear(4, 2) for _ in nodes]
    for model in models[1:]:
        model.load_state_dict(models[0].state_dict())  # one swarm: the same start
    opts = node_optimizers(tmp_path, nodes, models, manifest)
    ids = [node.peer_id.to_base58() for node in nodes]
    clusters = [ids[:2], ids[2:]]
    try:
        start = [p.detach().clone() for p in models[0].parameters()]
        deltas = []
        for i, (opt, model) in enumerate(zip(opts, models, strict=True)):
            with torch.no_grad():  # what local steps would have done: each peer moved its own way
                for param in model.parameters():
                    param.add_(torch.randn_like(param) * 0.1 * (i + 1))
            deltas.append([s - p.detach() for s, p in zip(start, model.parameters(), strict=True)])
            opt.samples = SAMPLES
            opt.passes = lambda me=ids[i]: (time.sleep(READ_S), pass_groups(me, clusters, 2))[1]  # a slow DHT read
        begun = one_round(opts)
        assert max(begun) < READ_S / 2, begun  # the read is the round's, in its thread: training goes on meanwhile
        partners = [[others for _, others, _ in opt.round_log.last[-1]["levels"]] for opt in opts]
        assert partners[0] == [[ids[1]], [ids[2]]] and partners[3] == [[ids[2]], [ids[1]]], partners
        avg = manifest.averaging
        for j, first in enumerate(start):
            mean = sum(d[j] for d in deltas) / len(deltas)
            expected = first - avg.outer_lr * (mean + avg.outer_momentum * mean)  # Nesterov from zero momentum
            for opt in opts:
                torch.testing.assert_close(opt.anchor[j], expected, rtol=1e-5, atol=1e-6)
    finally:
        for opt in opts:
            stop_optimizer(opt, step_running=False)


def one_round(opts: list) -> None:
    """Every optimizer begins its round at once (what ``step()`` does at the global step, without the training around
    it) and lands it; all four must have averaged a round covering the four. Returns how long each ``_begin_round``
    held its caller (the training thread)."""
    begun = []
    for opt in opts:
        started = time.monotonic()
        opt._begin_round()  # noqa: SLF001
        begun.append(time.monotonic() - started)
    landed = [threading.Thread(target=opt.wait_for_round, args=(60,)) for opt in opts]
    for thread in landed:
        thread.start()
    for thread in landed:
        thread.join(90)
    outcomes = [opt.round_log.last[-1] for opt in opts]
    assert all(o["ok"] and o["peers"] == 4 for o in outcomes), outcomes
    assert all([level for level, _, _ in o["levels"]] == [0, 1] for o in outcomes), outcomes  # for `status`
    return begun


def test_members_meet_only_in_rounds_of_the_same_global_step(nodes, manifest, tmp_path):
    """Four real averagers in clusters {0, 1} and {2, 3}; peer 3's round is numbered a step behind the others' (as
    when its tracker saw the swarm's step a moment late). It meets nobody, at either level, where it used to meet
    its partners' next round on the same key; the three others still average with each other."""
    from p2ptrain.train.level_rounds import LevelRounds

    manifest = grouped(manifest, compression="none")
    models = [torch.nn.Linear(4, 2) for _ in nodes]
    opts = node_optimizers(tmp_path, nodes, models, manifest)
    ids = [node.peer_id.to_base58() for node in nodes]
    clusters = [ids[:2], ids[2:]]
    try:
        rounds = [
            LevelRounds(
                opt.averager,
                pass_groups(ids[i], clusters, 2),
                gather={},
                weight=1.0,
                timeout=20.0,
                max_weight=1e6,
                epoch=7 if i < 3 else 6,
            )
            for i, opt in enumerate(opts)
        ]
        outcomes = []
        for control in rounds:
            try:
                outcomes.append([peer.to_base58() for peer in control.result(timeout=60)])
            except BaseException as e:  # noqa: BLE001 - a round in which no level averaged
                outcomes.append(repr(e))
        assert "no level of the grid's 2 averaged" in outcomes[3], outcomes
        levels = [[others for _, others, _ in control.result().levels] for control in rounds[:3]]
        assert levels[0] == [[ids[1]], [ids[2]]] and levels[1] == [[ids[0]]] and levels[2] == [[ids[0]]], levels
    finally:
        for opt in opts:
            stop_optimizer(opt, step_running=False)


def test_a_known_group_meets_without_the_dht_and_past_a_member_that_is_gone(nodes, manifest, tmp_path):
    """One cluster of four whose lowest peer id (the leader every member asks first) is gone: the three others
    still average together in one group, and nobody declared the group's key in the DHT (its members know each
    other, ``compat.matchmaking``); through the DHT, as hivemind meets, they would have."""
    from p2ptrain.swarm.grouping import step_bits
    from p2ptrain.train.level_rounds import LevelRounds

    manifest = grouped(manifest, compression="none", group_size=4)
    models = [torch.nn.Linear(4, 2) for _ in nodes]
    every = node_optimizers(tmp_path, nodes, models, manifest)  # each signs its parts with its own node's identity
    order = sorted(range(len(nodes)), key=lambda i: nodes[i].peer_id.to_bytes())
    ids = [nodes[i].peer_id.to_base58() for i in order]
    stop_optimizer(every[order[0]], step_running=False)
    nodes[order[0]].shutdown()  # the lowest peer id is gone
    live, opts = [nodes[i] for i in order[1:]], [every[i] for i in order[1:]]
    try:
        declared = {}
        for epoch, through_dht in ((3, False), (4, True)):
            rounds = [
                LevelRounds(opt.averager, pass_groups(me, [ids], 4), gather={}, weight=1.0, timeout=20.0,
                            max_weight=1e6, epoch=epoch, through_dht=through_dht)
                for me, opt in zip(ids[1:], opts, strict=True)
            ]  # fmt: skip
            met = [sorted(peer.to_base58() for peer in control.result(timeout=60)) for control in rounds]
            assert met == [sorted(ids[1:])] * 3, (through_dht, met)
            key = f"{opts[0].averager.prefix}.0b{step_bits(pass_groups(ids[1], [ids], 4)[0].key_bits, epoch)}"
            declared[through_dht] = live[0].get(key, latest=True)
        assert declared[False] is None and declared[True] is not None, declared
    finally:
        for opt in opts:
            stop_optimizer(opt, step_running=False)


def test_a_parameter_round_joins_anchors_that_parted(nodes, manifest, tmp_path):
    """Anchors apart (as failed or split rounds leave them): a round of ``sync_every`` averages the parameters
    themselves, uncompressed although the swarm's codec is int8, and every member takes their mean as its anchor."""
    manifest = grouped(manifest, compression="int8", sync_every=1)
    torch.manual_seed(1)
    models = [torch.nn.Linear(4, 2) for _ in nodes]
    opts = node_optimizers(tmp_path, nodes, models, manifest)
    ids = [node.peer_id.to_base58() for node in nodes]
    try:
        for i, opt in enumerate(opts):
            with torch.no_grad():
                for anchor, param in zip(opt.anchor, opt.params, strict=True):
                    anchor.add_(torch.randn_like(anchor) * 0.01)  # parted
                    param.copy_(anchor - torch.randn_like(anchor) * 0.001)  # and trained a little since
            opt.samples = SAMPLES
            opt.passes = lambda me=ids[i]: pass_groups(me, [ids[:2], ids[2:]], 2)
        sent = [[p.detach().clone() for p in opt.params] for opt in opts]
        one_round(opts)
        assert {opt.round_log.last[-1]["codec"] for opt in opts} == {"none"}
        for j in range(len(sent[0])):
            mean = sum(theirs[j] for theirs in sent) / len(sent)
            for opt in opts:
                torch.testing.assert_close(opt.anchor[j], mean, rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(opt.params[j].detach(), mean, rtol=1e-6, atol=1e-7)
    finally:
        for opt in opts:
            stop_optimizer(opt, step_running=False)


@pytest.mark.slow
def test_a_grouped_swarm_of_four_real_peers_trains_level_by_level(tmp_path):
    """``seed --group-size 2`` and three joins on 127.0.0.1: every global step each peer averages with one other
    peer at each of two levels, the swarm's loss falls, most rounds cover all four, and the swarm ends with
    one set of agreed parameters."""
    swarm_flags = (
        *("--target-batch-size", "96", "--matchmaking-time", "2", "--averaging-timeout", "20"),
        *("--warmup-epochs", "2", "--lr", "3e-3", "--averaging", "local", "--compression", "fp16"),
        *("--group-size", "2", "--sync-every", str(EPOCHS - 1)),
    )
    peer_flags = (*DEMO_PEER_FLAGS, "--max-steps", str(EPOCHS), "--validate-every", str(EPOCHS))
    with LocalSwarm(tmp_path, swarm_flags=swarm_flags, peer_flags=peer_flags) as swarm:
        a = swarm.seed("a", "--wait-for-peers", "4")
        invite = swarm.invite(a)
        peers = [a, *(swarm.join(name, "--invite", invite, "--wait-for-peers", "4") for name in "bcd")]
        for peer in peers:
            peer.proc.wait(400)
            assert peer.proc.returncode == 0, peer.log()[-3000:]
    for peer in peers:
        history = peer.status()["val_history"]
        (_, first), (last_step, last) = history[0], history[-1]
        assert last_step == EPOCHS and last < first - 0.5, (peer.name, history)
        levels = re.findall(r"level (\d) of (\d) averaged in a group of (\d)", peer.log())
        assert levels and all(total == "2" and size == "2" for _, total, size in levels), levels
        assert {level for level, _, _ in levels} == {"0", "1"}, levels
        rounds = [int(n) for n in re.findall(r"Round \d+: (\d) peers", peer.log())]
        # most, not nearly all: under CI's load hivemind's matchmaking once left a pair inconsistent (one member in
        # an all-reduce, the other "could not find a group"), which cost those two a failed, a skipped (catching up
        # with the swarm's step) and a partial round each
        assert sum(n == 4 for n in rounds) >= EPOCHS // 2, (peer.name, rounds)
    # one model at the end: the agreed parameters (the anchors; in local mode each peer's own parameters also hold
    # its steps since) are the same on every peer, bit for bit when the last round that landed, a parameter round
    # (--sync-every), covered all four everywhere
    run = a.status()["run_id"]
    finals = [load_file(str(tmp_path / p.name / "runs" / run / "checkpoint.safetensors")) for p in peers]
    last = [re.findall(rf"Round {EPOCHS - 1}: (\d) peers, codec (\w+)", p.log()) for p in peers]
    assert all(found and found[0][1] == "none" for found in last), last  # a parameter round: uncompressed
    exact = all(found[0][0] == "4" for found in last)
    for final in finals[1:]:
        for key, anchor in finals[0].items():
            if key.endswith(".anchor"):
                assert torch.equal(final[key], anchor) if exact else torch.allclose(final[key], anchor, atol=0.05)
