#!/usr/bin/env python3
"""What each codec costs the model: local-update (DiLoCo) training of N workers in one process, their
pseudo-gradients averaged through each ladder level's real codec, side by side on the same data.

The network is left out on purpose: this measures only what compression does to the loss, at equal
tokens, so that rungs of equal bytes (int8 on a quarter of the coordinates, int4 on half, int2 on all)
can be compared without the link's noise. The averaging is the all-reduce's arithmetic, part by part:
hivemind's parts of ``codecs.part_size`` and their aggregators (each worker's own parts exact, the others'
decoded from the codec's bytes), and the average goes back to every worker through
the codec once more (every member ends with the same bits, as ``group_rounds.SameAverageRunner``
makes it). Random-k masks are ``codecs.shared_indices``; the outer step is ``outer_step.outer_step_``.

``+ef``: the quantization error feedback of the local mode: what a worker's pseudo-gradient lost to
the codec stays in its parameters (as the coordinates outside a random-k mask do), so the next
pseudo-gradient carries it.

    .venv/bin/python scripts/bench_codecs.py --out bench/codecs.json     # ~1.3 min per variant and seed, 2 cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hivemind.averaging.partition import TensorPartContainer
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from p2ptrain.swarm.manifest import AveragingSpec, OptimizerSpec
from p2ptrain.train.codecs import DENSE, Level, part_size, shared_indices
from p2ptrain.train.data import open_corpus
from p2ptrain.train.models import build_model, evaluate, lm_loss, model_spec
from p2ptrain.train.optimizers import param_groups
from p2ptrain.train.outer_step import outer_step_
from p2ptrain.train.tokenizer import load_tokenizer

MODEL, BATCH, LR = "gpt2-tiny", 8, 3e-3


@dataclass(frozen=True)
class Variant:
    name: str
    level: Level
    error_feedback: bool = False


VARIANTS = (
    Variant("none", Level("none")),
    Variant("int8", Level("int8")),
    Variant("int4", Level("int4")),
    Variant("int8 random-0.5", Level("int8", 0.5)),
    Variant("int4+ef", Level("int4"), True),
    Variant("int2", Level("int2")),
    Variant("int2+ef", Level("int2"), True),
    Variant("int8 random-0.25", Level("int8", 0.25)),
    Variant("int4 random-0.5+ef", Level("int4", 0.5), True),
    Variant("int8 random-0.1", Level("int8", 0.1)),
    Variant("int2 random-0.4+ef", Level("int2", 0.4), True),
    Variant("int8 random-0.05", Level("int8", 0.05)),
    Variant("int4 random-0.1+ef", Level("int4", 0.1), True),
    Variant("int2 random-0.2", Level("int2", 0.2)),
    Variant("int2 random-0.2+ef", Level("int2", 0.2), True),
    Variant("int8 random-0.02", Level("int8", 0.02)),
    Variant("int2 random-0.08+ef", Level("int2", 0.08), True),
    Variant("int8 random-0.01", Level("int8", 0.01)),
    Variant("int2 random-0.04+ef", Level("int2", 0.04), True),
)


def through(codec, values: torch.Tensor) -> torch.Tensor:
    """``values`` as the receiver decodes them."""
    return deserialize_torch_tensor(codec.compress(values, CompressionInfo.from_tensor(values)))


def all_reduce(vectors: list[torch.Tensor], level: Level, numel: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The group's average as every member receives it, and what each member's vector lost on its way out: the
    parts and their aggregators are hivemind's (``TensorPartContainer``, equal shares), as in the all-reduce."""
    n, codec = len(vectors), DENSE[level.codec]()
    size = part_size(level.bytes_for(numel), n)
    info = (CompressionInfo.from_tensor(vectors[0], key=0),)
    pieces = [
        TensorPartContainer([v], [1.0] * n, compression=codec, part_size_bytes=size, tensor_infos=info) for v in vectors
    ]
    average, lost = [], [[] for _ in vectors]
    for aggregator in range(n):
        for parts in zip(*(container.get_raw_input_parts(aggregator) for container in pieces), strict=True):
            received = [part if i == aggregator else through(codec, part) for i, part in enumerate(parts)]
            for i in range(n):
                lost[i].append(parts[i] - received[i])
            average.append(through(codec, torch.stack(received).mean(0)))
    return torch.cat(average), [torch.cat(parts_lost) for parts_lost in lost]


def train(variant: Variant, workers: int, local_steps: int, rounds: int, seed: int, outer: tuple[float, float]) -> dict:
    spec = model_spec(MODEL)
    tokenizer = load_tokenizer(spec.tokenizer)
    corpora = [
        open_corpus("default", "", "text", tokenizer, spec.seq_len, seed, f"worker-{i}".encode())
        for i in range(workers)
    ]
    models = [build_model(MODEL, tokenizer.vocab_size, spec.seq_len, seed=seed) for _ in range(workers)]
    defaults = OptimizerSpec()  # the manifest's defaults but the learning rate (bench_wan's)
    inner = [
        torch.optim.AdamW(param_groups(m, defaults.weight_decay), lr=LR, betas=(defaults.beta1, defaults.beta2))
        for m in models
    ]
    anchor = parameters_to_vector(models[0].parameters()).detach().clone()
    numel = anchor.numel()
    momentum = torch.zeros(numel)
    sent_bytes, curve, errors, started = 0.0, [], [], time.monotonic()
    for r in range(rounds):
        for model, optimizer, corpus in zip(models, inner, corpora, strict=True):
            for step in range(local_steps):
                for group in optimizer.param_groups:  # linear warm-up over the first two rounds
                    group["lr"] = LR * min(1.0, (r * local_steps + step + 1) / (2 * local_steps))
                optimizer.zero_grad()
                lm_loss(model, corpus.train_batch(r * local_steps + step, BATCH)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), defaults.clip_grad_norm)
                optimizer.step()
        deltas = [anchor - parameters_to_vector(m.parameters()).detach() for m in models]  # pseudo-gradients
        mask = None
        if variant.level.ratio < 1.0:
            indices = shared_indices(f"{seed}-{r}".encode(), numel, variant.level.ratio)
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[indices] = True
            sent = [d[indices] for d in deltas]
            average, lost = all_reduce(sent, variant.level, numel)
            delta = torch.zeros(numel)
            delta[indices] = average
        else:
            sent = deltas
            delta, lost = all_reduce(deltas, variant.level, numel)
            average = delta
        exact = torch.stack(sent).mean(0)  # on the coordinates sent: what the codec got wrong this round
        errors.append(float((average - exact).norm() / exact.norm().clamp_min(1e-30)))
        sent_bytes += 2.0 * variant.level.bytes_for(numel) * (workers - 1) / workers
        outer_step_(anchor, momentum, delta, *outer, mask)
        for model, own, own_lost in zip(models, deltas, lost, strict=True):
            new = anchor.clone()
            if variant.error_feedback:  # what the codec did not carry stays as local progress
                if mask is None:
                    new -= own_lost
                else:
                    new[mask] -= own_lost
            if mask is not None:
                new[~mask] = (anchor - own)[~mask]  # outside the mask: the worker's own parameters
            vector_to_parameters(new, model.parameters())
        if (r + 1) % max(1, rounds // 6) == 0 or r + 1 == rounds:
            curve.append((r + 1, held_out(anchor, corpora[0], tokenizer.vocab_size, spec.seq_len, seed)))
            print(f"  {variant.name}: round {r + 1}, held-out loss of the anchor {curve[-1][1]:.4f}", flush=True)
    worker = parameters_to_vector(models[0].parameters()).detach()
    return {
        "final_loss": curve[-1][1],
        "worker_loss": held_out(worker, corpora[0], tokenizer.vocab_size, spec.seq_len, seed),
        "curve": curve,
        "average_error": sum(errors) / len(errors),
        "bytes_per_value": variant.level.bytes_for(numel) / numel,
        "fp32_over_bytes": 4.0 / (variant.level.bytes_for(numel) / numel),
        "kb_per_worker_per_round": sent_bytes / rounds / 1e3,
        "wall_s": round(time.monotonic() - started, 1),
    }


def held_out(anchor: torch.Tensor, corpus, vocab_size: int, seq_len: int, seed: int) -> float:
    model = build_model(MODEL, vocab_size, seq_len, seed=seed)
    vector_to_parameters(anchor, model.parameters())
    return evaluate(model, corpus.val_blocks(), 32, torch.device("cpu"))


def table(report: dict) -> str:
    """One row per variant: its figures' mean over the seeds (and their range)."""
    runs = report["results"]  # variant → seed → figures
    mean = {name: statistics.mean(r["final_loss"] for r in by_seed.values()) for name, by_seed in runs.items()}
    lines = [
        f"{report['workers']} workers, {report['local_steps']} local steps × {report['rounds']} rounds, batch {BATCH}, "
        f"{MODEL}, outer lr {report['outer'][0]:g} momentum {report['outer'][1]:g}, seeds "
        f"{', '.join(map(str, report['seeds']))}: held-out loss of the agreed parameters (the anchor) "
        "at equal tokens, mean (min-max); error: ‖the group's average as received − the exact average‖ ÷ ‖exact‖ on "
        "the coordinates sent, per round",
        "",
        "| variant | bytes/value | fp32 ÷ bytes | final loss | vs none | error of the average | a worker's own loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, by_seed in sorted(runs.items(), key=lambda kv: -next(iter(kv[1].values()))["bytes_per_value"]):
        first, losses = next(iter(by_seed.values())), [r["final_loss"] for r in by_seed.values()]
        vs = f"{(mean[name] / mean['none'] - 1) * 100:+.1f}%" if "none" in mean else "—"
        error = statistics.mean(r["average_error"] for r in by_seed.values())
        worker = statistics.mean(r["worker_loss"] for r in by_seed.values())
        cells = (
            name, f"{first['bytes_per_value']:.3f}", f"{first['fp32_over_bytes']:.0f}×",
            f"{mean[name]:.4f} ({min(losses):.3f}-{max(losses):.3f})", vs, f"{error:.3f}", f"{worker:.4f}",
        )  # fmt: skip
        lines.append(f"| {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--outer-lr", type=float, default=AveragingSpec.outer_lr)
    parser.add_argument("--outer-momentum", type=float, default=AveragingSpec.outer_momentum)
    parser.add_argument("--only", nargs="*", help="run only these variants")
    parser.add_argument("--merge", type=Path, nargs="+", help="no training: one report of these runs' reports")
    parser.add_argument("--out", type=Path, default=Path("bench_codecs.json"))
    args = parser.parse_args(argv)
    if args.merge:
        return write(merged([json.loads(path.read_text()) for path in args.merge]), args.out)
    torch.set_num_threads(2)
    variants = [v for v in VARIANTS if not args.only or v.name in args.only]
    report = {"workers": args.workers, "local_steps": args.local_steps, "rounds": args.rounds, "seeds": args.seeds}
    report["outer"] = outer = (args.outer_lr, args.outer_momentum)
    report["results"] = {v.name: {} for v in variants}
    for seed in args.seeds:
        for variant in variants:
            print(f"[{variant.name}, seed {seed}]", flush=True)
            torch.manual_seed(seed)
            figures = train(variant, args.workers, args.local_steps, args.rounds, seed, outer)
            report["results"][variant.name][str(seed)] = figures
    return write(report, args.out)


def merged(reports: list[dict]) -> dict:
    """Runs of the same settings (variants run apart, e.g. to add one) as one report."""
    settings = [{k: v for k, v in r.items() if k != "results"} for r in reports]
    if any(s != settings[0] for s in settings):
        raise SystemExit(f"these runs differ in their settings: {settings}")
    return {**settings[0], "results": {name: runs for r in reports for name, runs in r["results"].items()}}


def write(report: dict, out: Path) -> int:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    markdown = table(report)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
