"""Training data: where text comes from, how it becomes token blocks, and which peer reads what.

Sources (the manifest's ``dataset``):
- ``default``: the embedded corpus (Python standard-library docstrings, ``corpus/``), offline;
- a local ``.txt`` / ``.jsonl`` file or a directory of them (a .txt paragraph or a JSON line's
  ``text_field`` is one document);
- anything else is a Hugging Face dataset name, streamed with ``datasets`` (split "train").

Held-out data: a document is for validation when SHA-256(text) falls in 1 of ``VAL_EVERY`` buckets,
so every peer holds out the same documents whatever order it reads them in.

Sharding: local corpora are cut into blocks of ``seq_len + 1`` tokens and each step a peer samples
its batch with a generator seeded by (swarm seed, peer id, step), so peers read different samples
and a restarted peer does not replay the same ones. Streamed datasets are shuffled with a
peer-specific seed (shard order and a sample buffer), so peers walk the stream in different orders.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from p2ptrain.errors import DatasetError
from p2ptrain.swarm.manifest import SwarmManifest
from p2ptrain.train.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

VAL_EVERY = 50  # 1 document in 50 is held out
MAX_VAL_BLOCKS = 64  # validation loss is computed on this many blocks (same on every peer)
DEFAULT_CORPUS = Path(__file__).parent / "corpus" / "stdlib_docs.txt.gz"
STREAM_SHUFFLE_BUFFER = 1000  # documents; larger mixes better, costs memory
MAX_VAL_SCAN_DOCS = 20_000  # streamed: stop looking for held-out documents after this many


def is_validation(text: str) -> bool:
    return hashlib.sha256(text.encode("utf-8")).digest()[0] % VAL_EVERY == 0


def peer_seed(seed: int, peer_id: bytes) -> int:
    """A 64-bit seed particular to (swarm, peer)."""
    return int.from_bytes(hashlib.sha256(seed.to_bytes(8, "little") + peer_id).digest()[:8], "little")


def _read_local(path: Path, text_field: str) -> Iterator[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl")) if path.is_dir() else [path]
    if not files:
        raise DatasetError(f"no .txt or .jsonl files under {path} (--dataset)")
    for file in files:
        if file.suffix == ".jsonl":
            with open(file, encoding="utf-8") as f:
                for line_no, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[text_field]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DatasetError(
                            f"{file}:{line_no} is not a JSON object with a {text_field!r} string"
                        ) from None
                    if isinstance(text, str):
                        yield text
        else:  # paragraphs are documents: a single book must still give a held-out split
            yield from file.read_text(encoding="utf-8", errors="replace").split("\n\n")


def _read_default() -> Iterator[str]:
    with gzip.open(DEFAULT_CORPUS, "rt", encoding="utf-8") as f:
        yield from f.read().split("\n\n")


class InMemoryCorpus:
    """A finite corpus held as one token array; batches are sampled per (peer, step)."""

    def __init__(self, texts: Iterable[str], tokenizer: Tokenizer, seq_len: int, seed: int, peer_id: bytes):
        train, val = [], []
        for text in texts:
            (val if is_validation(text) else train).extend(tokenizer.encode(text) + [tokenizer.eos_id])
        self.seq_len = seq_len
        self._train = np.asarray(train, dtype=np.int64)
        self._val = np.asarray(val, dtype=np.int64)
        self._n_train = max(0, (len(self._train) - 1) // seq_len)
        if self._n_train < 2 or (len(self._val) - 1) // seq_len < 1:
            raise DatasetError(
                f"the dataset is too small: {len(train)} training and {len(val)} held-out tokens make fewer than two "
                f"blocks of {seq_len + 1} tokens. Add text or lower --seq-len."
            )
        self._seed = peer_seed(seed, peer_id)
        logger.info("Dataset: %d training blocks of %d tokens, %d held-out tokens", self._n_train, seq_len, len(val))

    def _block(self, tokens: np.ndarray, i: int) -> np.ndarray:
        return tokens[i * self.seq_len : i * self.seq_len + self.seq_len + 1]

    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        """Blocks for this peer at this step, shape (batch_size, seq_len + 1)."""
        rng = np.random.default_rng([self._seed, step])
        idx = rng.choice(self._n_train, size=batch_size, replace=batch_size > self._n_train)
        return torch.from_numpy(np.stack([self._block(self._train, i) for i in idx]))

    def val_blocks(self) -> torch.Tensor:
        n = min(MAX_VAL_BLOCKS, (len(self._val) - 1) // self.seq_len)
        return torch.from_numpy(np.stack([self._block(self._val, i) for i in range(n)]))


class StreamingCorpus:
    """A Hugging Face dataset read as a stream, shuffled per peer; never fully downloaded."""

    def __init__(self, dataset, text_field: str, tokenizer: Tokenizer, seq_len: int, seed: int, peer_id: bytes):
        self._dataset, self._field, self._tok, self.seq_len = dataset, text_field, tokenizer, seq_len
        self._seed = peer_seed(seed, peer_id) % 2**32
        self._blocks = self._train_blocks()
        self._val = self._collect_val()

    def _texts(self, dataset) -> Iterator[str]:
        for row in dataset:
            text = row.get(self._field) if isinstance(row, dict) else None
            if isinstance(text, str) and text:
                yield text

    def _cut(self, texts: Iterable[str]) -> Iterator[list[int]]:
        buffer: list[int] = []
        for text in texts:
            buffer.extend(self._tok.encode(text) + [self._tok.eos_id])
            while len(buffer) >= self.seq_len + 1:
                yield buffer[: self.seq_len + 1]
                buffer = buffer[self.seq_len :]

    def _train_blocks(self) -> Iterator[list[int]]:
        epoch = 0
        while True:  # restart the stream (reshuffled) when it runs out
            shuffled = self._dataset.shuffle(seed=self._seed + epoch, buffer_size=STREAM_SHUFFLE_BUFFER)
            produced = False
            for block in self._cut(t for t in self._texts(shuffled) if not is_validation(t)):
                produced = True
                yield block
            if not produced:
                raise DatasetError(f"the dataset yielded no training text in field {self._field!r}")
            epoch += 1

    def _collect_val(self) -> torch.Tensor:
        blocks = []
        texts = (t for i, t in enumerate(self._texts(self._dataset)) if i < MAX_VAL_SCAN_DOCS and is_validation(t))
        for block in self._cut(texts):
            blocks.append(block)
            if len(blocks) == MAX_VAL_BLOCKS:
                break
        if not blocks:
            raise DatasetError(f"found no held-out text in the first {MAX_VAL_SCAN_DOCS} documents")
        return torch.tensor(blocks, dtype=torch.long)

    def train_batch(self, step: int, batch_size: int) -> torch.Tensor:
        return torch.tensor([next(self._blocks) for _ in range(batch_size)], dtype=torch.long)

    def val_blocks(self) -> torch.Tensor:
        return self._val


Corpus = InMemoryCorpus | StreamingCorpus


def open_corpus(
    dataset: str, dataset_config: str, text_field: str, tokenizer: Tokenizer, seq_len: int, seed: int, peer_id: bytes
) -> Corpus:
    """Open the manifest's dataset for this peer. Raises DatasetError with the fix when it cannot."""
    if dataset == "default":
        return InMemoryCorpus(_read_default(), tokenizer, seq_len, seed, peer_id)
    path = Path(dataset).expanduser()
    if path.exists():
        try:
            return InMemoryCorpus(_read_local(path, text_field), tokenizer, seq_len, seed, peer_id)
        except OSError as e:
            raise DatasetError(f"cannot read {path} (--dataset): {e.strerror}") from None
    if dataset.startswith((".", "/", "~")) or dataset.endswith((".txt", ".jsonl")):
        raise DatasetError(f"dataset file {dataset!r} does not exist (--dataset)")
    return open_hf_stream(dataset, dataset_config, text_field, tokenizer, seq_len, seed, peer_id)


def open_hf_stream(
    name: str, config: str, text_field: str, tokenizer: Tokenizer, seq_len: int, seed: int, peer_id: bytes, **kwargs
) -> StreamingCorpus:
    import datasets

    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True, **kwargs)
        return StreamingCorpus(stream, text_field, tokenizer, seq_len, seed, peer_id)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types (hub, network, format)
        raise DatasetError(
            f"cannot stream the Hugging Face dataset {name!r} (--dataset): {e.__class__.__name__}: {str(e)[:200]}. "
            "Check the name and your internet connection, or pass a local .txt/.jsonl path."
        ) from None


def open_data(manifest: SwarmManifest, peer_id: bytes, tokenizer_at: str = "") -> tuple[Tokenizer, Corpus]:
    """The swarm's tokenizer (from ``tokenizer_at``, where its pinned files are, if given), and this peer's shard
    of its dataset (``peer_id`` seeds the shard)."""
    tokenizer = load_tokenizer(tokenizer_at or manifest.tokenizer)
    corpus = open_corpus(
        manifest.dataset,
        manifest.dataset_config,
        manifest.text_field,
        tokenizer,
        manifest.seq_len,
        manifest.seed,
        peer_id,
    )
    return tokenizer, corpus
