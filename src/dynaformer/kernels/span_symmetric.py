"""Symmetric span attention for encoders: query i weights key j by the soft span mask at distance |i − j|,

    m = clamp((R + z_i − |i − j|) / R, 0, 1),   attention ∝ m · exp(score),

with key padding (padding keys are hidden; every query keeps its own key, so no row is empty).

- `reference_symmetric_span_attention`: dense masked SDPA, O(T²): the encoder's `masked` kernel (the fallback
  for short sequences and spans that cover the sequence) and the reference of the tests.
- `band_symmetric_span_attention`: the CPU band kernel. Queries are cut into chunks of C; a chunk of a
  (batch, head) row touches only the window of E keys on either side of it plus its own C keys, where E is
  the row's largest reach (rounded up to 32). Rows with the same E are batched into explicit score tiles,
  as in the causal band kernel (kernels/band.py): S = Q·Kᵀ in one batched GEMM, softmax as
  m·exp(S − max) / Σ, O = P·V, and a backward of four GEMMs plus the span gradient
  ∂L/∂z_i = Σ_j dS_ij / (R m_ij) over the ramp (0 < m < 1). Above 256 MiB of score tiles per call only
  each row's log-sum-exp is kept and the backward recomputes P.
`symmetric_span_attention` runs the one `plan()` (kernels/plan.py) picks.
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
    piece_size,
    ramp_weights,
    round_up,
    span_grad,
)
from .attention import padding_bias
from .plan import plan
from .reach import keys_reached
from .span import span_log_mask


def reference_symmetric_span_attention(q, k, v, z, ramp: float, hard: bool = False,
                                       key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Dense masked SDPA (differentiable in z). q, k, v: (B, H, T, D); z broadcastable to (B, H, T);
    key_padding_mask (B, T) bool, True = real token."""
    T = q.shape[-2]
    pos = torch.arange(T, device=q.device, dtype=torch.float32)
    d = (pos[:, None] - pos[None, :]).abs()
    bias = span_log_mask(d, z.unsqueeze(-1), ramp, hard).to(q.dtype)  # (B, H, T, T)
    if key_padding_mask is not None:  # (every query keeps its own key, so no row is empty)
        bias = bias + padding_bias(key_padding_mask, T, T, q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class _SymmetricBand(torch.autograd.Function):
    """Keeps P for the backward, or — above KEEP_BYTES of tiles per call, or keep_scores=False — only each
    row's log-sum-exp, and the backward recomputes P (as the causal kernel does)."""

    @staticmethod
    def forward(ctx, q, k, v, z, key_padding_mask, ramp: float, hard: bool, chunk: int, keep_scores: bool | None):
        B, H, T, D = q.shape
        C, BH = chunk, B * H
        nC = -(-T // C)
        pad = nC * C - T
        cdt = compute_dtype(q.dtype)
        zd = z.detach().to(cdt)
        zc = F.pad(zd.reshape(BH, T), (0, pad), value=0.0).view(BH, nC, C)
        if hard:
            zc = zc.floor()
        # E per (row, chunk): the farthest key any query of the chunk reaches past its edge, on either side
        i = torch.arange(C, device=q.device, dtype=cdt)
        edge = torch.minimum(i, C - 1 - i)  # distance to the nearer chunk edge
        E_rc = (keys_reached(zc, ramp, hard) - 1 - edge).amax(-1).clamp(0, T)
        E_rc = round_up(E_rc.long(), 32).clamp_max(int(round_up(torch.tensor(T), 32)))  # (BH, nC)
        Emax = int(E_rc.max())
        L = Emax + nC * C + Emax  # padded key length: the windows of the first and last chunks fit
        scale = 1.0 / math.sqrt(D)
        qc = (F.pad(q.to(cdt), (0, 0, 0, pad)) * scale).reshape(BH, nC, C, D)
        kp = F.pad(k.to(cdt), (0, 0, Emax, Emax + pad)).reshape(BH, L, D)
        vp = F.pad(v.to(cdt), (0, 0, Emax, Emax + pad)).reshape(BH, L, D)
        valid = torch.zeros(B, L, dtype=torch.bool, device=q.device)  # real keys (not padding, in range)
        valid[:, Emax:Emax + T] = True if key_padding_mask is None else key_padding_mask
        kb = torch.zeros(B, L, dtype=cdt, device=q.device).masked_fill_(~valid, NEG_INF)
        kb = kb[:, None].expand(B, H, L).contiguous().view(BH, L)
        out = torch.empty(BH, nC, C, D, dtype=cdt, device=q.device)
        pieces = _encoder_pieces(E_rc, C)
        if keep_scores is None:
            keep_scores = sum(piece_size(p) * C * (2 * p.E + C) for p in pieces) * 4 <= KEEP_BYTES
        saved = []
        for piece in pieces:
            E = piece.E
            W = 2 * E + C
            dist = (i[:, None] + E - torch.arange(W, device=q.device, dtype=cdt)[None, :]).abs()  # (C, W) |i − j|
            Q, K, V, zs, kbw = _operands(piece, qc, kp, vp, zc, kb, Emax, L)
            m = _ramp_parts(zs, dist, ramp, hard, E, C)  # [(column slice, m there)]: m = 1 elsewhere
            S = _scores(Q, K, kbw, E, C)
            lse = _softmax_(S, m, visible_max=False)
            if lse is None:
                S = _scores(Q, K, kbw, E, C)
                lse = _softmax_(S, m, visible_max=True)
            _store(piece, out, torch.bmm(S, V))
            saved.append((piece, S, None) if keep_scores else (piece, None, lse))
        ctx.saved = saved
        ctx.save_for_backward(qc, kp, vp, zc, out, kb)
        ctx.meta = (B, H, T, D, C, nC, pad, Emax, L, ramp, hard, scale)
        return out.view(B, H, nC * C, D)[:, :, :T].to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        B, H, T, D, C, nC, pad, Emax, L, ramp, hard, scale = ctx.meta
        qc, kp, vp, zc, out, kb = ctx.saved_tensors
        BH, cdt = B * H, qc.dtype
        doc = F.pad(dout.to(cdt), (0, 0, 0, pad)).reshape(BH, nC, C, D)
        delta = (doc * out).sum(-1)  # (BH, nC, C)
        dq = torch.empty_like(qc)
        dk = torch.zeros(BH, L + C, D, dtype=cdt, device=dout.device)  # + C: the fold's last tile may overhang
        dv = torch.zeros_like(dk)
        want_z = ctx.needs_input_grad[3] and not hard
        dz = torch.zeros(BH, nC, C, dtype=cdt, device=dout.device) if want_z else None
        i = torch.arange(C, device=dout.device, dtype=cdt)
        for piece, P, lse in ctx.saved:
            E = piece.E
            W = 2 * E + C
            Q, K, V, zs, kbw = _operands(piece, qc, kp, vp, zc, None if P is not None else kb, Emax, L)
            if P is None:  # recompute P = m·exp(S − lse); out-of-span exponents capped before m zeroes them
                dist = (i[:, None] + E - torch.arange(W, device=dout.device, dtype=cdt)[None, :]).abs()
                P = _scores(Q, K, kbw, E, C).sub_(lse).clamp_(max=80.0).exp_()
                for cols, m in _ramp_parts(zs, dist, ramp, hard, E, C):
                    P[..., cols].mul_(m)
            dO, dl = _take(piece, doc), _take(piece, delta).unsqueeze(-1)
            dS = torch.bmm(dO, V.transpose(1, 2)).sub_(dl).mul_(P)
            if want_z:
                dist = (i[:, None] + E - torch.arange(W, device=dout.device, dtype=cdt)[None, :]).abs()
                g = sum(span_grad(dS[..., cols], m) for cols, m in _ramp_parts(zs, dist, ramp, False, E, C))
                _store(piece, dz, g.div_(ramp))
            _store(piece, dq, torch.bmm(dS, K))
            _fold_windows(piece, dk, torch.bmm(dS.transpose(1, 2), Q), Emax, C, L)
            _fold_windows(piece, dv, torch.bmm(P.transpose(1, 2), dO), Emax, C, L)
        ctx.saved = None
        dq = dq.mul_(scale).view(B, H, nC * C, D)[:, :, :T]
        dk = dk[:, Emax:Emax + T].reshape(B, H, T, D)
        dv = dv[:, Emax:Emax + T].reshape(B, H, T, D)
        if dz is not None:
            dz = dz.view(B, H, nC * C)[:, :, :T]  # z arrives expanded to (B, H, T); _Expand sums it back
        return dq.to(dout.dtype), dk.to(dout.dtype), dv.to(dout.dtype), dz, None, None, None, None, None


def _scores(Q: torch.Tensor, K: torch.Tensor, kbw: torch.Tensor, E: int, C: int) -> torch.Tensor:
    """S = Q·Kᵀ + key bias (−inf at padding), with each query's own key never hidden."""
    S = torch.bmm(Q, K.transpose(1, 2)).add_(kbw[:, None, :])
    S[..., E:E + C].diagonal(dim1=-2, dim2=-1).copy_((Q * K[:, E:E + C]).sum(-1))
    return S


class _EncoderPiece(NamedTuple):
    """A batch of chunk problems with the same reach E: "box" = rows r0..r1-1 × chunks a..b-1 (windows are
    strided views), "gather" = (rows, chunks) index tensors (windows are gathered)."""
    kind: str
    E: int
    where: tuple


def _encoder_pieces(E_rc: torch.Tensor, C: int, waste: float = 0.15) -> list[_EncoderPiece]:
    """Rows whose chunks need about the same reach run as boxes at the row's largest E (≤ `waste` of their
    work spent on unneeded keys); the chunks of other rows are gathered by E, so a few far-reaching tokens
    widen only their own chunks' windows. Each piece stays under SCORE_BYTES of scores."""
    BH, nC = E_rc.shape
    E_row = E_rc.amax(1)
    spent = ((E_row[:, None] - E_rc) * 2).sum(1).float() / ((2 * E_row + C) * nC).float()
    box_rows = (spent <= waste).tolist()
    pieces: list[_EncoderPiece] = []
    by_e: dict[int, list[int]] = {}
    for r, ok in enumerate(box_rows):
        if ok:
            by_e.setdefault(int(E_row[r]), []).append(r)
    for E, rows in sorted(by_e.items()):
        per_chunk = C * (2 * E + C) * 4
        for r0, r1, a, b in _box_runs(rows, nC, per_chunk):
            pieces.append(_EncoderPiece("box", E, (r0, r1, a, b)))
    rest = ~torch.tensor(box_rows, dtype=torch.bool, device=E_rc.device)[:, None].expand(BH, nC)
    for E in torch.unique(E_rc[rest]).tolist():
        idx = ((E_rc == E) & rest).nonzero()
        step = max(1, SCORE_BYTES // (C * (2 * E + C) * 4))
        for s in range(0, idx.shape[0], step):
            pieces.append(_EncoderPiece("gather", int(E), (idx[s:s + step, 0], idx[s:s + step, 1])))
    return pieces


def _box_runs(rows: list[int], nC: int, chunk_bytes: int):
    """(r0, r1, a, b): runs of consecutive rows, all chunks, or one row and a run of chunks, each with at most
    SCORE_BYTES of scores."""
    runs, start = [], rows[0]
    for prev, r in zip(rows, rows[1:] + [None], strict=True):
        if r != prev + 1:
            runs.append((start, prev + 1))
            start = r
    per_row = nC * chunk_bytes
    for r0, r1 in runs:
        if per_row >= SCORE_BYTES:
            step = max(1, SCORE_BYTES // chunk_bytes)
            for r in range(r0, r1):
                for a in range(0, nC, step):
                    yield r, r + 1, a, min(nC, a + step)
        else:
            step = max(1, SCORE_BYTES // per_row)
            for r in range(r0, r1, step):
                yield r, min(r1, r + step), 0, nC


def _window_rows(piece: _EncoderPiece, Emax: int, C: int, stride: int) -> torch.Tensor:
    """Gather pieces: (n, W) flat key rows of each problem's window in a (BH, stride) key layout."""
    rr, cc = piece.where
    W = 2 * piece.E + C
    start = rr * stride + (Emax - piece.E) + cc * C
    return start[:, None] + torch.arange(W, device=rr.device)


def _operands(piece: _EncoderPiece, qc, kp, vp, zc, kb, Emax: int, L: int):
    """Q (n, C, D), K and V windows (n, W, D), spans (n, C), key bias (n, W) (None without kb). The window
    of chunk c starts at padded key position (Emax − E) + cC."""
    C, D = qc.shape[-2:]
    W, off = 2 * piece.E + C, Emax - piece.E
    if piece.kind == "gather":
        rr, cc = piece.where
        rows = _window_rows(piece, Emax, C, L)
        return (qc[rr, cc], kp.reshape(-1, D)[rows], vp.reshape(-1, D)[rows], zc[rr, cc],
                None if kb is None else kb.reshape(-1)[rows])
    r0, r1, a, b = piece.where
    nr, nc = r1 - r0, b - a

    def win(x):  # overlapping strided view; a copy only when several rows are batched
        return x.as_strided((nr, nc, W, D), (L * D, C * D, D, 1),
                            x.storage_offset() + (r0 * L + off + a * C) * D).reshape(nr * nc, W, D)

    kbw = None
    if kb is not None:
        kbw = kb.as_strided((nr, nc, W), (L, C, 1), kb.storage_offset() + r0 * L + off + a * C).reshape(nr * nc, W)
    return qc[r0:r1, a:b].reshape(-1, C, D), win(kp), win(vp), zc[r0:r1, a:b].reshape(-1, C), kbw


def _take(piece: _EncoderPiece, x: torch.Tensor) -> torch.Tensor:
    """Per-chunk rows of x (BH, nC, C, ...) for the piece's problems → (n, C, ...)."""
    if piece.kind == "gather":
        return x[piece.where]
    r0, r1, a, b = piece.where
    return x[r0:r1, a:b].reshape(-1, *x.shape[2:])


def _store(piece: _EncoderPiece, dst: torch.Tensor, val: torch.Tensor) -> None:
    if piece.kind == "gather":
        dst[piece.where] = val
        return
    r0, r1, a, b = piece.where
    dst[r0:r1, a:b] = val.view(r1 - r0, b - a, *val.shape[1:])


def _fold_windows(piece: _EncoderPiece, dst: torch.Tensor, g: torch.Tensor, Emax: int, C: int, L: int) -> None:
    """Add window gradients g (n, W, D) back onto the keys dst (BH, L + C, D)."""
    W, D = g.shape[1:]
    if piece.kind == "gather":
        rows = _window_rows(piece, Emax, C, L + C)
        dst.view(-1, D).index_add_(0, rows.reshape(-1), g.reshape(-1, D))
        return
    r0, r1, a, b = piece.where
    nr, nc = r1 - r0, b - a
    g = g.view(nr, nc, W, D)
    for u in range(0, W, C):
        p0, w = Emax - piece.E + a * C + u, min(C, W - u)
        dst[r0:r1, p0:p0 + nc * C].view(nr, nc, C, D)[:, :, :w].add_(g[:, :, u:u + w])


def _ramp_parts(zs: torch.Tensor, dist: torch.Tensor, ramp: float, hard: bool, E: int, C: int) -> list:
    """m where it can be < 1: [(column slice, m (n, C, w))]. Window column j of a chunk holds keys at
    distance |i + E − j| from query i; a column farther than the piece's shortest span from some query of
    the chunk carries the ramp (or the cut). Those are a left and a right band of the window, unless the
    spans are shorter than the chunk, when the whole window does."""
    W = dist.shape[-1]
    zmin = float(zs.min())
    left = max(0, min(W, math.ceil(E + C - 1 - zmin)))  # columns j < left: max_i d_ij > zmin
    right = max(0, min(W, math.floor(E + zmin) + 1))  # columns j ≥ right: likewise
    if left >= right:
        return [(slice(0, W), ramp_weights(zs, dist, ramp, hard))]
    parts = []
    for cols in (slice(0, left), slice(right, W)):
        if cols.stop > cols.start:
            parts.append((cols, ramp_weights(zs, dist[:, cols], ramp, hard)))
    return parts


def _softmax_(S: torch.Tensor, parts: list, visible_max: bool) -> torch.Tensor | None:
    """S ← softmax(S + log m) in place as m·exp(S − max)/Σ (m from `_ramp_parts`); returns each row's
    log-sum-exp (n, C, 1), or None when the visible terms underflowed against an invisible key's score
    (the caller redoes the tile with `visible_max`)."""
    if visible_max:
        for cols, m in parts:
            S[..., cols].masked_fill_(m == 0, NEG_INF)
    mx = S.amax(-1, keepdim=True)
    S.sub_(mx).exp_()
    for cols, m in parts:
        S[..., cols].mul_(m)
    total = S.sum(-1, keepdim=True)
    if not visible_max and bool((total < 1e-30).any()):
        return None
    S.div_(total)
    return total.log_().add_(mx)


def band_symmetric_span_attention(q, k, v, z, ramp: float, hard: bool = False,
                                  key_padding_mask: torch.Tensor | None = None, chunk: int = 64,
                                  keep_scores: bool | None = None) -> torch.Tensor:
    """CPU band kernel for encoders. q, k, v: (B, H, T, D); z (B|1, H|1, T|1) spans (gradients summed back to
    its shape); key_padding_mask (B, T) bool, True = real token; keep_scores as in `band_span_attention`."""
    B, H, T, _ = q.shape
    if z.dim() != 3:
        raise ValueError(f"z must be 3-d (B|1, H|1, T|1), got {tuple(z.shape)}")
    zf = Expand.apply(z.to(compute_dtype(q.dtype)), (B, H, T))
    return _SymmetricBand.apply(q, k, v, zf, key_padding_mask, float(ramp), hard, chunk, keep_scores)


def symmetric_span_attention(q, k, v, z, ramp: float, hard: bool = False,
                             key_padding_mask: torch.Tensor | None = None, impl: str = "auto",
                             chunk: int = 64) -> torch.Tensor:
    """Encoder span attention: the band kernel or the masked SDPA, as `plan()` decides for `impl` (one of
    `SPAN_IMPLS`: auto takes the band off CUDA when the spans leave a good part of the sequence out)."""
    T = q.shape[-2]
    p = plan(impl, z, T, T, device=q.device, dtype=q.dtype, causal=False, ramp=ramp, hard=hard, chunk=chunk)
    if p.kernel == "band":
        return band_symmetric_span_attention(q, k, v, z, ramp, hard, key_padding_mask, chunk)
    if p.kernel == "masked":
        return reference_symmetric_span_attention(q, k, v, z, ramp, hard, key_padding_mask)
    raise ValueError(f"plan() chose {p.kernel!r}, which the encoder's span attention does not run")
