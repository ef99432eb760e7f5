"""``p2ptrain export`` and ``generate``: a peer's checkpoint as a Hugging Face directory that transformers loads with
the same logits, a byte tokenizer that gives the same ids, and a model card that says where the weights come from."""

from __future__ import annotations

import base64
import json

import pytest
import torch

from p2ptrain.cli.app import main
from p2ptrain.errors import ConfigError
from p2ptrain.export import MARKER, export
from p2ptrain.fileio import atomic_write_json
from p2ptrain.swarm.manifest import sign
from p2ptrain.train.checkpoint import CheckpointInfo, checkpoint_path, save_checkpoint
from p2ptrain.train.data import open_data
from p2ptrain.train.models import build_model, lm_loss
from p2ptrain.train.tokenizer import ByteTokenizer

EPOCH = 3


@pytest.fixture
def peer_dir(tmp_path, manifest, key):
    """A data directory as a peer leaves it: the swarm it joined (swarm.json) and a checkpoint after a few steps."""
    data_dir = tmp_path / "peer"
    data_dir.mkdir()
    atomic_write_json(
        data_dir / "swarm.json",
        {"run_id": manifest.run_id, "model": manifest.model, "peers": [],
         "envelope": base64.b64encode(sign(manifest, key)).decode()},
    )  # fmt: skip
    tokenizer, corpus = open_data(manifest, b"peer")
    model = build_model(manifest.model, tokenizer.vocab_size, manifest.seq_len, manifest.seed, "", tokenizer.eos_id)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(5):  # weights that differ from the initial ones
        loss = lm_loss(model, corpus.val_blocks()[step * 4 : step * 4 + 4])
        loss.backward()
        opt.step()
        opt.zero_grad()
    path = checkpoint_path(data_dir, manifest.run_id)
    path.parent.mkdir(parents=True)
    save_checkpoint(path, model, opt.state_dict(), CheckpointInfo(EPOCH, 5, manifest.hash.hex(), {}))
    atomic_write_json(data_dir / "status.json", {"run_id": manifest.run_id, "epoch": EPOCH, "peers": 3})
    return data_dir, model, corpus


def test_an_export_loads_in_transformers_with_the_checkpoints_logits(peer_dir, tmp_path, manifest):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data_dir, model, corpus = peer_dir
    out = tmp_path / "export"
    done = export(data_dir, out)
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pkl"))  # no pickles
    loaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True).eval()
    block = corpus.val_blocks()[:2]
    with torch.no_grad():
        assert torch.equal(loaded(block).logits, model.eval()(block).logits)
    text = "Zürich — 漢字\tand a newline\n"
    assert AutoTokenizer.from_pretrained(out)(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(
        text
    )
    assert AutoTokenizer.from_pretrained(out).eos_token_id == ByteTokenizer.eos_id

    card = (out / "README.md").read_text()
    tokens = EPOCH * manifest.target_batch_size * manifest.seq_len
    assert MARKER in card and manifest.run_id in card and manifest.hash.hex() in card
    assert f"| global step | {EPOCH} |" in card and f"| tokens trained | {tokens:,} " in card
    assert "| peers | 3 (in the swarm when exported) |" in card
    assert done.val_loss is not None and f"| held-out loss | {done.val_loss:.4f} |" in card
    assert 1.0 < done.val_loss < 6.0  # gpt2-tiny on bytes after 5 steps: below log(257) = 5.55
    config = json.loads((out / "generation_config.json").read_text())
    assert config["suppress_tokens"] == list(range(257, 320))  # the embedding's padding: never sampled


def test_export_refuses_to_overwrite_what_it_did_not_write(peer_dir, tmp_path):
    data_dir, _, _ = peer_dir
    other = tmp_path / "precious"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty"):
        export(data_dir, other)
    out = tmp_path / "export"
    export(data_dir, out)
    with pytest.raises(ConfigError, match="--overwrite replaces it"):
        export(data_dir, out)
    export(data_dir, out, overwrite=True)
    with pytest.raises(ConfigError, match="joined no swarm"):
        export(tmp_path / "nothing", tmp_path / "x")


def test_generate_from_the_checkpoint_and_from_an_export(peer_dir, tmp_path, capsys):
    data_dir, _, _ = peer_dir
    args = ["--prompt", "The ", "--max-new-tokens", "12", "--temperature", "0", "--data-dir", str(data_dir)]
    assert main(["generate", *args]) == 0
    from_checkpoint = capsys.readouterr().out
    assert from_checkpoint.startswith("The ") and len(from_checkpoint) > len("The \n")
    assert main(["export", "--out", str(tmp_path / "m"), "--data-dir", str(data_dir)]) == 0
    assert "Exported swarm test-run at global step 3" in capsys.readouterr().out
    assert main(["generate", *args, "--model-dir", str(tmp_path / "m")]) == 0
    assert capsys.readouterr().out == from_checkpoint  # greedy: the same text both ways
