#!/usr/bin/env python3
"""WAN benchmark: hivemind's default averaging vs p2ptrain's compressed local updates, on shaped links.

Every peer runs in its own network namespace, joined by a bridge; each namespace's link is shaped
with `tc tbf` in both directions. The link rate is chosen so that the baseline (hivemind's default:
fp16 gradients every global step) spends ~10x its compute time communicating per global step — the
regime of a GPT-2-small peer on a 100 Mbit/s uplink. Configs, side by side, on the same data:

    single              one peer alone, no network
    hivemind_default    gradients, fp16, every global step (target batch = peers x batch)
    p2ptrain_fixed      local updates (DiLoCo), int8 pseudo-gradients (--fixed), every H local steps;
                        with several --fixed levels, p2ptrain_fixed_<codec>[-<ratio>] for each
    p2ptrain_adaptive   local updates, codec chosen per round by the adaptive policy
    p2ptrain_adaptive_halved   the same, with every link's rate halved midway

Each config runs until the swarm has processed the same number of samples (equal tokens), then the
held-out loss of the first peer's final checkpoint is measured. Without root (no namespaces) it
falls back to 127.0.0.1 and marks the figures unshaped. It removes every namespace and process it made.

    sudo .venv/bin/python scripts/bench_wan.py --out bench/wan.json      # ~20 min on 2 cores
    .venv/bin/python scripts/bench_wan.py --smoke --out /tmp/smoke.json  # ~1 min, CI (one config)
"""

from __future__ import annotations

import argparse
import atexit
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from p2ptrain.local_swarm import LocalPeer, LocalSwarm
from p2ptrain.train.averaging import payload_bytes
from p2ptrain.train.checkpoint import checkpoint_path
from p2ptrain.train.codecs import LADDER, Level
from p2ptrain.train.data import open_corpus
from p2ptrain.train.models import build_model, evaluate, lm_loss, model_spec
from p2ptrain.train.optimizers import manifest_codec
from p2ptrain.train.tokenizer import load_tokenizer

MODEL, BATCH, SUBNET = "gpt2-tiny", 8, "10.77.0"
COMM_TO_COMPUTE = 10.0  # the baseline's communication per global step ÷ its compute


# -- the network --------------------------------------------------------------------------------


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=check, capture_output=True, text=True, timeout=30)


class Namespaces:
    """N namespaces on one bridge, 10.77.0.<i+1>/24 each, links shaped with tbf in both directions."""

    def __init__(self, count: int):
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"p2pbr{tag}"
        self.names = [f"p2pt-{tag}-{i}" for i in range(count)]
        self.host_ends = [f"p2pv{tag}h{i}" for i in range(count)]
        self.rate_mbit: float | None = None
        atexit.register(self.remove)
        try:
            sh("ip", "link", "add", self.bridge, "type", "bridge")
            sh("ip", "link", "set", self.bridge, "up")
            for i, (ns, host_end) in enumerate(zip(self.names, self.host_ends, strict=True)):
                sh("ip", "netns", "add", ns)
                sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", f"p2pv{tag}p{i}")
                sh("ip", "link", "set", f"p2pv{tag}p{i}", "netns", ns)
                sh("ip", "-n", ns, "link", "set", f"p2pv{tag}p{i}", "name", "eth0")
                sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "link", "set", host_end, "master", self.bridge)
                sh("ip", "link", "set", host_end, "up")
        except BaseException:
            self.remove()
            raise

    def shape(self, mbit: float) -> None:
        """Upload (namespace side) and download (bridge side) of every peer at ``mbit``."""
        burst = max(32 * 1024, int(mbit * 1e6 / 8 / 50))
        for ns, host_end in zip(self.names, self.host_ends, strict=True):
            tbf = ("tbf", "rate", f"{mbit:.3f}mbit", "burst", str(burst), "latency", "400ms")
            verb = "change" if self.rate_mbit else "add"
            sh("ip", "netns", "exec", ns, "tc", "qdisc", verb, "dev", "eth0", "root", *tbf)
            sh("tc", "qdisc", verb, "dev", host_end, "root", *tbf)
        self.rate_mbit = mbit

    def prefix(self, i: int) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.names[i])

    def host(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def tx_bytes(self, i: int) -> int:
        out = sh("ip", "netns", "exec", self.names[i], "cat", "/sys/class/net/eth0/statistics/tx_bytes", check=False)
        return int(out.stdout.strip() or 0)

    def remove(self) -> None:
        for ns in self.names:
            sh("ip", "netns", "del", ns, check=False)
        for host_end in self.host_ends:
            sh("ip", "link", "del", host_end, check=False)
        sh("ip", "link", "del", self.bridge, check=False)


def namespaces_available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None:
        return False
    probe = f"p2pt-probe-{os.getpid()}"
    steps = [
        ("ip", "netns", "add", probe),
        ("ip", "-n", probe, "link", "add", "pbr", "type", "bridge"),
        ("ip", "-n", probe, "link", "add", "pva", "type", "veth", "peer", "name", "pvb"),
        ("ip", "netns", "exec", probe, "tc", "qdisc", "add", "dev", "pva", "root", "tbf", "rate", "1mbit", "burst",
         "32k", "latency", "400ms"),
    ]  # fmt: skip
    try:
        return all(sh(*step, check=False).returncode == 0 for step in steps)
    finally:
        sh("ip", "netns", "del", probe, check=False)


# -- calibration --------------------------------------------------------------------------------


def _time_steps(seconds: float, out: mp.Queue) -> None:
    torch.set_num_threads(1)
    spec = model_spec(MODEL)
    model = build_model(MODEL, 257, spec.seq_len, seed=0)
    blocks = torch.randint(0, 257, (BATCH, spec.seq_len + 1))
    times, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        lm_loss(model, blocks).backward()
        times.append(time.perf_counter() - started)
    out.put(statistics.median(times[2:] or times))


def calibrate(peers: int, seconds: float = 4.0) -> tuple[float, int]:
    """Median forward/backward seconds per batch with ``peers`` processes sharing this machine; numel."""
    out: mp.Queue = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_time_steps, args=(seconds, out)) for _ in range(peers)]
    for p in procs:
        p.start()
    step_s = statistics.median(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(10)
    numel = sum(p.numel() for p in build_model(MODEL, 257, model_spec(MODEL).seq_len, seed=0).parameters())
    return step_s, numel


# -- one config -----------------------------------------------------------------------------------


@dataclass
class Config:
    name: str
    peers: int
    flags: tuple[str, ...]
    validate_every: int = 1  # global steps between the first peer's held-out measurements
    halve_at_fraction: float | None = None  # of the sample budget


@dataclass
class Result:
    name: str
    wall_s: float = 0.0
    samples: int = 0
    val_points: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, swarm samples, loss)
    compute_utilization: float = 0.0  # training compute (forward, backward, the optimizer's update) ÷ wall time
    compute_utilization_fwd_bwd: float = 0.0  # forward and backward alone ÷ wall time
    bytes_per_peer_per_step: float | None = None
    global_steps: int = 0
    final_val_loss_equal_tokens: float | None = None
    time_to_target_s: float | None = None
    rounds: list[dict] = field(default_factory=list)
    halved_at_round: int | None = None


def run_config(config: Config, net: Namespaces | None, budget: int, time_cap_s: float, work: Path) -> Result:
    base = work / config.name
    shutil.rmtree(base, ignore_errors=True)
    result = Result(config.name)
    peer_flags = ("--threads", "1", "--batch-size", str(BATCH))

    def where(i: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
        if net is None:
            return (), ("--host", "127.0.0.1")
        return net.prefix(i), ("--host", net.host(i))

    with LocalSwarm(base, MODEL, swarm_flags=config.flags, peer_flags=peer_flags) as swarm:
        prefix, host = where(0)
        wait = ("--wait-for-peers", str(config.peers))
        first = swarm.seed("p0", *host, *wait, "--validate-every", str(config.validate_every), prefix=prefix)
        invite = swarm.invite(first, timeout_s=180)
        peers = [first]
        for i in range(1, config.peers):
            prefix, host = where(i)
            peers.append(swarm.join(f"p{i}", "--invite", invite, *host, *wait, "--validate-every", "0", prefix=prefix))
        tx0 = [net.tx_bytes(i) if net else 0 for i in range(config.peers)]
        swarm.wait_for(first, lambda s: s.get("training_since") is not None, 300, "training")
        started = min(  # the clock starts when the first peer starts training
            s["training_since"] for s in (p.status() for p in peers) if s.get("training_since")
        )
        seen, halved = 0, False
        while time.time() - started < time_cap_s:
            statuses = [p.status() for p in peers]
            result.samples = sum(s.get("samples", 0) for s in statuses)
            history = statuses[0].get("val_history", [])
            for _step, loss in history[seen:]:
                result.val_points.append((time.time() - started, result.samples, loss))
            seen = len(history)
            if config.halve_at_fraction and not halved and result.samples >= config.halve_at_fraction * budget:
                net and net.shape(net.rate_mbit / 2)
                halved, result.halved_at_round = True, statuses[0].get("epoch", 0)
                print(f"  link rate halved at global step {result.halved_at_round}", flush=True)
            if result.samples >= budget or not all(p.alive() for p in peers):
                break
            time.sleep(0.25)
        result.wall_s = time.time() - started
        if net:
            sent = [net.tx_bytes(i) - tx0[i] for i in range(config.peers)]
        # utilization while training: compute_s and updated_at come from the same status write, before
        # the peers are stopped one by one (the last ones would otherwise count their wait for the first)
        walls = [
            (s, s["updated_at"] - s["training_since"] - s.get("val_s", 0)) for s in statuses if s.get("training_since")
        ]
        utilizations = [(s.get("compute_s", 0) + s.get("optimizer_s", 0)) / max(1e-9, wall) for s, wall in walls]
        fwd_bwd = [s.get("compute_s", 0) / max(1e-9, wall) for s, wall in walls]
        for peer in peers:
            swarm.stop(peer, signal.SIGTERM, timeout_s=20)
        statuses = [p.status() for p in peers]
    result.global_steps = max(s.get("epoch", 0) for s in statuses)
    result.compute_utilization = statistics.mean(utilizations) if utilizations else 0.0
    result.compute_utilization_fwd_bwd = statistics.mean(fwd_bwd) if fwd_bwd else 0.0
    if net and result.global_steps:
        result.bytes_per_peer_per_step = statistics.mean(sent) / result.global_steps
    result.rounds = parse_rounds(first)
    result.final_val_loss_equal_tokens = final_loss(first, base / "p0")
    if config.halve_at_fraction and net:
        net.shape(net.rate_mbit * 2)
    return result


ROUND = re.compile(
    r"Round (\d+): (\d+) peers, codec ([\w\- .]+), (\d+) kB sent, ([\d.]+) s, [\d.]+ MB/s"
    r"(?: \(predicted ([\d.]+) s, allowed ([\d.]+) s\))?"
)


def parse_rounds(peer: LocalPeer) -> list[dict]:
    return [
        {
            "round": int(r),
            "peers": int(n),
            "codec": c,
            "kb": int(kb),
            "round_s": float(s),
            "predicted_s": float(p) if p else None,
            "allowed_s": float(a) if a else None,
        }
        for r, n, c, kb, s, p, a in ROUND.findall(peer.log())
    ]


def final_loss(peer: LocalPeer, data_dir: Path) -> float | None:
    """Held-out loss of the peer's final checkpoint, on the same validation blocks every config uses."""
    status = peer.status()
    if not status.get("run_id"):
        return None
    path = checkpoint_path(data_dir, status["run_id"])
    if not path.exists():
        return None
    spec = model_spec(MODEL)
    tokenizer = load_tokenizer(spec.tokenizer)
    model = build_model(MODEL, tokenizer.vocab_size, spec.seq_len, seed=0)
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tensors[f"model.{name}"])
    corpus = open_corpus("default", "", "text", tokenizer, spec.seq_len, 0, b"bench")
    return evaluate(model, corpus.val_blocks(), 32, torch.device("cpu"))


# -- the whole benchmark ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--local-steps", type=int, default=16, help="H: local steps per global step (local mode)")
    parser.add_argument("--rounds", type=int, default=12, help="global steps of the local-mode configs")
    parser.add_argument("--time-cap", type=float, default=900.0, help="seconds per config at most")
    parser.add_argument("--link-mbit", type=float, help="override the automatic link rate")
    parser.add_argument("--comm-budget", type=float, help="the adaptive configs' --comm-budget [default: manifest's]")
    # DiLoCo's 0.7 is for ~500 local steps; at 16, uncompressed averaging ended 0.47 higher with it than with 0.35
    # (2.73 vs 2.26, 3 seeds of scripts/bench_codecs.py) and varied by 20 % from run to run here
    parser.add_argument("--outer-lr", type=float, default=0.35, help="the local-mode configs' --outer-lr")
    parser.add_argument(
        "--fixed", nargs="+", type=parse_level, default=[Level("int8")], metavar="LEVEL",
        help="the codec of p2ptrain_fixed: fp16, int8, int4, int2, or CODEC:RATIO for random-k (int2:0.2); several "
        "give a config each; 'ladder': every rung of the adaptive policy's ladder",
    )  # fmt: skip
    parser.add_argument(
        "--target-loss", type=float, help="the target held-out loss [default: hivemind_default's final loss + 1%%]"
    )
    parser.add_argument("--loopback", action="store_true", help="do not use namespaces even as root")
    parser.add_argument("--smoke", action="store_true", help="a short run (CI): fewer rounds, one config")
    parser.add_argument("--only", nargs="*", help="run only these configs")
    parser.add_argument("--keep", action="store_true", help="keep the peers' data dirs and logs")
    parser.add_argument("--out", type=Path, default=Path("bench_wan.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.peers, args.rounds, args.time_cap = 2, 3, 60.0
    args.fixed = list(dict.fromkeys(level for given in args.fixed for level in ([given] if given else LADDER)))

    n, h = args.peers, args.local_steps
    budget = n * BATCH * h * args.rounds  # samples: equal tokens for every config
    step_s, numel = calibrate(n)
    baseline_bytes = payload_bytes(Level("fp16"), numel, n)
    mbit = args.link_mbit or baseline_bytes * 8 / 1e6 / (COMM_TO_COMPUTE * step_s)
    shaped = not args.loopback and namespaces_available()
    print(
        f"{n} peers, {numel:,} parameters, compute {step_s * 1e3:.0f} ms/batch, baseline payload "
        f"{baseline_bytes / 1e6:.2f} MB/step → link {mbit:.1f} Mbit/s ({'shaped' if shaped else 'UNSHAPED loopback'}); "
        f"{budget} samples per config",
        flush=True,
    )
    common = ("--matchmaking-time", "1", "--averaging-timeout", "30", "--warmup-epochs", "2", "--lr", "3e-3")
    local = (*common, "--averaging", "local", "--target-batch-size", str(n * BATCH * h))
    local += ("--outer-lr", str(args.outer_lr))
    adaptive = (*local, "--compression", "adaptive")
    if args.comm_budget:
        adaptive += ("--comm-budget", str(args.comm_budget))
    configs = [
        Config("single", 1, (*common, "--target-batch-size", str(BATCH), "--compression", "none"), n * h),
        Config("hivemind_default", n, (*common, "--target-batch-size", str(n * BATCH), "--compression", "fp16"), h),
        *(Config(fixed_name(level, args.fixed), n, (*local, *compression_flags(level))) for level in args.fixed),
        # the loss bar's reference: the same local-update training, averaged without any compression
        Config("p2ptrain_uncompressed", n, (*local, "--compression", "none")),
        Config("p2ptrain_adaptive", n, (*adaptive,)),
        Config("p2ptrain_adaptive_halved", n, (*adaptive,), 1, halve_at_fraction=0.5),
    ]
    if args.smoke:  # the script's machinery end to end; the comparisons are the real run's
        configs = [c for c in configs if c.name == "p2ptrain_adaptive"]
    if args.only:  # "p2ptrain_fixed" names every fixed config
        fixed = "p2ptrain_fixed" in args.only
        configs = [c for c in configs if c.name in args.only or fixed and c.name.startswith("p2ptrain_fixed")]
    work = Path(tempfile.mkdtemp(prefix="p2ptrain-bench-"))
    net = Namespaces(n) if shaped else None
    results: dict[str, Result] = {}
    try:
        if net:
            net.shape(mbit)
        for config in configs:
            print(f"[{config.name}] {config.peers} peer(s)…", flush=True)
            results[config.name] = run_config(config, net, budget, args.time_cap, work)
            r = results[config.name]
            print(
                f"  {r.wall_s:.0f} s, {r.samples} samples, {r.global_steps} global steps, "
                f"utilization {r.compute_utilization:.0%}, final loss {r.final_val_loss_equal_tokens}",
                flush=True,
            )
    finally:
        if net:
            net.remove()
        if args.keep:
            print(f"peer logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    target = targeted(results, args.target_loss)
    report = {
        "shaped": shaped,
        "link_mbit": mbit,
        "peers": n,
        "parameters": numel,
        "compute_s_per_batch": step_s,
        "samples_per_config": budget,
        "fixed_codec": ", ".join(level.describe() for level in args.fixed),
        "outer_lr": args.outer_lr,
        "target_val_loss": target,
        "configs": {name: vars(r) for name, r in results.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    markdown = table(report)
    args.out.with_suffix(".md").write_text(markdown)
    plot(report, args.out.with_suffix(".png"))
    print(markdown)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}, {args.out.with_suffix('.png')}")
    return 0


def parse_level(text: str) -> Level | None:
    """``--fixed``: a dense codec, ``CODEC:RATIO`` for random-k, or ``ladder`` (None: every rung)."""
    if text == "ladder":
        return None
    codec, _, ratio = text.partition(":")
    try:
        level = Level(codec, float(ratio) if ratio else 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the ratio is not a number") from None
    if codec not in ("fp16", "int8", "int4", "int2") or not 0.001 <= level.ratio <= 1.0 or (ratio and codec == "fp16"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected fp16, int8, int4, int2 or int8/int4/int2:RATIO")
    return level


def compression_flags(level: Level) -> tuple[str, ...]:
    compression, sparsity = manifest_codec(level)
    return ("--compression", compression, *(() if sparsity is None else ("--sparsity", f"{sparsity:g}")))


def fixed_name(level: Level, levels: list[Level]) -> str:
    if len(levels) == 1:
        return "p2ptrain_fixed"
    return f"p2ptrain_fixed_{level.codec}" + (f"-{level.ratio:g}" if level.ratio < 1.0 else "")


def targeted(results: dict[str, Result], given: float | None = None) -> float | None:
    """Target = the baseline's final loss at equal tokens (+1%), or ``given`` (a run without the baseline); fills in
    every config's time to reach it."""
    base = results.get("hivemind_default")
    if given is None and (base is None or base.final_val_loss_equal_tokens is None):
        return None
    target = given or base.final_val_loss_equal_tokens * 1.01
    for r in results.values():
        r.time_to_target_s = next((t for t, _, loss in r.val_points if loss <= target), None)
        if r.time_to_target_s is None and r.final_val_loss_equal_tokens is not None:
            if r.final_val_loss_equal_tokens <= target:
                r.time_to_target_s = r.wall_s
    return target


def table(report: dict) -> str:
    configs = report["configs"]
    base = configs.get("hivemind_default", {})
    lines = [
        f"Link {report['link_mbit']:.1f} Mbit/s "
        f"{'(tbf-shaped namespaces)' if report['shaped'] else '(UNSHAPED loopback)'}"
        f", {report['peers']} peers, {report['samples_per_config']} samples per config, "
        f"target held-out loss {report['target_val_loss'] and round(report['target_val_loss'], 3)}; "
        f"p2ptrain_fixed: {report.get('fixed_codec', 'int8')}; local mode's outer lr {report.get('outer_lr', 0.7)}",
        "",
        "| config | time to target (s) | speed-up vs hivemind | compute utilization (fwd/bwd only) | bytes/peer/step "
        "| fp32 ÷ bytes | final loss (equal tokens) | vs hivemind | vs uncompressed | wall (s) | global steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp32 = payload_bytes(Level("none"), report["parameters"], report["peers"])  # a global step's, uncompressed
    for name, r in configs.items():
        ttt, base_ttt = r["time_to_target_s"], base.get("time_to_target_s")
        speedup = f"{base_ttt / ttt:.1f}x" if ttt and base_ttt else "—"
        loss, base_loss = r["final_val_loss_equal_tokens"], base.get("final_val_loss_equal_tokens")
        rel = f"{(loss / base_loss - 1) * 100:+.1f}%" if loss and base_loss else "—"
        full = configs.get("p2ptrain_uncompressed", {}).get("final_val_loss_equal_tokens")
        rel_full = f"{(loss / full - 1) * 100:+.1f}%" if loss and full else "—"
        sent = r["bytes_per_peer_per_step"]
        bps, factor = (f"{sent / 1e3:,.0f} kB", f"{fp32 / sent:.1f}x") if sent and sent >= 1e3 else ("—", "—")
        fwd_bwd = r.get("compute_utilization_fwd_bwd")
        utilization = f"{r['compute_utilization']:.0%}" + (f" ({fwd_bwd:.0%})" if fwd_bwd is not None else "")
        lines.append(
            f"| {name} | {ttt and round(ttt, 1)} | {speedup} | {utilization} | {bps} | {factor} "
            f"| {loss and round(loss, 4)} | {rel} | {rel_full} | {r['wall_s']:.0f} | {r['global_steps']} |"
        )
    fixed = {name: r for name, r in configs.items() if name.startswith("p2ptrain_fixed")}
    adaptive = configs.get("p2ptrain_adaptive")
    if adaptive and len(fixed) > 1:
        order = lambda name: (fixed[name]["time_to_target_s"] or float("inf"), fixed[name]["wall_s"])  # noqa: E731
        best = min(fixed, key=order)
        lines += [
            "",
            f"Adaptive vs the best of {len(fixed)} fixed codecs ({best}): time to target "
            f"{adaptive['time_to_target_s'] and round(adaptive['time_to_target_s'], 1)} s vs "
            f"{fixed[best]['time_to_target_s'] and round(fixed[best]['time_to_target_s'], 1)} s, wall to equal tokens "
            f"{adaptive['wall_s']:.0f} s vs {fixed[best]['wall_s']:.0f} s",
        ]
    link_bytes_s = report["link_mbit"] * 1e6 / 8
    for name, r in configs.items():
        if r["rounds"]:
            lines += ["", f"Rounds of {name} (achieved round time vs payload ÷ link rate):", ""]
            lines += [
                "| round | peers | codec | kB sent | round (s) | payload ÷ link (s) | predicted (s) | allowed (s) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for x in r["rounds"]:
                halved = r["halved_at_round"] is not None and x["round"] > r["halved_at_round"]
                ideal = x["kb"] * 1e3 / (link_bytes_s / 2 if halved else link_bytes_s)
                mark = " ← link halved" if halved and x["round"] == r["halved_at_round"] + 1 else ""
                predicted, allowed = (
                    f"{x[k]:.2f}" if x.get(k) is not None else "—" for k in ("predicted_s", "allowed_s")
                )
                lines.append(
                    f"| {x['round']}{mark} | {x['peers']} | {x['codec']} | {x['kb']} "
                    f"| {x['round_s']:.2f} | {ideal:.2f} | {predicted} | {allowed} |"
                )
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in report["configs"].items():
        if r["val_points"]:
            t, _, loss = zip(*r["val_points"], strict=True)
            ax.plot(t, loss, label=name, marker=".")
    if report["target_val_loss"]:
        ax.axhline(report["target_val_loss"], color="grey", linestyle="--", label="target")
    ax.set_xlabel("wall time (s)")
    ax.set_ylabel("held-out loss")
    shaped = "tbf-shaped" if report["shaped"] else "UNSHAPED loopback"
    ax.set_title(f"{report['peers']} peers, {report['link_mbit']:.1f} Mbit/s links ({shaped})")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup (finally, atexit)
    sys.exit(main())
