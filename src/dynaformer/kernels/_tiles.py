"""Pieces shared by the Python band kernels (band.py: causal, span_symmetric.py: encoder): sizes, dtype, the
ramp weights and the span gradient over a tile, padding, and gradient reduction to a broadcast shape."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")

# Scores of one batched problem stay below this many bytes: glibc serves allocations under its 32 MiB mmap
# threshold from the heap and reuses them, while larger ones are page-faulted in afresh at every call
# (measured: a fresh 46 MB buffer costs as much to fill as the GEMM that fills it).
SCORE_BYTES = 8 << 20

# Above this many bytes of score tiles in one call, the backward recomputes P instead of keeping it
# (P costs 4 bytes per computed pair for every layer until the backward; the recompute ≈ one more GEMM).
KEEP_BYTES = 256 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Band kernels compute in fp32 (or fp64 for fp64 inputs): bf16 GEMMs are slow on CPUs without bf16 units."""
    return dtype if dtype == torch.float64 else torch.float32


def round_up(x: torch.Tensor, m: int) -> torch.Tensor:
    return (x + (m - 1)) // m * m


def pad_rows(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x (..., T, D) with `pad` zero rows appended (no copy when there are none)."""
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def piece_size(piece) -> int:
    """Number of chunk problems in a piece of either band kernel (box: rows × chunks; gather: index pairs)."""
    if piece.kind == "box":
        r0, r1, a, b = piece.where
        return (r1 - r0) * (b - a)
    return int(piece.where[0].shape[0])


def ramp_weights(zs: torch.Tensor, d: torch.Tensor, ramp: float, hard: bool) -> torch.Tensor:
    """m = clamp((R + z − d)/R, 0, 1) for spans zs (n, C) and distances d (C, w) → (n, C, w). A hard window is
    the ramp with R = 1 on the floored span (the caller floors z): m ∈ {0, 1}."""
    r = 1.0 if hard else ramp
    return torch.sub(((zs + r) / r).unsqueeze(-1), d / r).clamp_(0.0, 1.0)


def span_grad(dS: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Σ_j dS_ij / m_ij over the ramp (0 < m_ij < 1) → (n, C). m ∈ [0, 1] is overwritten. Where m = 0, dS = 0
    (P = 0), so a tiny m stands in; where m = 1 the clamp has no gradient: the factor 1 − ⌊m⌋ drops it."""
    m.clamp_min_(1e-30)
    return dS.div(m).mul_(1.0 - m.floor()).sum(-1)


def sum_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Reduce a broadcast gradient back to `shape`."""
    dims = [i for i, (a, s) in enumerate(zip(g.shape, shape, strict=True)) if s == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


class Expand(torch.autograd.Function):
    """expand() whose backward sums over the broadcast dims (a Function, so that a band kernel sees a plain
    (B, H, T) tensor and its span gradient still lands on z's own shape)."""

    @staticmethod
    def forward(ctx, z, shape):
        ctx.shape = z.shape
        return z.expand(shape)

    @staticmethod
    def backward(ctx, g):
        return sum_to(g, ctx.shape), None
