"""Tokenizers by name: "bytes" works anywhere offline; anything else is a Hugging Face tokenizer
loaded from the local cache or a local directory (never downloaded at run time).
"""

from __future__ import annotations

from typing import Protocol

from p2ptrain.errors import DatasetError


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int  # appended after every document so the model learns where texts end

    def encode(self, text: str) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens (0-255) plus an end-of-document token (256)."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, name: str):
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DatasetError(
                f"tokenizer {name!r} is not in the local Hugging Face cache or a local dir ({type(e).__name__}). "
                f"Fetch it once where there is internet (`huggingface-cli download {name}`), or use --tokenizer bytes."
            ) from None
        self.vocab_size = len(self._tok)
        self.eos_id = self._tok.eos_token_id if self._tok.eos_token_id is not None else self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return self._tok(text, add_special_tokens=False)["input_ids"]


def load_tokenizer(name: str) -> Tokenizer:
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)
