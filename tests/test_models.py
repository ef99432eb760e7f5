"""The model registry builds GPT-2s by name, identically on every peer."""

from __future__ import annotations

import pytest
import torch

from p2ptrain.errors import ConfigError
from p2ptrain.train.models import REGISTRY, build_model, count_parameters, model_spec, padded_vocab


def test_registry_has_the_promised_models():
    assert {"gpt2-tiny", "gpt2-small", "gpt2-medium"} <= set(REGISTRY)


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ConfigError, match="gpt2-small"):
        model_spec("gpt3")


def test_same_seed_same_weights_different_seed_different_weights():
    a, b, c = (build_model("gpt2-tiny", 257, 64, seed) for seed in (1, 1, 2))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True))


def test_gpt2_small_has_124m_parameters_with_the_gpt2_vocabulary():
    with torch.device("meta"):  # shapes only: no 500 MB allocation
        model = build_model("gpt2-small", 50257, 1024, 0)
    assert padded_vocab(50257) == 50304
    assert 124e6 < count_parameters(model) < 125e6


def test_sequence_longer_than_the_context_is_refused():
    with pytest.raises(ConfigError, match="seq_len 512"):
        build_model("gpt2-tiny", 257, 512, 0)


def test_missing_initial_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(ConfigError, match="safetensors"):
        build_model("gpt2-tiny", 257, 64, 0, init_weights=str(tmp_path / "nothing-here"))


def test_initial_weights_load_from_a_local_safetensors_dir(tmp_path):
    source = build_model("gpt2-tiny", 257, 64, seed=7)
    source.save_pretrained(tmp_path, safe_serialization=True)
    loaded = build_model("gpt2-tiny", 257, 64, seed=0, init_weights=str(tmp_path))
    for pa, pb in zip(source.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(pa, pb)
