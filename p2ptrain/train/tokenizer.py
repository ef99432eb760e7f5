"""Tokenizers by name: "bytes" works anywhere offline; anything else is a Hugging Face tokenizer
loaded from the local cache or a local directory (never downloaded at run time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from p2ptrain.errors import DatasetError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int  # appended after every document so the model learns where texts end

    def encode(self, text: str) -> list[int]: ...

    def save_pretrained(self, directory: Path) -> None:
        """Write the files with which ``transformers.AutoTokenizer.from_pretrained(directory)`` gives the same ids."""


EOS_TEXT = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255) plus an end-of-document token (256)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, directory: Path) -> None:
        """As a byte-level BPE with no merges (the ``tokenizers`` library's GPT-2 machinery): each byte is one
        token whose id is the byte's value, and ``<|endoftext|>`` is 256."""
        from tokenizers import Tokenizer as Fast
        from tokenizers import decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte → character map

        by_byte = bytes_to_unicode()
        fast = Fast(models.BPE(vocab={by_byte[b]: b for b in range(256)}, merges=[]))
        fast.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        fast.decoder = decoders.ByteLevel()
        wrapped = PreTrainedTokenizerFast(tokenizer_object=fast, eos_token=EOS_TEXT, bos_token=EOS_TEXT)
        if wrapped.convert_tokens_to_ids(EOS_TEXT) != self.eos_id:
            raise AssertionError(f"{EOS_TEXT} is not token {self.eos_id}")
        wrapped.save_pretrained(directory)


class HFTokenizer:
    def __init__(self, name: str):
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DatasetError(
                f"tokenizer {name!r} (the swarm's) is not in the local Hugging Face cache or a local dir "
                f"({type(e).__name__}). Fetch it once where there is internet (`huggingface-cli download {name}`): "
                "p2ptrain downloads nothing while it runs. A swarm seeded with `--tokenizer bytes` needs no download."
            ) from None
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id if self._tok.eos_token_id is not None else self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]

    def save_pretrained(self, directory: Path) -> None:
        self._tok.save_pretrained(directory)


def load_tokenizer(name: str) -> Tokenizer:
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)
