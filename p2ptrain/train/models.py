"""Model registry: GPT-2 family built from configs, by name. No model code ever comes from the network.

    >>> build_model("gpt2-tiny", vocab_size=257, seq_len=64, seed=0)   # random init, ~0.5M params

``init_weights`` (a manifest field) names a local directory or a Hugging Face cache entry whose
weights are loaded with ``use_safetensors=True`` (never a pickle) and ``local_files_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from p2ptrain.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int  # longest sequence the model accepts (manifest.seq_len must fit)
    about: str
    # defaults for a new swarm of this model (the researcher's flags override them)
    tokenizer: str = "gpt2"
    seq_len: int = 1024
    target_batch_size: int = 512  # samples per global step: 512 × 1024 tokens ≈ 0.5M, as GPT-2 used


REGISTRY: dict[str, ModelSpec] = {
    "gpt2-tiny": ModelSpec(
        2, 2, 128, 256, "2 layers × 128 wide; trains on a CPU in minutes (tests, demo)", "bytes", 64, 64
    ),
    "gpt2-small": ModelSpec(12, 12, 768, 1024, "GPT-2 small, 124M parameters: the volunteer target"),
    "gpt2-medium": ModelSpec(24, 16, 1024, 1024, "GPT-2 medium, 350M parameters"),
}


def model_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r} (--model). Known models: {', '.join(REGISTRY)}.") from None


def check_context(name: str, seq_len: int) -> ModelSpec:
    """The model's spec, if ``seq_len`` fits its context; ConfigError otherwise."""
    spec = model_spec(name)
    if seq_len > spec.n_positions:
        raise ConfigError(f"seq_len {seq_len} exceeds {name}'s context of {spec.n_positions} tokens (--seq-len).")
    return spec


def padded_vocab(vocab_size: int) -> int:
    """Round the embedding table up to a multiple of 64: faster matmuls (50257 → 50304, as in nanoGPT)."""
    return (vocab_size + 63) // 64 * 64


def build_model(
    name: str, vocab_size: int, seq_len: int, seed: int, init_weights: str = "", eos_id: int | None = None
) -> torch.nn.Module:
    """Build a GPT-2 language model. Same (name, vocab, seed) → bit-identical initial weights on every peer."""
    from transformers import GPT2Config, GPT2LMHeadModel  # heavy import, deferred to when a model is built

    spec = check_context(name, seq_len)
    config = GPT2Config(
        vocab_size=padded_vocab(vocab_size),
        n_positions=spec.n_positions,
        n_layer=spec.n_layer,
        n_head=spec.n_head,
        n_embd=spec.n_embd,
        # no dropout: pretraining on a stream rarely revisits a sample (nanoGPT uses 0.0 too)
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=eos_id,  # GPT-2 uses its end-of-text token for both
        eos_token_id=eos_id,
    )
    if not init_weights:
        torch.manual_seed(seed)
        return GPT2LMHeadModel(config)
    try:
        model = GPT2LMHeadModel.from_pretrained(init_weights, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"cannot load initial weights {init_weights!r} as safetensors from a local path or the Hugging Face "
            f"cache: {e}. Download them once on a machine with internet, or seed without --init-weights."
        ) from None
    loaded = model.config
    if (loaded.n_layer, loaded.n_head, loaded.n_embd) != (spec.n_layer, spec.n_head, spec.n_embd):
        raise ConfigError(f"initial weights {init_weights!r} do not have {name}'s shape")
    if loaded.vocab_size < vocab_size:
        raise ConfigError(f"initial weights have {loaded.vocab_size} tokens, the tokenizer needs {vocab_size}")
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def lm_loss(model: torch.nn.Module, blocks: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy; ``blocks`` is (B, T+1): inputs are [:, :-1], targets [:, 1:]."""
    logits = model(input_ids=blocks[:, :-1]).logits  # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), blocks[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean held-out loss over ``blocks``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(blocks), batch_size):
        chunk = blocks[start : start + batch_size].to(device)
        total += lm_loss(model, chunk).item() * len(chunk)
        count += len(chunk)
    model.train(was_training)
    return total / max(count, 1)


def autocast_for(device: torch.device):
    """bf16 autocast on GPUs that support it; fp32 elsewhere (CPU, older GPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return partial(torch.autocast, device_type="cuda", dtype=torch.bfloat16)
    return None


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this torch build sees no CUDA GPU. Use --device cpu or auto.")
    return torch.device(name)
