"""Byte-level BPE (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019), trained locally
with HF `tokenizers` (optional extra: `pip install 'dynaformer[hf]'`).

Byte-level means the base alphabet is the 256 byte values, so any text round-trips exactly and no
character is ever unknown. One special token, `<|endoftext|>` (id 0), separates documents.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..errors import DynaformerError

EOT = "<|endoftext|>"
MIN_VOCAB = 257  # 256 bytes + <|endoftext|>
MAX_VOCAB = 2**20


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DynaformerError("the BPE tokenizer needs the optional package 'tokenizers': "
                              "pip install 'dynaformer[hf]'") from None
    return tokenizers


class BPETokenizer:
    """A trained `tokenizers.Tokenizer` (JSON) behind the same interface as the byte and char tokenizers."""

    kind = "bpe"

    def __init__(self, spec: dict | str) -> None:
        tk = _tokenizers()
        text = spec if isinstance(spec, str) else json.dumps(spec, ensure_ascii=False)
        try:
            self.hf = tk.Tokenizer.from_str(text)
        except Exception as e:  # the Rust side raises plain Exceptions with a parse message
            raise DynaformerError(f"BPE tokenizer: not a valid tokenizers JSON ({str(e).splitlines()[0]})") from None
        self.spec = json.loads(text)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        self.eot_id = self.hf.token_to_id(EOT) if EOT in special else None
        self._special = special

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32
        return np.asarray(self.encode(text), dtype=dtype)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each token stands for (special tokens: 0, they are not text), for bits per byte."""
        byte_level = (self.spec.get("decoder") or {}).get("type") == "ByteLevel"
        out = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            tok = self.hf.id_to_token(i)
            if tok is None or tok in self._special:
                continue
            # Byte-level tokens spell one character per byte (a token may hold part of a UTF-8 character).
            out[i] = len(tok) if byte_level else len(self.hf.decode([i]).encode("utf-8"))
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "tokenizer": self.spec}


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> BPETokenizer:
    """Train byte-level BPE on `texts` (an iterable of documents) to at most `vocab_size` tokens."""
    if vocab_size < MIN_VOCAB:
        raise DynaformerError(f"tokenizer: --vocab must be ≥ {MIN_VOCAB} (256 bytes + {EOT}), got {vocab_size}")
    if vocab_size > MAX_VOCAB:  # the trainer sizes tables by it before it learns a single merge
        raise DynaformerError(f"tokenizer: --vocab must be ≤ {MAX_VOCAB:,} (larger than any byte-level BPE "
                              f"vocabulary in use), got {vocab_size:,}")
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOT],
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok.to_str())


def load_bpe_file(path: str | Path) -> BPETokenizer:
    """A tokenizer JSON written by `dynaformer data tokenizer` (or any byte-level `tokenizers` JSON)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise DynaformerError(f"tokenizer file '{p}': cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise DynaformerError(f"tokenizer file '{p}' is not UTF-8 text (a tokenizers JSON is)") from None
    try:
        spec = json.loads(text)
    except ValueError:
        raise DynaformerError(f"tokenizer file '{p}' is not JSON") from None
    if isinstance(spec, dict) and spec.get("kind") == "bpe" and "tokenizer" in spec:
        spec = spec["tokenizer"]  # a run folder's tokenizer.json
    if not isinstance(spec, dict) or "model" not in spec:
        raise DynaformerError(f"tokenizer file '{p}' is not a tokenizers JSON (write one with "
                              f"`dynaformer data tokenizer`)")
    return BPETokenizer(spec)
