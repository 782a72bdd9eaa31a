"""Which span-attention kernel runs for a call: the one place that decides (docs/design.md §4). The model
calls `span_attention` (kernels/span.py), which executes `plan()`; `band_flops` counts the work of the
same plan, so a FLOP count never disagrees with what runs.

Kernels: reference (dense scores + log-mask, tests only), decode (a handful of queries without autograd),
masked (SDPA with the log-mask as a float mask: short queries, padded batches, CUDA), dense (causal SDPA:
every span covers every key, so the mask is identically 1), band (the CPU band kernel, kernels/band.py),
split (dense SDPA for the heads whose spans cover everything, band for the rest), flex (FlexAttention on
CUDA; unverified, never chosen by auto: kernels/flex.py).
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch

from ..errors import DynaformerError
from .band import band_pairs

IMPLS = ("auto", "band", "masked", "dense", "flex", "reference")

# From one chunk of queries up, the band kernel beats the masked SDPA (measured at T = 128); decoding steps
# of at most this many queries without autograd take the decode path.
DECODE_QUERIES = 16


class SpanPlan(NamedTuple):
    kernel: str  # reference | decode | masked | dense | band | split | flex
    cover: torch.Tensor | None = None  # split: (H,) bool, the heads that run dense


def heads_covering(z: torch.Tensor, Tq: int, Tk: int) -> torch.Tensor:
    """(H,) bool: heads whose every query (in every batch row) sees all its causal keys with weight 1
    (z_i ≥ i + Tk − Tq)."""
    pos = torch.arange(Tq, device=z.device, dtype=z.dtype) + (Tk - Tq)
    return (z >= pos).all(-1).all(0)


def check_span_impl(impl: str, q: torch.Tensor) -> None:
    """Refuse a span kernel that cannot run on q's device (and, for FlexAttention on CPU, with autograd)."""
    if impl not in IMPLS:
        raise DynaformerError(f"model.span_impl: unknown kernel {impl!r}; choose one of {', '.join(IMPLS)}")
    if q.is_cuda and impl == "flex":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError as e:  # pragma: no cover
            raise DynaformerError("model.span: this torch has no FlexAttention for the CUDA span path; "
                                  "set model.span_impl=masked") from e
    if impl == "band" and q.is_cuda:
        raise DynaformerError("model.span_impl: 'band' is the CPU kernel; use auto, masked or flex on CUDA")
    if impl == "flex" and not q.is_cuda and torch.is_grad_enabled():
        raise DynaformerError("model.span_impl: FlexAttention has no backward on CPU; use auto or band")


def plan(impl: str, z: torch.Tensor, Tq: int, Tk: int, *, cuda: bool = False, grad: bool = False,
         padded: bool = False, chunk: int = 64) -> SpanPlan:
    """The kernel for queries (B, H, Tq) over Tk keys with spans z (B|1, H, Tq|1). grad: autograd will
    differentiate the call; padded: a key mask hides padding (only the reference, decode and masked
    kernels take one)."""
    few = Tq <= DECODE_QUERIES and not grad
    if padded:
        return SpanPlan("reference" if impl == "reference" else "decode" if few else "masked")
    if impl != "auto":
        return SpanPlan(impl)
    if few:
        return SpanPlan("decode")
    cover = heads_covering(z.detach(), Tq, Tk)
    if bool(cover.all()):
        return SpanPlan("dense")
    if cuda:
        return SpanPlan("masked")
    if bool(cover.any()) and Tq >= chunk and z.shape[1] > 1:
        return SpanPlan("split", cover)
    return SpanPlan("masked" if Tq < chunk else "band")


def band_flops(z: torch.Tensor, Tq: int, Tk: int, ramp: float, hard: bool, chunk: int = 64) -> tuple[int, int]:
    """(query·key pairs the CPU path computes, pairs dense causal attention computes) for z (B, H, Tq), as
    `span_attention(impl="auto")` runs it in training."""
    B, H = z.shape[:2]
    per_head = B * (Tq * (Tk - Tq) + Tq * (Tq + 1) // 2)
    dense = H * per_head
    p = plan("auto", z, Tq, Tk, grad=True, chunk=chunk)
    if p.kernel in ("dense", "masked"):
        return dense, dense
    if p.kernel == "split":
        return int(p.cover.sum()) * per_head + band_pairs(z[:, ~p.cover], Tq, Tk, ramp, hard, chunk), dense
    return band_pairs(z, Tq, Tk, ramp, hard, chunk), dense
