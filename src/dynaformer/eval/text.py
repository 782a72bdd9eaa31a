"""Held-out text: bits per byte overall and by token position (log₂ buckets), at the training
context and at 2× / 4× it (length extrapolation), so "long text" is measured where it matters."""

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


def evaluate_text(model: torch.nn.Module, data: np.ndarray, context_len: int, max_tokens: int = 65536,
                  multiples: Sequence[int] = (1, 2, 4), batch_size: int = 8,
                  token_bytes: torch.Tensor | None = None) -> dict:
    """{"contexts": [{"multiple", "context", "loss", "bpb", "windows", "buckets": [{"lo","hi","bpb"}]}],
    "skipped": [reason, ...]} — a multiple is skipped when the text is too short for one window."""
    out: dict = {"contexts": [], "skipped": []}
    for m in multiples:
        T = m * context_len
        if len(data) < T + 2:
            out["skipped"].append(f"{m}x context ({T} tokens): held-out text has only {len(data)} tokens")
            continue
        windows = eval_windows(np.asarray(data), T, max_tokens)
        nats, nbytes = position_losses(model, windows, max(1, batch_size // m), token_bytes)
        buckets = [{"lo": lo, "hi": hi, "bpb": float(nats[lo:hi].sum() / math.log(2) / nbytes[lo:hi].sum()),
                    "loss": float(nats[lo:hi].sum() / (len(windows) * (hi - lo)))} for lo, hi in position_buckets(T)]
        out["contexts"].append({"multiple": m, "context": T, "windows": len(windows),
                                "loss": float(nats.sum() / (len(windows) * T)),
                                "bpb": float(nats.sum() / math.log(2) / nbytes.sum()), "buckets": buckets})
    return out
