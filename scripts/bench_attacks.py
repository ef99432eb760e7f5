#!/usr/bin/env python3
"""Attack harness: robust aggregation against dishonest swarm members, side by side with the plain mean.

Real p2ptrain averagers (``GroupRounds``: hivemind's all-reduce over real libp2p daemons on 127.0.0.1, each part
checked and reduced by ``train/robust.py``) average the gradients of ``--peers`` gpt2-tiny peers, one round per
global step; every peer then applies AdamW to the average, as in the swarm's gradient mode. ``--byzantine`` of
them send an attacked vector instead of their gradient (all the same attack, colluding):

    nan               all values NaN
    scaled            their gradient × 1000
    sign_flip         minus their gradient
    flipped_scaled    their gradient × −1000 (the issue's worst case for hivemind's plain mean)
    random            Gaussian noise with their gradient's norm
    little_is_enough  μ − z·σ per coordinate (Baruch et al. 2019), μ and σ over their last 4 gradients, z = 1:
                      a shift small enough to hide among honest gradients' spread
    stale             the gradient they computed 10 steps ago

Each attack runs with the default rule (centered_clip), with p2ptrain's checks alone (rule ``mean``), and with
hivemind's own averager (``hivemind``: the plain weighted mean, nothing checked: the baseline); the all-honest
hivemind run gives the reference loss. The held-out loss of an honest peer after the last step is compared; the
reducer's time per part and per round (a gpt2-small vector) is measured on this machine.

    .venv/bin/python scripts/bench_attacks.py --out bench/attacks.json     # ~10 min on 2 cores
    .venv/bin/python scripts/bench_attacks.py --peers 5 --byzantine 2 --attacks scaled,sign_flip --rules centered_clip

Writes JSON (``--out``) and a Markdown table beside it (same name, .md).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import hivemind
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import Float16Compression

from p2ptrain.local_swarm import loopback_dhts
from p2ptrain.swarm.manifest import AGGREGATIONS
from p2ptrain.train.data import open_corpus
from p2ptrain.train.group_rounds import GroupRounds
from p2ptrain.train.models import build_model, evaluate, lm_loss
from p2ptrain.train.robust import check_contributions, reduce_parts
from p2ptrain.train.tokenizer import load_tokenizer

ATTACKS = ("nan", "scaled", "sign_flip", "flipped_scaled", "random", "little_is_enough", "stale")
MODEL, SEQ_LEN, BATCH, LR, WARMUP, CLIP = "gpt2-tiny", 64, 16, 1e-3, 5, 1.0
STALE_BY, LIE_WINDOW, LIE_Z = 10, 4, 1.0
BAR = 0.05  # robust final loss within 5% of the all-honest run's


class Rounds(GroupRounds, DecentralizedAverager):
    """The averager every p2ptrain mode builds on, averaging one flat gradient vector."""


BASELINE = "hivemind"  # hivemind's DecentralizedAverager as it ships: the plain mean, no checks
RULES = (BASELINE, *AGGREGATIONS)


def make_averager(rule: str, numel: int, dht: hivemind.DHT, prefix: str, peers: int) -> DecentralizedAverager:
    timings = dict(min_matchmaking_time=1.0, request_timeout=0.5, allreduce_timeout=15.0, next_chunk_timeout=5.0)
    if rule == BASELINE:
        return DecentralizedAverager([torch.zeros(numel)], dht=dht, prefix=prefix, target_group_size=peers,
                                     compression=Float16Compression(), start=True, **timings)  # fmt: skip
    return Rounds([torch.zeros(numel)], dht=dht, prefix=prefix, target_group_size=peers,
                  compression=Float16Compression(), aggregation=rule, start=True, **timings)  # fmt: skip


@dataclass
class Attacker:
    """What a dishonest member sends instead of its gradient ``g`` (one vector per step)."""

    attack: str
    seed: int
    history: deque

    def forge(self, g: torch.Tensor) -> torch.Tensor:
        self.history.append(g.clone())
        if self.attack == "nan":
            return torch.full_like(g, float("nan"))
        if self.attack == "scaled":
            return g * 1000
        if self.attack == "sign_flip":
            return -g
        if self.attack == "flipped_scaled":
            return g * -1000
        if self.attack == "random":
            noise = torch.randn(g.shape, generator=torch.Generator().manual_seed(self.seed + len(self.history)))
            return noise * (g.norm() / noise.norm())
        if self.attack == "little_is_enough":
            recent = torch.stack(list(self.history)[-LIE_WINDOW:])
            std = recent.std(0) if len(recent) > 1 else torch.zeros_like(g)
            return recent.mean(0) - LIE_Z * std
        if self.attack == "stale":
            return self.history[0] if len(self.history) > STALE_BY else g
        raise ValueError(f"unknown attack {self.attack!r}; one of {ATTACKS}")


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def set_grad(model: torch.nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()


def train(peers: int, byzantine: int, attack: str | None, rule: str, steps: int, seed: int = 0) -> dict:
    """One swarm of ``peers`` (the last ``byzantine`` of them dishonest) for ``steps`` global steps."""
    tokenizer = load_tokenizer("bytes")
    corpora = [
        open_corpus("default", "", "text", tokenizer, SEQ_LEN, seed, peer_id=f"peer-{i}".encode()) for i in range(peers)
    ]
    models = [build_model(MODEL, tokenizer.vocab_size, SEQ_LEN, seed=seed) for _ in range(peers)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1) for m in models]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(1.0, (s + 1) / WARMUP)) for o in optimizers]
    numel = sum(p.numel() for p in models[0].parameters())
    liars = range(peers - byzantine, peers) if attack else ()
    attackers = {i: Attacker(attack, seed=1000 + i, history=deque(maxlen=STALE_BY + 1)) for i in liars}
    dhts = loopback_dhts(peers)
    averagers = [make_averager(rule, numel, dht, f"attacks_{attack}_{rule}", peers) for dht in dhts]
    failed_rounds, started = 0, time.perf_counter()
    try:
        liar_rounds: dict[int, Future] = {}  # each liar's round in flight: it keeps trying, the others do not wait
        for step in range(steps):
            for i, (model, corpus) in enumerate(zip(models, corpora, strict=True)):
                if i in attackers:
                    if i in liar_rounds and not liar_rounds[i].done():
                        continue
                    model.load_state_dict(models[0].state_dict())  # it follows the swarm's parameters
                model.zero_grad()
                lm_loss(model, corpus.train_batch(step, BATCH)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
                g = flat_grad(model)
                sent = attackers[i].forge(g) if i in attackers else g
                with averagers[i].get_tensors() as (tensor,):
                    tensor.copy_(sent)
                if i in attackers:
                    liar_rounds[i] = averagers[i].step(wait=False, timeout=20)
            controls = {i: a.step(wait=False, timeout=20) for i, a in enumerate(averagers) if i not in attackers}
            for i, control in controls.items():
                if succeeded(control):
                    with averagers[i].get_tensors() as (tensor,):
                        set_grad(models[i], tensor)
                elif i == 0:  # the peer keeps its own gradient, as hivemind's Optimizer does
                    failed_rounds += 1
                optimizers[i].step()
                schedules[i].step()
        honest = models[0]
        val = corpora[0].val_blocks()[:256]
        loss = evaluate(honest, val, 32, torch.device("cpu"))
        finite = math.isfinite(loss)  # NaN parameters: the run is destroyed, its loss is null in the JSON
        return {
            "final_loss": loss if finite else None,
            "destroyed": not finite,
            "failed_rounds": failed_rounds,
            "seconds": time.perf_counter() - started,
        }
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def succeeded(control: Future) -> bool:
    try:
        return control.result(timeout=60) is not None
    except Exception:  # noqa: BLE001 - any failure of the round: the peer uses its own gradient
        return False


def reducer_cost(peers: int, part_numel: int = 2**19 // 2, model_numel: int = 124_439_808) -> dict:
    """Milliseconds to check and reduce one fp16-sized part of ``peers`` copies, by rule; the per-round total for
    one member of a ``peers`` group aggregating its 1/peers share of a gpt2-small vector."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(part_numel, generator=g) for _ in range(peers)]
    weights = [1.0] * peers
    shape = parts[0].shape
    per_part = {}
    for rule in AGGREGATIONS:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            kept, _ = check_contributions(parts, weights, shape)
            reduce_parts([parts[i] for i in kept], weights, rule)
            times.append(time.perf_counter() - started)
        per_part[rule] = statistics.median(times) * 1e3
    parts_per_member = model_numel / part_numel / peers
    return {
        "part_numel": part_numel,
        "ms_per_part": per_part,
        "s_per_round_gpt2_small": {rule: ms * parts_per_member / 1e3 for rule, ms in per_part.items()},
    }


def loss_cell(loss: float | None, honest: float) -> str:
    return "NaN: parameters destroyed" if loss is None else f"{loss:.4f} ({loss / honest - 1:+.1%})"


def markdown(report: dict) -> str:
    honest = report["honest_final_loss"]
    lines = [
        f"# Attack harness: {report['peers']} peers, {report['byzantine']} Byzantine, {report['steps']} global steps",
        "",
        f"gpt2-tiny, batch {BATCH} × {SEQ_LEN} tokens per peer per step, AdamW lr {LR}; held-out loss of an honest "
        f"peer after the last step. All honest, hivemind: **{honest:.4f}**; bar: robust within {BAR:.0%} "
        f"(≤ {honest * (1 + BAR):.4f}).",
        "",
        "All honest, by rule:",
        "",
        "| averager, rule | final loss (vs hivemind) |",
        "|---|---|",
    ]
    for rule, run in report["honest"].items():
        lines.append(f"| {rule} | {loss_cell(run['final_loss'], honest)} |")
    lines += [
        "",
        "Final loss with one attack each (vs the all-honest hivemind run):",
        "",
        "| attack | p2ptrain, centered_clip (default) | p2ptrain, checks + mean | hivemind, plain mean |",
        "|---|---|---|---|",
    ]
    for name, result in report["attacks"].items():
        runs = result["runs"]
        cells = [
            loss_cell(runs[rule]["final_loss"], honest) if rule in runs else "—"
            for rule in ("centered_clip", "mean", BASELINE)
        ]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    cost = report["reducer_cost"]
    lines += [
        "",
        f"Reducer cost on this machine ({report['peers']} copies of a {cost['part_numel']:,}-value part; per round: "
        f"one member's share of a gpt2-small vector):",
        "",
        "| rule | ms per part | s per round (gpt2-small) |",
        "|---|---|---|",
    ]
    for rule, ms in cost["ms_per_part"].items():
        lines.append(f"| {rule} | {ms:.1f} | {cost['s_per_round_gpt2_small'][rule]:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--byzantine", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument(
        "--rules", default=f"centered_clip,mean,{BASELINE}", help=f"rules to run each attack with, of {RULES}"
    )
    parser.add_argument("--honest-rules", default=",".join(RULES), help="rules for the all-honest runs")
    parser.add_argument("--out", type=Path, help="write the JSON here (and a .md beside it)")
    args = parser.parse_args(argv)
    attacks, rules = args.attacks.split(","), args.rules.split(",")
    honest_rules = list(dict.fromkeys([BASELINE, *args.honest_rules.split(",")]))
    report = {"peers": args.peers, "byzantine": args.byzantine, "steps": args.steps, "honest": {}, "attacks": {}}
    for rule in honest_rules:
        report["honest"][rule] = train(args.peers, 0, None, rule, args.steps)
        print(f"honest  {rule:14s} {report['honest'][rule]}", flush=True)
    report["honest_final_loss"] = report["honest"][BASELINE]["final_loss"]
    if report["honest_final_loss"] is None:
        raise SystemExit("the all-honest baseline run diverged: nothing to compare with")
    for attack in attacks:
        result = report["attacks"][attack] = {"runs": {}}
        for rule in rules:
            run = result["runs"][rule] = train(args.peers, args.byzantine, attack, rule, args.steps)
            print(f"{attack:16s}{rule:14s} {run}", flush=True)
        if "centered_clip" in result["runs"]:
            result["robust_final_loss"] = result["runs"]["centered_clip"]["final_loss"]
        if BASELINE in result["runs"]:
            result["mean_final_loss"] = result["runs"][BASELINE]["final_loss"]
    report["reducer_cost"] = reducer_cost(args.peers)
    text = markdown(report)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, allow_nan=False, default=str) + "\n")
        args.out.with_suffix(".md").write_text(text)
    limit = report["honest_final_loss"] * (1 + BAR)
    missed = [
        a for a, r in report["attacks"].items() if "robust_final_loss" in r and not r["robust_final_loss"] <= limit
    ]
    if missed:
        print(f"robust aggregation missed the bar under: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
