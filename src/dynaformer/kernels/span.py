"""Span attention: causal attention in which query i of head h sees key j through the soft span mask of
adaptive span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers"):

    d = i − j ≥ 0,   m(d) = clamp((R + z − d) / R, 0, 1),   attention ∝ m(d)·exp(score) = exp(score + log m)

z is a span in tokens, per head (B|1, H, 1) or per query and head (B, H, Tq); R is the ramp width. A hard
window (`hard=True`) uses m(d) = [d ≤ z] and has no span gradient. Query i sits at key position i + o with
o = Tk − Tq (the queries are the last Tq keys, as with a KV cache).

Implementations (`span_attention` picks one):
- `reference_span_attention`: dense scores + log m, O(Tq·Tk). For tests only.
- `band_span_attention`: the CPU fast path. Queries are cut into chunks of C; for each (batch, head,
  chunk) only the keys inside that chunk's largest reach *for that head* are touched: a window of E + C keys
  (E before the chunk, rounded up to 32, plus the chunk's own keys). Problems with the same E are batched
  and run as explicit score tiles: S = Q·Kᵀ over the windows in one batched GEMM, the ramp applied only to
  the window's leading columns, the causal cut only to its last C, softmax in place, O = P·V. The
  backward keeps P and costs four batched GEMMs; the span gradient needs only the ramp columns:
      ∂L/∂z_i = Σ_j dS_ij / (R m_ij) over 0 < m_ij < 1,   dS = P ⊙ (dO·Vᵀ − δ),   δ_i = dO_i·O_i.
  Tiles are cut to ≤ 8 MB of scores so their buffers are reused from the heap. Memory: P costs 4 bytes
  per computed query-key pair, held until the backward; a call above 256 MiB of tiles keeps only each
  row's log-sum-exp instead and the backward recomputes P (≈ 9% slower).
- `flex_span_attention` (GPU): FlexAttention with a block mask from kv-tile indices and the ramp in
  score_mod. UNVERIFIED: written without a GPU; guarded to CUDA.
- `masked_sdpa_span_attention`: SDPA with the log-mask as a float mask, for fewer queries than a chunk;
  `decode_span_attention` for a handful of queries without grad (decoding).
- dense causal SDPA for the heads whose every query's span covers all its keys (their mask is identically
  1); the band kernel takes the other heads.
"""

from __future__ import annotations

import importlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import DynaformerError
from .attention import padding_bias

NEG_INF = float("-inf")


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
                             hard: bool = False, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Slow dense reference. q: (B, H, Tq, D); k, v: (B, H, Tk, D); z broadcastable to (B, H, Tq);
    key_mask (B, Tk) bool, True = a real key (padded batches)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    bias = span_log_mask(_distances(Tq, Tk, q.device), z.unsqueeze(-1), ramp, hard)
    if key_mask is not None:
        bias = bias + padding_bias(key_mask, Tq, Tk, bias.dtype)
    return torch.softmax(scores + bias, dim=-1) @ v


def masked_sdpa_span_attention(q, k, v, z, ramp: float, hard: bool = False,
                               key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA with the span as a float mask: fine for short sequences and single decoding steps, and the
    path of padded batches (key_mask (B, Tk) bool, True = a real key)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    bias = span_log_mask(_distances(Tq, Tk, q.device), z.unsqueeze(-1), ramp, hard)
    if key_mask is not None:
        bias = bias + padding_bias(key_mask, Tq, Tk, bias.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def decode_span_attention(q, k, v, z, ramp: float, hard: bool = False,
                          key_mask: torch.Tensor | None = None) -> torch.Tensor:
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
    if key_mask is not None:
        bias = bias + padding_bias(key_mask, Tq, Tk, bias.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))


def span_covers_all(z: torch.Tensor, Tq: int, Tk: int) -> bool:
    """True when every query sees all its causal keys with weight 1 (z_i ≥ i + o): the mask is a no-op."""
    return bool(heads_covering(z, Tq, Tk).all())


def heads_covering(z: torch.Tensor, Tq: int, Tk: int) -> torch.Tensor:
    """(H,) bool: heads whose every query (in every batch row) sees all its causal keys with weight 1."""
    pos = torch.arange(Tq, device=z.device, dtype=z.dtype) + (Tk - Tq)
    return (z >= pos).all(-1).all(0)


# ----------------------------------------------------------------------------------------------------
# CPU band kernel
# ----------------------------------------------------------------------------------------------------

def _round_up(x: torch.Tensor, m: int) -> torch.Tensor:
    return (x + (m - 1)) // m * m


def band_plan(z: torch.Tensor, Tq: int, Tk: int, ramp: float, hard: bool, chunk: int, box_waste: float = 0.15,
              gran: int = 32):
    """Which keys each (row = batch·head, query chunk) problem needs, and how problems are batched.

    z: (B, H, Tq) detached. Query chunk c holds queries at key positions o + cC .. o + cC + C − 1. E (clipped
    at the sequence start) is how far before the chunk its keys reach: keys with m > 0 for some
    query of the chunk; it is rounded up to `gran` keys. Problems are batched into
    - boxes (r0, r1, cs, E, ...): rows r0..r1-1, chunks cs.. — one zero-copy strided window view per part;
      a row goes into a box when its chunks' E vary little (wasted key tiles ≤ `box_waste` of its work),
    - gathers (idx, E, ...): any other problems with equal E, gathered by index.
    Wr = leading window columns that carry the ramp / cut; ramp_in_diag: some z_i < i (the ramp reaches the
    chunk's own keys). Returns (sets, E (BH, nC))."""
    B, H, _ = z.shape
    C, BH, o = chunk, B * H, Tk - Tq
    nC = -(-Tq // C)
    zp = F.pad(z.reshape(BH, Tq), (0, nC * C - Tq), value=0.0).view(BH, nC, C)
    if hard:
        zp = zp.floor()
    i = torch.arange(C, device=z.device, dtype=z.dtype)
    reach = (zp + 1) if hard else torch.ceil(zp + ramp)  # keys with m > 0, counting the query itself
    E = _round_up((reach - 1 - i).amax(-1).clamp_min(0).long(), gran)  # (BH, nC)
    c0 = o + torch.arange(nC, device=z.device) * C
    Ecl = torch.minimum(E, c0.expand_as(E))
    in_diag = (zp - i).amin(-1) < 0  # (BH, nC): the ramp or cut reaches into the chunk's own keys

    def wr_of(Ev: torch.Tensor, zs: torch.Tensor) -> torch.Tensor:
        # window columns j ≤ i + E − z_i (d ≥ z_i), counted from the window start
        return (i + Ev.unsqueeze(-1).to(z.dtype) - zs).floor().add(1).amax(-1).clamp_min(0).long()

    sets = []
    assigned = torch.zeros(BH, nC, dtype=torch.bool, device=z.device)
    Er = E.amax(1)  # (BH,)
    cs = torch.clamp(-((o - Er) // C), min=0)  # first chunk whose window fits: o + cC ≥ Er
    chunk_idx = torch.arange(nC, device=z.device)
    regular = chunk_idx[None, :] >= cs[:, None]
    work = ((Er[:, None] + C) * regular).sum(1).clamp_min(1)
    waste = ((Er[:, None] - E) * regular).sum(1) / work
    ok = (cs < nC) & (waste <= box_waste)
    rows = []
    for r, (er, c, good) in enumerate(zip(Er.tolist(), cs.tolist(), ok.tolist(), strict=True)):
        if not good:
            continue
        if rows and rows[-1][1] == r and rows[-1][2:] == [c, er]:
            rows[-1][1] = r + 1
        else:
            rows.append([r, r + 1, c, er])
    for r0, r1, c, er in rows:
        assigned[r0:r1, c:] = True
        Ev = torch.full((r1 - r0, nC - c), er, device=z.device)
        wr = int(wr_of(Ev, zp[r0:r1, c:]).max().clamp_max(er)) if er > 0 else 0
        zb = zp[r0:r1, c:]
        const = bool((zb.amax((1, 2)) == zb.amin((1, 2))).all())  # per-head spans: one mask per row
        sets.append(("box", (r0, r1, c), er, wr, bool(in_diag[r0:r1, c:].any()), const))
    for e in torch.unique(Ecl[~assigned]).tolist():
        idx = ((Ecl == e) & ~assigned).nonzero()  # (n, 2) rows (r, c)
        Ev = Ecl[idx[:, 0], idx[:, 1]]
        wr = int(torch.minimum(wr_of(Ev, zp[idx[:, 0], idx[:, 1]]), Ev).max())
        sets.append(("gather", idx, int(e), wr, bool(in_diag[idx[:, 0], idx[:, 1]].any()), False))
    return sets, Ecl


# Scores of one batched problem stay below this many bytes: glibc serves allocations under its 32 MiB mmap
# threshold from the heap and reuses them, while larger ones are page-faulted in afresh at every call
# (measured here: a fresh 46 MB buffer costs as much to fill as the GEMM that fills it).
_SCORE_BYTES = 8 << 20


class _Piece(NamedTuple):
    """One batched problem: n query chunks of C queries and their key windows of W = E + C keys.

    Window column j of chunk problem p is key (chunk start − E + j): columns [0, Wr) carry the ramp (or the
    hard cut), [Wr, E) are inside every query's span, [E, E + C) are the chunk's own keys (causal)."""
    kind: str  # "box": rows r0..r1, chunks a..b, windows are strided views; "gather": (row, chunk) pairs
    where: tuple  # box: (r0, r1, a, b); gather: (rows, chunks) index tensors
    E: int
    Wr: int
    in_diag: bool  # the ramp reaches into the chunk's own keys for some query
    const: bool  # one span for every query of the piece (per-head spans)


def _pieces(sets, nC: int, C: int) -> list[_Piece]:
    """Cut the plan's sets into problems whose score matrices stay under _SCORE_BYTES."""
    out = []
    for kind, where, E, Wr, in_diag, const in sets:
        per_chunk = C * (E + C) * 4
        if kind == "box":
            r0, r1, cs = where
            per_row = (nC - cs) * per_chunk
            if per_row >= _SCORE_BYTES:  # one row, a run of chunks at a time
                step = max(1, _SCORE_BYTES // per_chunk)
                for r in range(r0, r1):
                    for a in range(cs, nC, step):
                        out.append(_Piece("box", (r, r + 1, a, min(nC, a + step)), E, Wr, in_diag, const))
            else:  # several rows at a time
                step = max(1, _SCORE_BYTES // per_row)
                for r in range(r0, r1, step):
                    out.append(_Piece("box", (r, min(r1, r + step), cs, nC), E, Wr, in_diag, const))
        else:
            step = max(1, _SCORE_BYTES // per_chunk)
            for s in range(0, where.shape[0], step):
                idx = where[s:s + step]
                out.append(_Piece("gather", (idx[:, 0], idx[:, 1]), E, Wr, in_diag, const))
    return out


def _ramp(zs: torch.Tensor, d: torch.Tensor, ramp: float, hard: bool) -> torch.Tensor:
    """m = clamp((R + z − d)/R, 0, 1) for spans zs (n, C) and distances d (C, w) → (n, C, w). A hard window is
    the ramp with R = 1 on the floored span (the caller floors z): m ∈ {0, 1}."""
    r = 1.0 if hard else ramp
    return torch.sub(((zs + r) / r).unsqueeze(-1), d / r).clamp_(0.0, 1.0)


class _BandSpanAttention(torch.autograd.Function):
    """Tiled band attention with explicit score tiles: per piece, S = Q·Kᵀ over the key windows (one batched
    GEMM), the causal cut added to the diagonal columns, softmax in place with the ramp multiplied into the
    ramp (and, where it reaches them, diagonal) columns after the exp, O = P·V.
    P is kept for the backward, which is four batched GEMMs plus the span gradient over the ramp columns —
    or, when the score tiles of one call would exceed _KEEP_BYTES (or keep_scores is False), only each
    row's log-sum-exp, and the backward recomputes P with one more GEMM per tile."""

    @staticmethod
    def forward(ctx, q, k, v, z, ramp: float, hard: bool, chunk: int, box_waste: float, keep_scores: bool | None):
        B, H, Tq, D = q.shape
        Tk = k.shape[-2]
        C, BH, o = chunk, B * H, Tk - Tq
        nC = -(-Tq // C)
        pad = nC * C - Tq
        Tkp = Tk + pad
        scale = 1.0 / math.sqrt(D)
        f32 = compute_dtype(q.dtype)
        zd = z.detach().to(f32)
        sets, _ = band_plan(zd, Tq, Tk, ramp, hard, C, box_waste)
        qc = (_pad_rows(q.to(f32), pad) * scale).reshape(BH, nC, C, D)  # scaled queries
        kp = _pad_rows(k.to(f32), pad).reshape(BH, Tkp, D)
        vp = _pad_rows(v.to(f32), pad).reshape(BH, Tkp, D)
        zc = F.pad(zd.reshape(BH, Tq), (0, pad), value=0.0).view(BH, nC, C)
        if hard:
            zc = zc.floor()
        out = torch.empty(BH, nC, C, D, dtype=f32, device=q.device)
        ci = torch.arange(C, device=q.device, dtype=f32)
        future = torch.zeros(C, C, dtype=f32, device=q.device).masked_fill_(  # causal cut, additive
            torch.ones(C, C, dtype=torch.bool, device=q.device).triu_(1), NEG_INF)
        pieces = _pieces(sets, nC, C)
        if keep_scores is None:
            keep_scores = sum(_piece_size(pc) * C * (pc.E + C) for pc in pieces) * 4 <= _KEEP_BYTES
        saved = []
        for pc in pieces:
            Q, K, V, zs = _gather(pc, qc, kp, vp, zc, o, C, Tkp, D)
            m_r, m_d = _piece_ramps(pc, zs, ci, ramp, hard)
            S = torch.bmm(Q, K.transpose(1, 2))  # (n, C, W)
            lse = _span_softmax_(S, pc.E, m_r, m_d, future, visible_max=False)
            if lse is None:
                S = torch.bmm(Q, K.transpose(1, 2))  # rare: redo with the max over visible keys only
                lse = _span_softmax_(S, pc.E, m_r, m_d, future, visible_max=True)
            _bmm_into(pc, out, S, V)
            saved.append((pc, K, V, S, None) if keep_scores else (pc, K, V, None, lse))
        ctx.saved, ctx.future = saved, future
        ctx.save_for_backward(qc, kp, vp, zc, out)
        ctx.meta = (B, H, Tq, Tk, D, C, nC, pad, ramp, hard, scale)
        ctx.z_shape = z.shape
        return out.view(B, H, nC * C, D)[:, :, :Tq].to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        B, H, Tq, Tk, D, C, nC, pad, ramp, hard, scale = ctx.meta
        qc, kp, vp, zc, out = ctx.saved_tensors
        BH, o, Tkp = B * H, Tk - Tq, Tk + pad
        f32 = compute_dtype(dout.dtype)
        doc = _pad_rows(dout.to(f32), pad).reshape(BH, nC, C, D)
        delta = (doc * out).sum(-1)  # (BH, nC, C): dO_i·O_i
        dq = torch.empty(BH, nC, C, D, dtype=f32, device=dout.device)
        dk = torch.zeros(BH, Tkp + C, D, dtype=f32, device=dout.device)  # + C: the fold's last tile may overhang
        dv = torch.zeros(BH, Tkp + C, D, dtype=f32, device=dout.device)
        want_z = ctx.needs_input_grad[3] and not hard
        dz = torch.zeros(BH, nC, C, dtype=f32, device=dout.device) if want_z else None
        ci = torch.arange(C, device=dout.device, dtype=f32)
        for pc, K, V, P, lse in ctx.saved:
            E, Wr = pc.E, pc.Wr
            Q, dO, dl, zs = _gather_q(pc, qc, doc, delta, zc)
            if P is None:  # only the log-sum-exp was kept: P = m·exp(S − lse)
                P = _recompute_p(torch.bmm(Q, K.transpose(1, 2)), lse, E, *_piece_ramps(pc, zs, ci, ramp, hard),
                                 ctx.future)
            dS = torch.bmm(dO, V.transpose(1, 2)).sub_(dl.unsqueeze(-1)).mul_(P)  # ∂L/∂S = P ⊙ (dO·Vᵀ − δ)
            if want_z:
                # ∂L/∂z_i = Σ_j ∂L/∂S_ij · ∂log m_ij/∂z_i = Σ_j dS_ij / (R m_ij) over the ramp (0 < m < 1)
                g = None
                if Wr > 0:
                    d_r = ci[:, None] + E - torch.arange(Wr, device=dout.device, dtype=f32)[None, :]
                    g = _span_grad(dS[..., :Wr], _ramp(zs[:1] if pc.const else zs, d_r, ramp, False))
                if pc.in_diag:
                    gd = _span_grad(dS[..., E:], _ramp(zs, ci[:, None] - ci[None, :], ramp, False))
                    g = gd if g is None else g.add_(gd)
                if g is not None:
                    _scatter(pc, dz, g.div_(ramp))
            _bmm_into(pc, dq, dS, K)
            dK = torch.bmm(dS.transpose(1, 2), Q)  # (n, W, D)
            dV = torch.bmm(P.transpose(1, 2), dO)
            _fold(pc, dk, dK, o, C, Tkp, D)
            _fold(pc, dv, dV, o, C, Tkp, D)
        ctx.saved = None
        dq = dq.mul_(scale).view(B, H, nC * C, D)[:, :, :Tq]
        dk = dk[:, :Tk].reshape(B, H, Tk, D)
        dv = dv[:, :Tk].reshape(B, H, Tk, D)
        if dz is not None:
            dz = _sum_to(dz.view(B, H, nC * C)[:, :, :Tq], ctx.z_shape)
        return dq.to(dout.dtype), dk.to(dout.dtype), dv.to(dout.dtype), dz, None, None, None, None, None


# Above this many bytes of score tiles in one call, the backward recomputes P instead of keeping it
# (P costs 4 bytes per computed pair for every layer until the backward; the recompute ≈ one more GEMM).
_KEEP_BYTES = 256 << 20


def _piece_size(pc) -> int:
    """Number of chunk problems in a piece (box: rows × chunks; gather: index pairs) — of either band kernel."""
    if pc.kind == "box":
        r0, r1, a, b = pc.where
        return (r1 - r0) * (b - a)
    return int(pc.where[0].shape[0])


def _piece_ramps(pc: _Piece, zs: torch.Tensor, ci: torch.Tensor, ramp: float, hard: bool):
    """(m over the ramp columns, m over the diagonal columns), each None where the piece needs none."""
    m_r = m_d = None
    if pc.Wr > 0:
        d_r = ci[:, None] + pc.E - torch.arange(pc.Wr, device=zs.device, dtype=zs.dtype)[None, :]
        m_r = _ramp(zs[:1] if pc.const else zs, d_r, ramp, hard)
    if pc.in_diag:
        m_d = _ramp(zs, ci[:, None] - ci[None, :], ramp, hard)
    return m_r, m_d


def _recompute_p(S: torch.Tensor, lse: torch.Tensor, E: int, m_r, m_d, future: torch.Tensor) -> torch.Tensor:
    """P = m·exp(S − lse) in place, from the raw scores S (n, C, W) and the kept lse (n, C, 1). Out-of-span
    entries (m = 0) may have any score: the exponent is capped so that their exp stays finite before m
    zeroes it (a visible entry never comes near the cap: m·exp(S − lse) ≤ 1)."""
    S[..., E:].add_(future)
    S.sub_(lse).clamp_(max=80.0).exp_()
    if m_r is not None:
        S[..., : m_r.shape[-1]].mul_(m_r)
    if m_d is not None:
        S[..., E:].mul_(m_d)
    return S


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Band kernels compute in fp32 (or fp64 for fp64 inputs): bf16 GEMMs are slow on CPUs without bf16 units."""
    return dtype if dtype == torch.float64 else torch.float32


def _pad_rows(x: torch.Tensor, pad: int) -> torch.Tensor:
    """x (..., T, D) with `pad` zero rows appended (no copy when there are none)."""
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _span_softmax_(S: torch.Tensor, E: int, m_r: torch.Tensor | None, m_d: torch.Tensor | None,
                   future: torch.Tensor, visible_max: bool) -> torch.Tensor | None:
    """S (n, C, W) ← softmax(S + log m) in place, as m·exp(S − max) / Σ (no log pass; m multiplies the ramp
    columns [0, Wr) and, when given, the diagonal columns [E, E + C), which also get the causal cut).

    The row max is taken over all columns, visible or not: exp never overflows, and m = 0 zeroes the
    invisible keys. Only if an invisible key outscores every visible one by ~87 nats can the visible terms
    underflow; that is detected (None is returned, S is spoiled) and the caller redoes the piece with
    `visible_max`, which sets the invisible scores to −inf before the max. Returns each row's log-sum-exp
    (n, C, 1): P = m·exp(S − lse)."""
    Wr = 0 if m_r is None else m_r.shape[-1]
    ramp_cols, diag = S[..., :Wr], S[..., E:]
    diag.add_(future)  # (an add with a −inf matrix runs several times faster than masked_fill_ here)
    if visible_max:
        if m_r is not None:
            ramp_cols.masked_fill_(m_r == 0, NEG_INF)
        if m_d is not None:
            diag.masked_fill_(m_d == 0, NEG_INF)
    mx = S.amax(-1, keepdim=True)
    S.sub_(mx).exp_()
    if m_r is not None:
        ramp_cols.mul_(m_r)
    if m_d is not None:
        diag.mul_(m_d)
    total = S.sum(-1, keepdim=True)
    if not visible_max and bool((total < 1e-30).any()):
        return None
    S.div_(total)
    return total.log_().add_(mx)


def _span_grad(dS: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Σ_j dS_ij / m_ij over the ramp (0 < m_ij < 1) → (n, C). m ∈ [0, 1] is overwritten. Where m = 0, dS = 0
    (P = 0), so a tiny m stands in; where m = 1 the clamp has no gradient: the factor 1 − ⌊m⌋ drops it."""
    m.clamp_min_(1e-30)
    return dS.div(m).mul_(1.0 - m.floor()).sum(-1)


def _window_starts(pc: _Piece, o: int, C: int, Tkp: int) -> torch.Tensor:
    """Flat key row (row·Tkp + position) of each gathered chunk's first window key."""
    rr, cc = pc.where
    return rr * Tkp + o + cc * C - pc.E


def _gather(pc: _Piece, qc, kp, vp, zc, o: int, C: int, Tkp: int, D: int):
    """(Q (n, C, D), K (n, W, D), V (n, W, D), z (n, C)) of a piece: strided views where possible."""
    W = pc.E + C
    if pc.kind == "box":
        r0, r1, a, b = pc.where
        nr, nc = r1 - r0, b - a

        def window(x):  # keys o + cC − E .. + W for chunks a..b-1 of rows r0..r1-1: overlapping, no copy
            return x.as_strided((nr, nc, W, D), (Tkp * D, C * D, D, 1),
                                x.storage_offset() + (r0 * Tkp + o + a * C - pc.E) * D).reshape(nr * nc, W, D)

        return (qc[r0:r1, a:b].reshape(nr * nc, C, D), window(kp), window(vp), zc[r0:r1, a:b].reshape(nr * nc, C))
    rr, cc = pc.where
    rows = _window_starts(pc, o, C, Tkp)[:, None] + torch.arange(W, device=kp.device)
    return qc[rr, cc], kp.reshape(-1, D)[rows], vp.reshape(-1, D)[rows], zc[rr, cc]


def _gather_q(pc: _Piece, qc, doc, delta, zc):
    """Query-side tensors of a piece for the backward: Q, dO, δ, z."""
    if pc.kind == "box":
        r0, r1, a, b = pc.where
        n = (r1 - r0) * (b - a)
        C, D = qc.shape[-2:]
        return (qc[r0:r1, a:b].reshape(n, C, D), doc[r0:r1, a:b].reshape(n, C, D),
                delta[r0:r1, a:b].reshape(n, C), zc[r0:r1, a:b].reshape(n, C))
    rr, cc = pc.where
    return qc[rr, cc], doc[rr, cc], delta[rr, cc], zc[rr, cc]


def _scatter(pc: _Piece, dst: torch.Tensor, x: torch.Tensor) -> None:
    """Write per-chunk results x (n, C, ...) into dst (BH, nC, C, ...)."""
    if pc.kind == "box":
        r0, r1, a, b = pc.where
        dst[r0:r1, a:b] = x.view(r1 - r0, b - a, *x.shape[1:])
    else:
        dst[pc.where] = x


def _bmm_into(pc: _Piece, dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """dst[piece] = a @ b, written in place when the piece's slice of dst (BH, nC, C, D) is contiguous."""
    if pc.kind == "box":
        r0, r1, c0, c1 = pc.where
        view = dst[r0:r1, c0:c1]
        if view.is_contiguous():
            torch.bmm(a, b, out=view.view(-1, *dst.shape[2:]))
            return
    _scatter(pc, dst, torch.bmm(a, b))


def _fold(pc: _Piece, dst: torch.Tensor, g: torch.Tensor, o: int, C: int, Tkp: int, D: int) -> None:
    """Add window gradients g (n, W, D) back onto the keys dst (BH, Tkp + C, D)."""
    W = g.shape[1]
    if pc.kind == "box":
        r0, r1, a, b = pc.where
        nr, nc = r1 - r0, b - a
        g = g.view(nr, nc, W, D)
        for u in range(0, W, C):  # the windows overlap: fold them back one key tile at a time
            p0, w = o + a * C - pc.E + u, min(C, W - u)
            dst[r0:r1, p0:p0 + nc * C].view(nr, nc, C, D)[:, :, :w].add_(g[:, :, u:u + w])
    else:
        rows = _window_starts(pc, o, C, Tkp + C)[:, None] + torch.arange(W, device=dst.device)
        dst.view(-1, D).index_add_(0, rows.reshape(-1), g.reshape(-1, D))


def _sum_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Reduce a broadcast gradient back to `shape`."""
    dims = [i for i, (a, s) in enumerate(zip(g.shape, shape, strict=True)) if s == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


def band_span_attention(q, k, v, z, ramp: float, hard: bool = False, chunk: int = 64, box_waste: float = 0.15,
                        keep_scores: bool | None = None):
    """CPU band kernel (see module doc). q: (B, H, Tq, D); k, v: (B, H, Tk, D); z broadcastable to (B, H, Tq)
    with size-1 dims kept as such (the span gradient is summed over them). keep_scores: keep P for the
    backward (True), recompute it there (False), or decide by size (None: keep up to 256 MiB per call)."""
    B, H, Tq, _ = q.shape
    if z.dim() != 3:
        raise ValueError(f"z must be 3-d (B|1, H|1, Tq|1), got {tuple(z.shape)}")
    zf = z.to(compute_dtype(q.dtype))
    # expand is a view; _BandSpanAttention reduces the gradient to z's own shape
    return _BandSpanAttention.apply(q, k, v, _Expand.apply(zf, (B, H, Tq)), float(ramp), hard, chunk, box_waste,
                                    keep_scores)


class _Expand(torch.autograd.Function):
    """expand() whose backward sums over the broadcast dims (kept as a Function so the band kernel sees a
    plain (B, H, Tq) tensor)."""

    @staticmethod
    def forward(ctx, z, shape):
        ctx.shape = z.shape
        return z.expand(shape)

    @staticmethod
    def backward(ctx, g):
        return _sum_to(g, ctx.shape), None


def band_flops(z: torch.Tensor, Tq: int, Tk: int, ramp: float, hard: bool, chunk: int = 64,
               box_waste: float = 0.15) -> tuple[int, int]:
    """(query·key pairs the CPU path computes, pairs dense causal attention computes) for z (B, H, Tq), as
    `span_attention(impl="auto")` dispatches: heads whose spans cover every key count as dense."""
    B, H = z.shape[:2]
    o = Tk - Tq
    per_head = B * (Tq * o + Tq * (Tq + 1) // 2)
    dense = H * per_head
    cover = heads_covering(z.detach().float(), Tq, Tk)
    if bool(cover.all()):
        return dense, dense
    zb = z[:, ~cover] if bool(cover.any()) and H > 1 else z
    sets, E = band_plan(zb.detach().float(), Tq, Tk, ramp, hard, chunk, box_waste)
    nC = E.shape[1]
    band = int(cover.sum()) * per_head if H > 1 else 0
    for kind, where, e, *_ in sets:
        n = (where[1] - where[0]) * (nC - where[2]) if kind == "box" else where.shape[0]
        band += n * (e + chunk) * chunk
    return band, dense


# ----------------------------------------------------------------------------------------------------
# GPU: FlexAttention (unverified: no GPU was available when this was written)
# ----------------------------------------------------------------------------------------------------

def flex_span_attention(q, k, v, z, ramp: float, hard: bool = False, block: int = 128):  # pragma: no cover
    """FlexAttention with a block mask built from kv-tile indices (full tiles without mask_mod, partial tiles
    with it) and the ramp as a score_mod. UNVERIFIED ON GPU."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    o = Tk - Tq
    zf = z.float().expand(B, H, Tq)
    nq, nk = -(-Tq // block), -(-Tk // block)
    with torch.no_grad():
        zp = F.pad(zf, (0, nq * block - Tq), value=0.0).view(B, H, nq, block)
        i = torch.arange(block, device=q.device)
        qpos0 = o + torch.arange(nq, device=q.device) * block  # first query position of each q tile
        reach = (zp.floor() + 1) if hard else torch.ceil(zp + ramp)
        lo = (qpos0[:, None] + i - reach + 1).amin(-1).clamp_min(0).long()  # first key any row needs
        hi = (qpos0 + block - 1).clamp_max(Tk - 1)  # last causal key of the tile
        lo_t, hi_t = lo // block, hi // block  # (B, H, nq), (nq,)
        full_lo = (qpos0[:, None] + i - zp.floor()).amax(-1).clamp_min(0).long()  # keys with m = 1 for all rows
        full_lo_t = -(-full_lo // block)
        full_hi_t = qpos0 // block  # tiles entirely at or before the tile's first query (causal for all rows)
        t = torch.arange(nk, device=q.device)
        in_band = (t >= lo_t[..., None]) & (t <= hi_t[:, None])
        full = (t >= full_lo_t[..., None]) & (t < full_hi_t[:, None]) & in_band
        partial = in_band & ~full
        kv_num = partial.sum(-1).int()
        kv_idx = torch.argsort((~partial).int(), dim=-1, stable=True).int()
        full_num = full.sum(-1).int()
        full_idx = torch.argsort((~full).int(), dim=-1, stable=True).int()

    def mask_mod(b, h, qi, kj):
        d = qi + o - kj
        zz = zf[b, h, qi.clamp(max=Tq - 1)]  # padded query rows read the last span
        return (d >= 0) & ((d <= zz) if hard else (d < zz + ramp))

    def score_mod(score, b, h, qi, kj):
        d = (qi + o - kj).to(torch.float32)
        zz = zf[b, h, qi.clamp(max=Tq - 1)]
        m = ((ramp + zz - d) / ramp).clamp(0.0, 1.0)
        return score if hard else score + torch.log(m.clamp_min(1e-30))

    bm = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                  seq_lengths=(Tq, Tk))
    global _FLEX_COMPILED
    if _FLEX_COMPILED is None:
        _FLEX_COMPILED = torch.compile(flex_attention, dynamic=True)
    return _FLEX_COMPILED(q, k, v, score_mod=score_mod, block_mask=bm)


_FLEX_COMPILED = None


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------

def _split_heads(q, k, v, z, ramp: float, hard: bool, cover: torch.Tensor, chunk: int) -> torch.Tensor:
    """Heads whose spans cover every key run as dense causal SDPA (their mask is identically 1: the fused
    kernel is exact and fastest); the others through the band kernel. A long head then costs what a dense
    head costs, and the short heads stay cheap."""
    from .attention import causal_attention

    dense_h, band_h = cover.nonzero().flatten(), (~cover).nonzero().flatten()
    y_dense = causal_attention(q[:, dense_h], k[:, dense_h], v[:, dense_h])
    y_band = band_span_attention(q[:, band_h], k[:, band_h], v[:, band_h], z[:, band_h], ramp, hard, chunk=chunk)
    return q.new_empty(q.shape).index_copy(1, dense_h, y_dense).index_copy(1, band_h, y_band)


def check_span_impl(impl: str, q: torch.Tensor) -> None:
    """Refuse a span kernel that cannot run on q's device (and, for FlexAttention on CPU, with autograd)."""
    if q.is_cuda and impl in ("auto", "flex"):
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError as e:  # pragma: no cover
            raise DynaformerError("model.span: this torch has no FlexAttention for the CUDA span path; "
                                  "set model.span_impl=masked") from e
    if impl == "band" and q.is_cuda:
        raise DynaformerError("model.span_impl: 'band' is the CPU kernel; use auto or flex on CUDA")
    if impl == "flex" and not q.is_cuda and torch.is_grad_enabled():
        raise DynaformerError("model.span_impl: FlexAttention has no backward on CPU; use auto or band")


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, ramp: float,
                   hard: bool = False, impl: str = "auto", chunk: int = 64,
                   key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal span attention; q: (B, H, Tq, D), k, v: (B, H, Tk, D), z: (B|1, H, Tq|1) spans in tokens.

    impl: auto | band | masked | dense | flex | reference. auto: dense SDPA when the spans cover every key
    (the mask is identically 1), FlexAttention on CUDA, the masked SDPA for short or single-step queries,
    else the CPU band kernel — for the heads that need it, dense SDPA for heads whose spans cover all keys.

    key_mask (B, Tk) bool, True = a real key: a padded batch. Padded keys are masked on top of the span;
    such calls take the masked SDPA (or, decoding, the decode) path whatever `impl` says (the reference
    stays the reference): O(Tq·Tk), but exact for any padding."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if key_mask is not None:
        if impl == "reference":
            return reference_span_attention(q, k, v, z, ramp, hard, key_mask)
        if Tq <= 16 and not (torch.is_grad_enabled() and (q.requires_grad or z.requires_grad)):
            return decode_span_attention(q, k, v, z, ramp, hard, key_mask)
        return masked_sdpa_span_attention(q, k, v, z, ramp, hard, key_mask)
    if impl == "auto" and Tq <= 16 and not (torch.is_grad_enabled() and (q.requires_grad or z.requires_grad)):
        return decode_span_attention(q, k, v, z, ramp, hard)
    if impl == "auto":
        cover = heads_covering(z.detach(), Tq, Tk)
        if bool(cover.all()):
            impl = "dense"
        elif bool(cover.any()) and not q.is_cuda and Tq >= chunk and z.shape[1] > 1:
            return _split_heads(q, k, v, z, ramp, hard, cover, chunk)
        elif q.is_cuda:
            impl = "flex"
        elif Tq < chunk:  # (from one chunk up the band kernel beats the masked SDPA: measured at T=128)
            impl = "masked"
        else:
            impl = "band"
    if impl == "dense":
        from .attention import causal_attention
        return causal_attention(q, k, v)
    if impl == "band":
        return band_span_attention(q, k, v, z, ramp, hard, chunk=chunk)
    if impl == "masked":
        return masked_sdpa_span_attention(q, k, v, z, ramp, hard)
    if impl == "flex":
        return flex_span_attention(q, k, v, z, ramp, hard)
    if impl == "reference":
        return reference_span_attention(q, k, v, z, ramp, hard)
    raise ValueError(f"unknown span attention impl {impl!r}")
