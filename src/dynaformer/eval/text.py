"""Held-out text: bits per byte overall and by token position (log₂ buckets), at the training
context and at 2× / 4× it (length extrapolation), so "long text" is measured where it matters.

Each length is scored two ways, because models are used two ways on text longer than they were
trained on: **one pass** over the whole sequence (what a span model, or a model that extrapolates,
does), and a **sliding window** of the training context with stride half of it (how a dense model is
run on long text: every token after the first window is predicted from at least context/2 tokens of
history, none beyond the context it was trained on). When the sequence fits the context both are
the same single pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import eval_windows


def position_buckets(T: int) -> list[tuple[int, int]]:
    """[lo, hi) position ranges: [0,1), [1,2), [2,4), [4,8), … up to T (0 = the first predicted token)."""
    edges = [0, 1] + [2**k for k in range(1, max(1, math.ceil(math.log2(T))) + 1)]
    edges = sorted({min(e, T) for e in edges})
    return [(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


@torch.no_grad()
def position_losses(model: torch.nn.Module, windows: torch.Tensor, batch_size: int,
                    token_bytes: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """windows (N, T+1) → summed nats (T,) and summed bytes (T,) per position over the windows."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    T = windows.shape[1] - 1
    nats, nbytes = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for i in range(0, len(windows), batch_size):
        block = windows[i : i + batch_size].to(device)
        x, y = block[:, :-1], block[:, 1:]
        logits, _ = model(x)
        nats += F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").sum(0).double().cpu()
        yb = token_bytes[y.cpu()] if token_bytes is not None else torch.ones_like(y.cpu())
        nbytes += yb.sum(0).double()
    model.train(was)
    return nats.numpy(), nbytes.numpy()


@torch.no_grad()
def sliding_position_losses(model: torch.nn.Module, windows: torch.Tensor, context_len: int, batch_size: int,
                            token_bytes: torch.Tensor | None,
                            stride: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Like `position_losses`, but each length-T window is read through model windows of `context_len`
    tokens moved by `stride` (default context_len // 2): the first scores its every position, each
    later one only the positions past the previous one's end (the last is aligned to end at T)."""
    T = windows.shape[1] - 1
    C = min(context_len, T)
    stride = max(1, stride or C // 2)
    starts = list(range(0, T - C + 1, stride))
    if starts[-1] != T - C:
        starts.append(T - C)
    nats, nbytes = np.zeros(T), np.zeros(T)
    scored = 0  # positions [0, scored) are done
    for s in starts:
        sub = windows[:, s : s + C + 1]
        n, b = position_losses(model, sub, batch_size, token_bytes)  # (C,) over positions s .. s + C − 1
        first = scored - s  # skip what earlier windows scored
        nats[scored : s + C], nbytes[scored : s + C] = n[first:], b[first:]
        scored = s + C
    return nats, nbytes


def _summary(nats: np.ndarray, nbytes: np.ndarray, n_windows: int) -> dict:
    T = len(nats)
    buckets = [{"lo": lo, "hi": hi, "bpb": float(nats[lo:hi].sum() / math.log(2) / nbytes[lo:hi].sum()),
                "loss": float(nats[lo:hi].sum() / (n_windows * (hi - lo)))} for lo, hi in position_buckets(T)]
    return {"loss": float(nats.sum() / (n_windows * T)), "bpb": float(nats.sum() / math.log(2) / nbytes.sum()),
            "buckets": buckets}


def evaluate_text(model: torch.nn.Module, data: np.ndarray, context_len: int, max_tokens: int = 65536,
                  multiples: Sequence[int] = (1, 2, 4), batch_size: int = 8,
                  token_bytes: torch.Tensor | None = None) -> dict:
    """{"contexts": [{"multiple", "context", "loss", "bpb", "windows", "buckets": [{"lo","hi","bpb"}],
    "sliding": {"loss", "bpb", "buckets", "stride"}}], "skipped": [reason, ...]}: one pass (top level) and
    a sliding window of `context_len` (stride context_len/2) over the same windows; a multiple is skipped
    when the text is too short for one window."""
    out: dict = {"contexts": [], "skipped": []}
    for m in multiples:
        T = m * context_len
        if len(data) < T + 2:
            out["skipped"].append(f"{m}x context ({T} tokens): held-out text has only {len(data)} tokens")
            continue
        windows = eval_windows(np.asarray(data), T, max_tokens)
        one = _summary(*position_losses(model, windows, max(1, batch_size // m), token_bytes), len(windows))
        slide = one if m == 1 else _summary(*sliding_position_losses(model, windows, context_len, batch_size,
                                                                     token_bytes), len(windows))
        out["contexts"].append({"multiple": m, "context": T, "windows": len(windows), **one,
                                "sliding": {**slide, "stride": max(1, context_len // 2)}})
    return out
