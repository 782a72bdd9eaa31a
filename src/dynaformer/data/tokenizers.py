"""Tokenizers: byte-level (default; vocab 256, any text, nothing to download), char-level
(vocab built from the training text and saved with the run) and byte-level BPE (bpe.py; trained
locally with HF `tokenizers`, saved with the run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DynaformerError


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_bytes(self) -> np.ndarray: ...
    def to_dict(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens. Bits per byte is simply loss / ln 2."""

    kind = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (for bits per byte)."""
        return np.ones(256, dtype=np.int64)

    def to_dict(self) -> dict:
        return {"kind": self.kind}


class CharTokenizer:
    """One token per Unicode character seen in the training text (sorted, as char-rnn and nanoGPT do)."""

    kind = "char"

    def __init__(self, chars: list[str]) -> None:
        if not chars:
            raise DynaformerError("char tokenizer: empty vocabulary (is the training text empty?)")
        self.chars = list(chars)
        self.vocab_size = len(self.chars)
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def fit(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError as e:
            raise DynaformerError(f"char tokenizer: character {e.args[0]!r} is not in the vocabulary") from None

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint8 if self.vocab_size <= 256 else np.uint32)

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def token_bytes(self) -> np.ndarray:
        return np.array([len(c.encode("utf-8")) for c in self.chars], dtype=np.int64)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def tokenizer_from_dict(d: dict) -> ByteTokenizer | CharTokenizer:
    kind = d.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char" and isinstance(d.get("chars"), list):
        return CharTokenizer(d["chars"])
    if kind == "bpe" and isinstance(d.get("tokenizer"), dict):
        from .bpe import BPETokenizer

        return BPETokenizer(d["tokenizer"])
    raise DynaformerError(f"tokenizer: unknown or malformed tokenizer description (kind={kind!r})")


def save_tokenizer(tok: ByteTokenizer | CharTokenizer, path: Path) -> None:
    path.write_text(json.dumps(tok.to_dict(), ensure_ascii=False))


def load_tokenizer(path: Path) -> ByteTokenizer | CharTokenizer:
    try:
        return tokenizer_from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise DynaformerError(f"tokenizer: cannot read {path}: {e}") from None
