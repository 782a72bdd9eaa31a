"""Span attention: causal attention in which query i of head h sees key j through the soft span mask of
adaptive span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers"):

    d = i − j ≥ 0,   m(d) = clamp((R + z − d) / R, 0, 1),   attention ∝ m(d)·exp(score) = exp(score + log m)

z is a span in tokens, per head (B|1, H, 1) or per query and head (B, H, Tq); R is the ramp width. A hard
window (`hard=True`) uses m(d) = [d ≤ z] and has no span gradient. Query i sits at key position i + o with
o = Tk − Tq (the queries are the last Tq keys, as with a KV cache).

This module holds the simple kernels, `span_attention`, which runs the kernel `plan()` (kernels/plan.py)
picks, and `band_flops`, which counts the work of that plan:
- `reference_span_attention`: dense scores + log m, O(Tq·Tk). For tests only.
- `masked_sdpa_span_attention`: SDPA with the log-mask as a float mask (short sequences, padded batches,
  CUDA); `decode_span_attention` for a handful of queries without grad (decoding).
- the CPU band kernel (kernels/band.py), dense causal SDPA for heads whose spans cover every key, and
  FlexAttention (kernels/flex.py, unverified, only on request).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._tiles import NEG_INF
from .attention import causal_attention, padding_bias
from .band import band_pairs, band_span_attention
from .flex import flex_span_attention
from .plan import plan


def span_log_mask(d: torch.Tensor, z: torch.Tensor, ramp: float, hard: bool) -> torch.Tensor:
    """log m(d) for distances d (broadcast against z); −inf for d < 0 (the future) and where m = 0.

    Differentiable in z; the gradient is finite everywhere (the −inf branch is cut by `where`)."""
    if hard:
        ok = (d >= 0) & (d <= z)
        return torch.zeros_like(ok, dtype=z.dtype).masked_fill(~ok, NEG_INF)
    m = (1.0 - (d - z).relu() / ramp).clamp_min(0.0)  # = clamp((R + z − d)/R, 0, 1)
    ok = (d >= 0) & (m > 0)
    return torch.where(ok, m.clamp_min(1e-30).log(), torch.full_like(m, NEG_INF))


def _distances(Tq: int, Tk: int, device) -> torch.Tensor:
    """(Tq, Tk) float distances d = (i + o) − j."""
    i = torch.arange(Tq, device=device, dtype=torch.float32)[:, None] + (Tk - Tq)
    return i - torch.arange(Tk, device=device, dtype=torch.float32)[None, :]


def reference_span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, ramp: float,
                             hard: bool = False, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Slow dense reference. q: (B, H, Tq, D); k, v: (B, H, Tk, D); z broadcastable to (B, H, Tq);
    key_padding_mask (B, Tk) bool, True = a real key (padded batches)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    bias = span_log_mask(_distances(Tq, Tk, q.device), z.unsqueeze(-1), ramp, hard)
    if key_padding_mask is not None:
        bias = bias + padding_bias(key_padding_mask, Tq, Tk, bias.dtype)
    return torch.softmax(scores + bias, dim=-1) @ v


def masked_sdpa_span_attention(q, k, v, z, ramp: float, hard: bool = False,
                               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with the span as a float mask: fine for short sequences and single decoding steps, and the
    path of padded batches (key_padding_mask (B, Tk) bool, True = a real key)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    bias = span_log_mask(_distances(Tq, Tk, q.device), z.unsqueeze(-1), ramp, hard)
    if key_padding_mask is not None:
        bias = bias + padding_bias(key_padding_mask, Tq, Tk, bias.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def decode_span_attention(q, k, v, z, ramp: float, hard: bool = False,
                          key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Few queries (decoding), no autograd: the span log-mask in a handful of small ops, then one fused SDPA
    call. Distances count back from the newest key: d = (i + Tk − Tq) − j."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    back = torch.arange(Tk - 1, -1, -1, device=q.device, dtype=torch.float32)  # (Tk,) distance from the last key
    if Tq > 1:
        back = back - torch.arange(Tq - 1, -1, -1, device=q.device, dtype=torch.float32)[:, None]  # (Tq, Tk)
    zz = z.float().unsqueeze(-1)  # (B|1, H, Tq|1, 1)
    if hard:
        bias = torch.sub(zz.floor() + 1, back).clamp_(0.0, 1.0).log_()
    else:
        bias = torch.sub((zz + ramp) / ramp, back.div_(ramp)).clamp_(0.0, 1.0).log_()
    if Tq > 1:
        bias = bias.masked_fill(back < 0, NEG_INF)  # the future
    if key_padding_mask is not None:
        bias = bias + padding_bias(key_padding_mask, Tq, Tk, bias.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def _split_heads(q, k, v, z, ramp: float, hard: bool, cover: torch.Tensor, chunk: int, native: bool) -> torch.Tensor:
    """Heads whose spans cover every key run as dense causal SDPA (their mask is identically 1: the fused
    kernel is exact and fastest); the others through the band kernel. A long head then costs what a dense
    head costs, and the short heads stay cheap."""
    dense_h, band_h = cover.nonzero().flatten(), (~cover).nonzero().flatten()
    y_dense = causal_attention(q[:, dense_h], k[:, dense_h], v[:, dense_h])
    y_band = band_span_attention(q[:, band_h], k[:, band_h], v[:, band_h], z[:, band_h], ramp, hard, chunk=chunk,
                                 native=native)
    return q.new_empty(q.shape).index_copy(1, dense_h, y_dense).index_copy(1, band_h, y_band)


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, ramp: float,
                   hard: bool = False, key_padding_mask: torch.Tensor | None = None, impl: str = "auto",
                   chunk: int = 64) -> torch.Tensor:
    """Causal span attention; q: (B, H, Tq, D), k, v: (B, H, Tk, D), z: (B|1, H, Tq|1) spans in tokens.

    key_padding_mask (B, Tk) bool, True = a real key: a padded batch. Padded keys are masked on top of the
    span; such calls take the masked SDPA (or, decoding, the decode) path whatever `impl` says (the reference
    stays the reference): O(Tq·Tk), but exact for any padding. impl: one of `SPAN_IMPLS` (kernels/plan.py
    says what auto picks)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    grad = torch.is_grad_enabled() and (q.requires_grad or z.requires_grad)
    p = plan(impl, z, Tq, Tk, device=q.device, dtype=q.dtype, grad=grad, padded=key_padding_mask is not None,
             chunk=chunk)
    if p.kernel == "decode":
        return decode_span_attention(q, k, v, z, ramp, hard, key_padding_mask)
    if p.kernel == "masked":
        return masked_sdpa_span_attention(q, k, v, z, ramp, hard, key_padding_mask)
    if p.kernel == "reference":
        return reference_span_attention(q, k, v, z, ramp, hard, key_padding_mask)
    if p.kernel == "dense":
        return causal_attention(q, k, v)
    if p.kernel == "split":
        return _split_heads(q, k, v, z, ramp, hard, p.cover, chunk, p.native)
    if p.kernel == "band":
        return band_span_attention(q, k, v, z, ramp, hard, chunk=chunk, native=p.native)
    if p.kernel == "flex":
        return flex_span_attention(q, k, v, z, ramp, hard)
    raise ValueError(f"plan() chose {p.kernel!r}, which the causal span attention does not run")


def band_flops(z: torch.Tensor, Tq: int, Tk: int, ramp: float, hard: bool, chunk: int = 64,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> tuple[int, int]:
    """(query·key pairs the kernel that runs computes, pairs dense causal attention computes) for z (B, H, Tq),
    as `span_attention(impl="auto")` runs it in training for queries of `dtype` on `device` (None: z's): the
    band kernel's windows (compiled or Python, as the plan says), the dense heads of a split, or every pair
    where a dense or masked kernel runs (on CUDA, for instance)."""
    B, H = z.shape[:2]
    per_head = B * (Tq * (Tk - Tq) + Tq * (Tq + 1) // 2)
    dense = H * per_head
    p = plan("auto", z, Tq, Tk, device=z.device if device is None else device, dtype=dtype, grad=True, chunk=chunk)
    if p.kernel == "split":
        band = band_pairs(z[:, ~p.cover], Tq, Tk, ramp, hard, p.native, chunk)
        return int(p.cover.sum()) * per_head + band, dense
    if p.kernel == "band":
        return band_pairs(z, Tq, Tk, ramp, hard, p.native, chunk), dense
    return dense, dense
