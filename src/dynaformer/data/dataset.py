"""Token memmaps with a train/val split, a seeded stateful batch sampler, and fixed eval windows."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import DynaformerError
from ..files import sha256_file, write_json_atomic
from .tokenizers import ByteTokenizer, CharTokenizer


@dataclass
class TokenSplits:
    train: np.ndarray
    val: np.ndarray
    meta: dict


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 65536 else np.uint32)


def write_splits(text: str, tokenizer: ByteTokenizer | CharTokenizer, out_dir: Path, val_fraction: float,
                 source: str) -> TokenSplits:
    """Tokenize `text` into out_dir/{train,val}.bin (the last `val_fraction` is validation) and
    return memmaps. Files are written to temporary names and renamed, so a crash leaves no half file."""
    ids = tokenizer.encode_array(text).astype(_dtype_for(tokenizer.vocab_size), copy=False)
    n_val = int(round(len(ids) * val_fraction))
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"source": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "dtype": ids.dtype.name, "n_train": len(ids) - n_val, "n_val": n_val,
            "n_bytes": len(text.encode("utf-8")), "val_fraction": val_fraction}
    meta["vocab_size"] = tokenizer.vocab_size  # every token id is below it (checked on open)
    for name, arr in (("train", ids[: len(ids) - n_val]), ("val", ids[len(ids) - n_val:])):
        tmp = out_dir / f".{name}.bin.tmp"
        arr.tofile(tmp)
        meta[f"{name}_sha256"] = sha256_file(tmp)
        os.replace(tmp, out_dir / f"{name}.bin")
    write_json_atomic(out_dir / "meta.json", meta)
    return open_splits(out_dir, verify=False)  # just written and hashed


def open_splits(data_dir: Path, verify: bool = True) -> TokenSplits:
    """The token memmaps of a run; verify: check them against the checksums and token range in meta.json."""
    try:
        meta = json.loads((data_dir / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        train = np.memmap(data_dir / "train.bin", dtype=dtype, mode="r") if meta["n_train"] else np.zeros(0, dtype)
        val = np.memmap(data_dir / "val.bin", dtype=dtype, mode="r") if meta["n_val"] else np.zeros(0, dtype)
    except (OSError, KeyError, ValueError) as e:
        raise DynaformerError(f"data: token files in '{data_dir}' are missing or damaged ({e})") from None
    if len(train) != meta["n_train"] or len(val) != meta["n_val"]:
        raise DynaformerError(f"data: token files in '{data_dir}' do not match their meta.json")
    for name, arr in (("train", train), ("val", val)) if verify else ():  # runs written before checksums skip this
        want = meta.get(f"{name}_sha256")
        if want is not None and sha256_file(data_dir / f"{name}.bin") != want:
            raise DynaformerError(f"data: '{data_dir / f'{name}.bin'}' does not match the checksum in meta.json "
                                  f"(changed or damaged); its run cannot continue on it")
        if "vocab_size" in meta and len(arr) and int(arr.max()) >= meta["vocab_size"]:
            raise DynaformerError(f"data: '{data_dir / f'{name}.bin'}' holds token ids ≥ the vocabulary size "
                                  f"{meta['vocab_size']} (damaged)")
    return TokenSplits(train, val, meta)


def _windows(data: np.ndarray, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(length + 1)[None, :]
    block = torch.from_numpy(data[idx].astype(np.int64))  # (B, T+1)
    return block[:, :-1], block[:, 1:]


class BatchSampler:
    """Random windows of `context_len + 1` tokens. Step n's global batch (batch_size × world windows)
    is a pure function of (seed, n), and rank r takes its r-th slice: the sampler's whole state is
    its cursor n, which makes resume bit-exact, and a run on w ranks sees exactly the windows of a
    one-process run with a w-times larger batch."""

    def __init__(self, data: np.ndarray, batch_size: int, context_len: int, seed: int,
                 rank: int = 0, world: int = 1, cursor: int = 0) -> None:
        if len(data) < context_len + 2:
            raise DynaformerError(
                f"data: the training split has {len(data)} tokens, fewer than one window of "
                f"context_len + 1 = {context_len + 1}; use more text or a shorter context_len")
        self.data, self.batch_size, self.context_len = data, batch_size, context_len
        self.seed, self.rank, self.world, self.cursor = seed, rank, world, cursor

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.cursor])
        self.cursor += 1
        starts = rng.integers(0, len(self.data) - self.context_len, size=self.batch_size * self.world)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return _windows(self.data, mine, self.context_len)

    def loss_weights(self, y: torch.Tensor) -> torch.Tensor | None:
        """Per-target loss weights, or None for the plain mean over targets (always, for text)."""
        return None

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])


def eval_windows(data: np.ndarray, context_len: int, max_tokens: int) -> torch.Tensor:
    """A fixed validation budget: up to max_tokens / context_len windows, evenly spaced over `data`.
    Returns (N, context_len + 1) token ids; the same every call, so evaluations are comparable."""
    n_fit = (len(data) - 1) // context_len
    if n_fit < 1:
        raise DynaformerError(
            f"data: the validation split has {len(data)} tokens, fewer than one window of "
            f"context_len + 1 = {context_len + 1}; use more text, a larger val_fraction or a shorter context_len")
    n = max(1, min(n_fit, max_tokens // context_len))
    starts = np.linspace(0, len(data) - context_len - 1, n).astype(np.int64)
    x, y = _windows(data, starts, context_len)
    return torch.cat([x, y[:, -1:]], dim=1)


class StagedSampler:
    """Staged context (Press et al. 2021, "Shortformer: Better Language Modeling using Shorter Inputs"):
    the first `short_batches` batches come from `short` (rows of fewer tokens, more of them), the rest from
    `full`. Both are stateless given their cursor, and each is moved to the global cursor before it draws, so
    the state is one number (bit-exact resume) and the two stages never replay each other's draws."""

    def __init__(self, short, full, short_batches: int) -> None:
        self.short, self.full, self.short_batches, self.cursor = short, full, short_batches, 0
        self.length = full.length if hasattr(full, "length") else full.context_len
        self._last = full

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.short if self.cursor < self.short_batches else self.full
        s.cursor = self.cursor
        if getattr(s, "text_sampler", None) is not None:
            s.text_sampler.cursor = self.cursor
        self._last = s
        self.cursor += 1
        return s.next()

    def loss_weights(self, y: torch.Tensor) -> torch.Tensor | None:
        return self._last.loss_weights(y)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor, "staged": self.short_batches}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
