"""Datasets: sources, the held-out split, and which peer reads what."""

from __future__ import annotations

import json

import pytest
import torch

from p2ptrain.errors import DatasetError
from p2ptrain.train.data import InMemoryCorpus, is_validation, open_corpus, open_hf_stream
from p2ptrain.train.tokenizer import ByteTokenizer, load_tokenizer

TOK = ByteTokenizer()


def docs(n: int) -> list[str]:
    return [f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 5 for i in range(n)]


def test_default_corpus_is_embedded_and_split():
    corpus = open_corpus("default", "", "text", TOK, 64, 0, b"peer-a")
    assert corpus.train_batch(0, 8).shape == (8, 65)
    assert corpus.val_blocks().shape[1] == 65 and len(corpus.val_blocks()) >= 16


def test_peers_read_different_samples_and_a_peer_is_deterministic():
    a1 = open_corpus("default", "", "text", TOK, 64, 0, b"peer-a")
    a2 = open_corpus("default", "", "text", TOK, 64, 0, b"peer-a")
    b = open_corpus("default", "", "text", TOK, 64, 0, b"peer-b")
    assert torch.equal(a1.train_batch(5, 8), a2.train_batch(5, 8))  # a restarted peer: same key, same batch
    assert not torch.equal(a1.train_batch(5, 8), a1.train_batch(6, 8))  # the next step reads new samples
    rows_a = {tuple(r.tolist()) for step in range(20) for r in a1.train_batch(step, 8)}
    rows_b = {tuple(r.tolist()) for step in range(20) for r in b.train_batch(step, 8)}
    assert len(rows_a & rows_b) < 0.1 * len(rows_a)  # peers mostly read different blocks


def test_held_out_documents_never_reach_training(tmp_path):
    texts = [f"unique-{i}-" + "x" * 200 for i in range(400)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    corpus = open_corpus(str(path), "", "text", TOK, 32, 0, b"p")
    val_texts = [t for t in texts if is_validation(t)]
    assert val_texts, "the split holds some documents out"
    train_bytes = bytes(
        b for step in range(200) for row in corpus.train_batch(step, 16) for b in row.tolist() if b < 256
    )
    for text in val_texts:
        assert text[:12].encode() not in train_bytes


def test_local_txt_files_and_folders(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(docs(60)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("\n\n".join(docs(60)))
    assert open_corpus(str(tmp_path), "", "text", TOK, 32, 0, b"p").train_batch(0, 4).shape == (4, 33)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: (d / "bad.jsonl").write_text("{not json}\n") and d / "bad.jsonl", "bad.jsonl:1"),
        (lambda d: (d / "tiny.txt").write_text("hi") and d / "tiny.txt", "too small"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "no .txt or .jsonl"),
    ],
)
def test_unreadable_datasets_say_what_is_wrong(tmp_path, setup, message):
    with pytest.raises(DatasetError, match=message):
        open_corpus(str(setup(tmp_path)), "", "text", TOK, 32, 0, b"p")


def test_hugging_face_streaming_path_on_local_json(tmp_path):
    """The real `datasets` streaming loader, offline: a local JSON-lines file as the source."""
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"content": t}) for t in docs(300)))
    a = open_hf_stream("json", "", "content", TOK, 32, 0, b"peer-a", data_files=str(path))
    b = open_hf_stream("json", "", "content", TOK, 32, 0, b"peer-b", data_files=str(path))
    batch = a.train_batch(0, 8)
    assert batch.shape == (8, 33) and a.val_blocks().shape[1] == 33
    assert not torch.equal(batch, b.train_batch(0, 8))  # peers walk the stream in different orders


def test_unknown_hub_dataset_is_a_clear_error():
    with pytest.raises(DatasetError, match="cannot stream the Hugging Face dataset"):
        open_corpus("no-such-user/no-such-dataset-p2ptrain", "", "text", TOK, 32, 0, b"p")


def test_in_memory_corpus_needs_enough_text():
    with pytest.raises(DatasetError, match="too small"):
        InMemoryCorpus(["short"], TOK, 64, 0, b"p")


def test_a_tokenizer_not_here_says_how_to_get_it_for_any_verb(tmp_path, monkeypatch):
    """A volunteer's `join` has no --tokenizer flag (the swarm's manifest names it): the error must not send them to
    one, and says how to fetch it (nothing is downloaded at run time)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(DatasetError) as caught:
        load_tokenizer("p2ptrain-tests/no-such-tokenizer")
    message = str(caught.value)
    assert "huggingface-cli download p2ptrain-tests/no-such-tokenizer" in message
    assert "downloads nothing while it runs" in message
    assert "use --tokenizer" not in message and "seeded with `--tokenizer bytes`" in message
