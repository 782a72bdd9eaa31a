"""The causal CPU band kernel of span attention (kernels/span.py has the math; docs/design.md §4).

Queries are cut into chunks of C; for each (batch, head, chunk) only the keys inside that chunk's largest
reach *for that head* are touched: a window of E + C keys (E before the chunk, rounded up to 32, plus the
chunk's own keys). Two implementations compute the same function:

- compiled (band_native.py, csrc/band_span.cpp), the default where a C++ compiler is found: one parallel
  loop over (row, run of chunks) tasks, each task's GEMMs single-threaded, threads pulling tasks as they
  free up; the softmax runs only over each query's visible columns. It holds up when another process takes
  a core (benchmarks/RESULTS.md, "Attention forward and backward").
- Python (`_BandSpanAttention`): problems with the same E are batched and run as explicit score tiles:
  S = Q·Kᵀ over the windows in one batched GEMM, the ramp applied only to the window's leading columns, the
  causal cut only to its last C, softmax in place, O = P·V. The backward keeps P and costs four batched
  GEMMs; the span gradient needs only the ramp columns:
      ∂L/∂z_i = Σ_j dS_ij / (R m_ij) over 0 < m_ij < 1,   dS = P ⊙ (dO·Vᵀ − δ),   δ_i = dO_i·O_i.
  Tiles are cut to ≤ 8 MB of scores so their buffers are reused from the heap.

Memory (both): P costs 4 bytes per computed query-key pair, held until the backward; a call above 256 MiB of
tiles keeps only each row's log-sum-exp instead and the backward recomputes P (≈ 9% slower).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._tiles import (
    KEEP_BYTES,
    NEG_INF,
    SCORE_BYTES,
    Expand,
    compute_dtype,
    pad_rows,
    piece_size,
    ramp_weights,
    round_up,
    span_grad,
    sum_to,
)
from .band_native import available as native_available
from .band_native import load as load_native
from .band_native import unavailable_reason as native_unavailable_reason
from .plan import uses_native
from .reach import keys_reached

# ----------------------------------------------------------------------------------------------------
# Which keys each chunk needs
# ----------------------------------------------------------------------------------------------------

def _chunk_reach(z: torch.Tensor, Tq: int, Tk: int, ramp: float, hard: bool, chunk: int, gran: int = 32):
    """Per (row = batch·head, query chunk): the spans zp (BH, nC, C) (floored when hard), E (BH, nC) = how far
    before the chunk its keys reach (keys with m > 0 for some query of the chunk, rounded up to `gran`,
    clipped at the sequence start), and in_diag (BH, nC): the ramp or cut reaches into the chunk's own keys.
    z: (B, H, Tq) detached. Query chunk c holds queries at key positions o + cC .. o + cC + C − 1."""
    B, H, _ = z.shape
    C, BH, o = chunk, B * H, Tk - Tq
    nC = -(-Tq // C)
    zp = F.pad(z.reshape(BH, Tq), (0, nC * C - Tq), value=0.0).view(BH, nC, C)
    if hard:
        zp = zp.floor()
    i = torch.arange(C, device=z.device, dtype=z.dtype)
    reach = keys_reached(zp, ramp, hard)  # keys with m > 0, counting the query itself
    E = round_up((reach - 1 - i).amax(-1).clamp_min(0).long(), gran)  # (BH, nC)
    c0 = o + torch.arange(nC, device=z.device) * C
    Ecl = torch.minimum(E, c0.expand_as(E))
    in_diag = (zp - i).amin(-1) < 0
    return zp, E, Ecl, in_diag


def window_extents(z: torch.Tensor, Tq: int, Tk: int, ramp: float, hard: bool, chunk: int) -> torch.Tensor:
    """E (BH, nC) int64: keys each query chunk's window holds before the chunk (see `_chunk_reach`)."""
    return _chunk_reach(z, Tq, Tk, ramp, hard, chunk)[2]


def band_sets(z: torch.Tensor, Tq: int, Tk: int, ramp: float, hard: bool, chunk: int, box_waste: float = 0.15):
    """How the Python kernel batches the (row, chunk) problems of `_chunk_reach`:
    - boxes (r0, r1, cs, E, ...): rows r0..r1-1, chunks cs.. — one zero-copy strided window view per part;
      a row goes into a box when its chunks' E vary little (wasted key tiles ≤ `box_waste` of its work),
    - gathers (idx, E, ...): any other problems with equal E, gathered by index.
    Wr = leading window columns that carry the ramp / cut; ramp_in_diag: some z_i < i (the ramp reaches the
    chunk's own keys). Returns (sets, E (BH, nC))."""
    BH, o, C = z.shape[0] * z.shape[1], Tk - Tq, chunk
    zp, E, Ecl, in_diag = _chunk_reach(z, Tq, Tk, ramp, hard, chunk)
    nC = E.shape[1]
    i = torch.arange(C, device=z.device, dtype=z.dtype)

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




# ----------------------------------------------------------------------------------------------------
# Python kernel: batched score tiles
# ----------------------------------------------------------------------------------------------------

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
    """Cut the plan's sets into problems whose score matrices stay under SCORE_BYTES."""
    out = []
    for kind, where, E, Wr, in_diag, const in sets:
        per_chunk = C * (E + C) * 4
        if kind == "box":
            r0, r1, cs = where
            per_row = (nC - cs) * per_chunk
            if per_row >= SCORE_BYTES:  # one row, a run of chunks at a time
                step = max(1, SCORE_BYTES // per_chunk)
                for r in range(r0, r1):
                    for a in range(cs, nC, step):
                        out.append(_Piece("box", (r, r + 1, a, min(nC, a + step)), E, Wr, in_diag, const))
            else:  # several rows at a time
                step = max(1, SCORE_BYTES // per_row)
                for r in range(r0, r1, step):
                    out.append(_Piece("box", (r, min(r1, r + step), cs, nC), E, Wr, in_diag, const))
        else:
            step = max(1, SCORE_BYTES // per_chunk)
            for s in range(0, where.shape[0], step):
                idx = where[s:s + step]
                out.append(_Piece("gather", (idx[:, 0], idx[:, 1]), E, Wr, in_diag, const))
    return out


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


def _piece_ramps(pc: _Piece, zs: torch.Tensor, ci: torch.Tensor, ramp: float, hard: bool):
    """(m over the ramp columns, m over the diagonal columns), each None where the piece needs none."""
    m_r = m_d = None
    if pc.Wr > 0:
        d_r = ci[:, None] + pc.E - torch.arange(pc.Wr, device=zs.device, dtype=zs.dtype)[None, :]
        m_r = ramp_weights(zs[:1] if pc.const else zs, d_r, ramp, hard)
    if pc.in_diag:
        m_d = ramp_weights(zs, ci[:, None] - ci[None, :], ramp, hard)
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


class _BandSpanAttention(torch.autograd.Function):
    """Tiled band attention with explicit score tiles: per piece, S = Q·Kᵀ over the key windows (one batched
    GEMM), the causal cut added to the diagonal columns, softmax in place with the ramp multiplied into the
    ramp (and, where it reaches them, diagonal) columns after the exp, O = P·V.
    P is kept for the backward, which is four batched GEMMs plus the span gradient over the ramp columns —
    or, when the score tiles of one call would exceed KEEP_BYTES (or keep_scores is False), only each
    row's log-sum-exp, and the backward recomputes P with one more GEMM per tile."""

    @staticmethod
    def forward(ctx, q, k, v, z, ramp: float, hard: bool, chunk: int, box_waste: float, keep_scores: bool | None,
                with_lse: bool = False):
        B, H, Tq, D = q.shape
        Tk = k.shape[-2]
        C, BH, o = chunk, B * H, Tk - Tq
        nC = -(-Tq // C)
        pad = nC * C - Tq
        Tkp = Tk + pad
        scale = 1.0 / math.sqrt(D)
        f32 = compute_dtype(q.dtype)
        zd = z.detach().to(f32)
        sets, _ = band_sets(zd, Tq, Tk, ramp, hard, C, box_waste)
        qc = (pad_rows(q.to(f32), pad) * scale).reshape(BH, nC, C, D)  # scaled queries
        kp = pad_rows(k.to(f32), pad).reshape(BH, Tkp, D)
        vp = pad_rows(v.to(f32), pad).reshape(BH, Tkp, D)
        zc = F.pad(zd.reshape(BH, Tq), (0, pad), value=0.0).view(BH, nC, C)
        if hard:
            zc = zc.floor()
        out = torch.empty(BH, nC, C, D, dtype=f32, device=q.device)
        ci = torch.arange(C, device=q.device, dtype=f32)
        future = torch.zeros(C, C, dtype=f32, device=q.device).masked_fill_(  # causal cut, additive
            torch.ones(C, C, dtype=torch.bool, device=q.device).triu_(1), NEG_INF)
        pieces = _pieces(sets, nC, C)
        if keep_scores is None:
            keep_scores = sum(piece_size(pc) * C * (pc.E + C) for pc in pieces) * 4 <= KEEP_BYTES
        saved = []
        lse_all = torch.empty(BH, nC, C, dtype=f32, device=q.device) if with_lse else None
        for pc in pieces:
            Q, K, V, zs = _gather(pc, qc, kp, vp, zc, o, C, Tkp, D)
            m_r, m_d = _piece_ramps(pc, zs, ci, ramp, hard)
            S = torch.bmm(Q, K.transpose(1, 2))  # (n, C, W)
            lse = _span_softmax_(S, pc.E, m_r, m_d, future, visible_max=False)
            if lse is None:
                S = torch.bmm(Q, K.transpose(1, 2))  # rare: redo with the max over visible keys only
                lse = _span_softmax_(S, pc.E, m_r, m_d, future, visible_max=True)
            _bmm_into(pc, out, S, V)
            if lse_all is not None:
                _scatter(pc, lse_all, lse.squeeze(-1))
            saved.append((pc, K, V, S, None) if keep_scores else (pc, K, V, None, lse))
        ctx.saved, ctx.future = saved, future
        ctx.save_for_backward(qc, kp, vp, zc, out)
        ctx.meta = (B, H, Tq, Tk, D, C, nC, pad, ramp, hard, scale)
        ctx.z_shape = z.shape
        y = out.view(B, H, nC * C, D)[:, :, :Tq].to(q.dtype)
        if with_lse:
            return y, lse_all.view(B, H, nC * C)[:, :, :Tq]
        return y

    @staticmethod
    def backward(ctx, dout, dlse=None):
        B, H, Tq, Tk, D, C, nC, pad, ramp, hard, scale = ctx.meta
        qc, kp, vp, zc, out = ctx.saved_tensors
        BH, o, Tkp = B * H, Tk - Tq, Tk + pad
        f32 = compute_dtype(dout.dtype)
        doc = pad_rows(dout.to(f32), pad).reshape(BH, nC, C, D)
        delta = (doc * out).sum(-1)  # (BH, nC, C): dO_i·O_i
        if dlse is not None:  # ∂lse_i/∂S_ij = P_ij: the lse's gradient enters dS as −δ does
            delta = delta - F.pad(dlse.to(f32), (0, pad)).view(BH, nC, C)
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
                    g = span_grad(dS[..., :Wr], ramp_weights(zs[:1] if pc.const else zs, d_r, ramp, False))
                if pc.in_diag:
                    gd = span_grad(dS[..., E:], ramp_weights(zs, ci[:, None] - ci[None, :], ramp, False))
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
            dz = sum_to(dz.view(B, H, nC * C)[:, :, :Tq], ctx.z_shape)
        return dq.to(dout.dtype), dk.to(dout.dtype), dv.to(dout.dtype), dz, None, None, None, None, None, None



# ----------------------------------------------------------------------------------------------------
# Compiled kernel
# ----------------------------------------------------------------------------------------------------

# Chunks per task of the compiled kernel: enough work per task to amortise the backward's private key
# buffer, enough tasks (B·H·nC / G) for threads to balance when one of them is slowed.
_CHUNKS_PER_TASK = 8


class _NativeBand(torch.autograd.Function):
    """The compiled kernel (csrc/band_span.cpp) behind autograd: the same function as `_BandSpanAttention`."""

    @staticmethod
    def forward(ctx, q, k, v, z, ramp: float, hard: bool, chunk: int, keep_scores: bool | None,
                with_lse: bool = False):
        B, H, Tq, D = q.shape
        Tk = k.shape[-2]
        C, BH = chunk, B * H
        nC = -(-Tq // C)
        pad = nC * C - Tq
        zd = z.detach().float()
        E = window_extents(zd, Tq, Tk, ramp, hard, C).contiguous()  # (BH, nC)
        if keep_scores is None:
            keep_scores = int((E + C).sum()) * C * 4 <= KEEP_BYTES
        scale = 1.0 / math.sqrt(D)
        qc = (pad_rows(q.float(), pad) * scale).reshape(BH, nC * C, D).contiguous()  # scaled queries
        kp = pad_rows(k.float(), pad).reshape(BH, Tk + pad, D).contiguous()
        vp = pad_rows(v.float(), pad).reshape(BH, Tk + pad, D).contiguous()
        zc = F.pad(zd.reshape(BH, Tq), (0, pad), value=0.0)
        zc = (zc.floor() if hard else zc).contiguous()
        out, lse, P = load_native().forward(qc, kp, vp, zc, E, Tk - Tq, C, _CHUNKS_PER_TASK, float(ramp),
                                                 hard, bool(keep_scores))
        ctx.save_for_backward(qc, kp, vp, zc, E, out, lse, P)
        ctx.meta = (B, H, Tq, Tk, D, C, nC, pad, float(ramp), hard, scale, z.shape)
        y = out.view(B, H, nC * C, D)[:, :, :Tq].to(q.dtype)
        if with_lse:
            return y, lse.view(B, H, nC * C)[:, :, :Tq].clone()
        return y

    @staticmethod
    def backward(ctx, dout, dlse=None):
        B, H, Tq, Tk, D, C, nC, pad, ramp, hard, scale, z_shape = ctx.meta
        qc, kp, vp, zc, E, out, lse, P = ctx.saved_tensors
        doc = pad_rows(dout.float(), pad).reshape(B * H, nC * C, D).contiguous()
        delta = (doc * out).sum(-1)  # (BH, nC·C): dO_i·O_i
        if dlse is not None:  # ∂lse_i/∂S_ij = P_ij: the lse's gradient enters dS as −δ does
            delta = delta - F.pad(dlse.float(), (0, pad)).view(B * H, nC * C)
        delta = delta.contiguous()
        want_z = ctx.needs_input_grad[3] and not hard
        dq, dk, dv, dz = load_native().backward(qc, kp, vp, zc, E, doc, delta, lse, P, Tk - Tq, C,
                                                     _CHUNKS_PER_TASK, ramp, hard, want_z)
        dq = dq.mul_(scale).view(B, H, nC * C, D)[:, :, :Tq]
        dk = dk[:, :Tk].reshape(B, H, Tk, D)
        dv = dv[:, :Tk].reshape(B, H, Tk, D)
        dz = sum_to(dz.view(B, H, nC * C)[:, :, :Tq], z_shape) if want_z else None
        return dq.to(dout.dtype), dk.to(dout.dtype), dv.to(dout.dtype), dz, None, None, None, None, None


def band_span_attention(q, k, v, z, ramp: float, hard: bool = False, chunk: int = 64, box_waste: float = 0.15,
                        keep_scores: bool | None = None, native: bool | None = None, with_lse: bool = False):
    """CPU band kernel (see module doc). q: (B, H, Tq, D); k, v: (B, H, Tk, D); z broadcastable to (B, H, Tq)
    with size-1 dims kept as such (the span gradient is summed over them). keep_scores: keep P for the
    backward (True), recompute it there (False), or decide by size (None: keep up to 256 MiB per call).
    native: the compiled kernel (True), the Python one (False), or as `plan()` decides for q (None: compiled
    where it runs, kernels/plan.py `uses_native`); box_waste tunes the Python kernel's batching only.
    with_lse: also return each query's log-sum-exp log Σ_j m_ij·exp(q_i·k_j/√D) (B, H, Tq) fp32, differentiable,
    so that a caller can merge this softmax with one over other keys (kernels/sink.py)."""
    B, H, Tq, _ = q.shape
    if z.dim() != 3:
        raise ValueError(f"z must be 3-d (B|1, H|1, Tq|1), got {tuple(z.shape)}")
    if native is None:
        native = uses_native(q.dtype, q.device)
    elif native and not native_available():
        raise RuntimeError(f"the compiled band kernel is unavailable: {native_unavailable_reason()}")
    zf = Expand.apply(z.to(compute_dtype(q.dtype)), (B, H, Tq))  # a view; the kernels reduce dz to z's shape
    if native:
        return _NativeBand.apply(q, k, v, zf, float(ramp), hard, chunk, keep_scores, with_lse)
    return _BandSpanAttention.apply(q, k, v, zf, float(ramp), hard, chunk, box_waste, keep_scores, with_lse)


def band_pairs(z: torch.Tensor, Tq: int, Tk: int, ramp: float, hard: bool, native: bool, chunk: int = 64,
               box_waste: float = 0.15) -> int:
    """Query·key pairs the band kernel computes for z (B, H, Tq): every chunk's window × its C queries (the
    compiled kernel, `native`), or the windows of the Python kernel's batches (boxes run at their rows'
    largest E)."""
    if native:
        return int((window_extents(z.detach().float(), Tq, Tk, ramp, hard, chunk) + chunk).sum()) * chunk
    sets, E = band_sets(z.detach().float(), Tq, Tk, ramp, hard, chunk, box_waste)
    nC = E.shape[1]
    pairs = 0
    for kind, where, e, *_ in sets:
        n = (where[1] - where[0]) * (nC - where[2]) if kind == "box" else where.shape[0]
        pairs += n * (e + chunk) * chunk
    return pairs
