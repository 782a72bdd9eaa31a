"""Span attention: causal attention in which query i of head h sees key j through the soft span mask of
adaptive span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers"):

    d = i − j ≥ 0,   m(d) = clamp((R + z − d) / R, 0, 1),   attention ∝ m(d)·exp(score) = exp(score + log m)

z is a span in tokens, per head (B|1, H, 1) or per query and head (B, H, Tq); R is the ramp width. A hard
window (`hard=True`) uses m(d) = [d ≤ z] and has no span gradient. Query i sits at key position i + o with
o = Tk − Tq (the queries are the last Tq keys, as with a KV cache).

Implementations (`span_attention` picks one):
- `reference_span_attention`: dense scores + log m, O(Tq·Tk). For tests only.
- `band_span_attention`: the CPU fast path. Queries are cut into chunks of C; for each (batch, head,
  chunk) only the keys inside that chunk's largest reach *for that head* are touched. Those keys split
  into *full* columns (inside every query's span and causal: no mask at all) and *partial* columns (the
  ramp edge at the far end and the causal diagonal chunk), each run through the fused CPU flash kernel
  and merged by their log-sum-exps. Problems with the same key window share one batched kernel call.
  The span gradient is computed only over the ramp columns:
      ∂L/∂b_ij = P_ij·(dO_i·v_j − dO_i·O_i),  P_ij = exp(s_ij + b_ij − lse_i),  ∂b_ij/∂z_i = 1/(R + z_i − d_ij).
- `flex_span_attention` (GPU): FlexAttention with a block mask from kv-tile indices and the ramp in
  score_mod. UNVERIFIED: written without a GPU; guarded to CUDA.
- dense causal SDPA when every query's span covers all its keys (the mask is then identically 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
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
                             hard: bool = False) -> torch.Tensor:
    """Slow dense reference. q: (B, H, Tq, D); k, v: (B, H, Tk, D); z broadcastable to (B, H, Tq)."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    bias = span_log_mask(_distances(Tq, Tk, q.device), z.unsqueeze(-1), ramp, hard)
    return torch.softmax(scores + bias, dim=-1) @ v


def symmetric_span_attention(q, k, v, z, ramp: float, hard: bool = False,
                             key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Encoder span attention: a key at distance d = |i − j| on either side gets the same soft ramp.
    q, k, v: (B, H, T, D); z broadcastable to (B, H, T); key_padding_mask (B, T) bool, True = real token.
    Dense masked SDPA (differentiable in z); the band kernel covers the causal side only so far."""
    T = q.shape[-2]
    bias = span_log_mask(_distances(T, T, q.device).abs(), z.unsqueeze(-1), ramp, hard).to(q.dtype)  # (B, H, T, T)
    if key_padding_mask is not None:
        # Padding keys are hidden; each query keeps its own key, so no row is empty (no NaN at padding queries).
        keep = key_padding_mask[:, None, None, :] | torch.eye(T, dtype=torch.bool, device=q.device)
        bias = bias.masked_fill(~keep, NEG_INF)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def masked_sdpa_span_attention(q, k, v, z, ramp: float, hard: bool = False) -> torch.Tensor:
    """SDPA with the span as a float mask: fine for short sequences and single decoding steps."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    bias = span_log_mask(_distances(Tq, Tk, q.device), z.unsqueeze(-1), ramp, hard).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def decode_span_attention(q, k, v, z, ramp: float, hard: bool = False) -> torch.Tensor:
    """Few queries (decoding), no autograd: the span bias in four small ops, then scores → softmax → values
    with batched matmuls (cheaper than a fused kernel's thread fan-out for a handful of queries)."""
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    d = _distances(Tq, Tk, q.device)  # (Tq, Tk)
    zz = z.float().expand(B, H, Tq).unsqueeze(-1)
    if hard:
        bias = torch.sub(zz.floor() + 1, d).clamp_(0.0, 1.0).log_()
    else:
        bias = torch.sub((zz + ramp) / ramp, d / ramp).clamp_(0.0, 1.0).log_()
    if Tq > 1:
        bias.masked_fill_(d < 0, NEG_INF)  # the future
    scores = torch.baddbmm(bias.to(q.dtype).reshape(B * H, Tq, Tk), q.reshape(B * H, Tq, D),
                           k.reshape(B * H, Tk, D).transpose(1, 2), alpha=1.0 / math.sqrt(D))
    return torch.bmm(scores.softmax(-1), v.reshape(B * H, Tk, D)).view(B, H, Tq, D)


def span_covers_all(z: torch.Tensor, Tq: int, Tk: int) -> bool:
    """True when every query sees all its causal keys with weight 1 (z_i ≥ i + o): the mask is a no-op."""
    pos = torch.arange(Tq, device=z.device, dtype=z.dtype) + (Tk - Tq)
    return bool((z >= pos).all())


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


def _band_mask(zg: torch.Tensor, d_over_r: torch.Tensor, ramp: float, hard: bool) -> torch.Tensor:
    """log m: zg (..., C) spans, d_over_r (C, W) distances / R → (..., C, W). Three passes:
    m = clamp((z + R − d)/R, 0, 1), then log (log 0 = −inf). A hard window is the ramp with R = 1, z = ⌊z⌋
    (the caller floors z). Causality is added by the caller."""
    zr = (zg + 1) if hard else (zg + ramp) / ramp
    return torch.sub(zr.unsqueeze(-1), d_over_r).clamp_(0.0, 1.0).log_()


def _merge(parts):
    """Merge (out, lse) of attention over disjoint key sets: out = Σ exp(lse_p − lse) out_p."""
    if len(parts) == 1:
        return parts[0]
    lse = parts[0][1]
    for _, l in parts[1:]:
        lse = torch.logaddexp(lse, l)
    out = None
    for o, l in parts:
        w = (l - lse).exp_().unsqueeze(-1)
        t = o.mul_(w)
        if bool((l == NEG_INF).any()):  # a row with no key in this part: its output is undefined (NaN)
            t = torch.where(w > 0, t, 0.0)
        out = t if out is None else out.add_(t)
    return out, lse


class _BandSpanAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, z, ramp: float, hard: bool, chunk: int, box_waste: float):
        B, H, Tq, D = q.shape
        Tk = k.shape[-2]
        C, BH, o = chunk, B * H, Tk - Tq
        nC = -(-Tq // C)
        pad = nC * C - Tq
        Tkp = Tk + pad
        scale = 1.0 / math.sqrt(D)
        r = 1.0 if hard else ramp
        zd = z.detach()
        sets, _ = band_plan(zd, Tq, Tk, ramp, hard, C, box_waste)
        qc = F.pad(q, (0, 0, 0, pad)).reshape(BH, nC, C, D)
        kp = F.pad(k, (0, 0, 0, pad)).reshape(BH, Tkp, D)
        vp = F.pad(v, (0, 0, 0, pad)).reshape(BH, Tkp, D)
        zc = F.pad(zd.reshape(BH, Tq), (0, pad), value=0.0).view(BH, nC, C)
        if hard:
            zc = zc.floor()
        out = q.new_empty(BH, nC, C, D)
        ci = torch.arange(C, device=q.device, dtype=q.dtype)
        causal = torch.zeros(C, C, dtype=q.dtype, device=q.device).masked_fill_(
            torch.ones(C, C, dtype=torch.bool, device=q.device).triu_(1), NEG_INF)
        d_diag = (ci[:, None] - ci[None, :]) / r
        saved = []
        for kind, where, E, Wr, in_diag, const in sets:
            if kind == "box":
                r0, r1, cs = where
                nr, nc = r1 - r0, nC - cs
                Qs = qc[r0:r1, cs:]  # (nr, nc, C, D) view
                zs = zc[r0:r1, cs:]

                def window(x, off, width, r0=r0, cs=cs, nr=nr, nc=nc):
                    # keys o + cC − off .. + width for chunks c ≥ cs: overlapping strided view, no copy
                    return x.as_strided((nr, nc, width, D), (Tkp * D, C * D, D, 1),
                                        x.storage_offset() + (r0 * Tkp + o + cs * C - off) * D)
            else:
                idx = where
                rr, cc = idx[:, 0], idx[:, 1]
                Qs = qc[rr, cc].unsqueeze(1)  # (n, 1, C, D)
                zs = zc[rr, cc].unsqueeze(1)
                start = rr * Tkp + o + cc * C  # flat row of each chunk's first query position

                def window(x, off, width, start=start):
                    rows_ = start[:, None] - off + torch.arange(width, device=x.device)
                    return x.reshape(-1, D)[rows_].unsqueeze(1)
            parts, res = [], []
            if Wr > 0:  # ramp columns [c0 − E, c0 − E + Wr): masked
                # contiguous copies (small: Wr keys per chunk) so the span gradient can use plain batched GEMMs
                Kr, Vr = window(kp, E, Wr).contiguous(), window(vp, E, Wr).contiguous()
                d_f = (ci[:, None] + E - torch.arange(Wr, device=q.device, dtype=q.dtype)[None, :]) / r
                zz = zs[:, :1] if (kind == "box" and const) else zs
                mask_r = _band_mask(zz, d_f, r, hard).expand(*Qs.shape[:2], C, Wr)  # (n, nc, C, Wr)
                o_r, l_r = _FLASH(Qs, Kr, Vr, attn_mask=mask_r, scale=scale)
                if in_diag:  # rows whose span ends inside their own chunk see no far key: the kernel then
                    # returns lse = 0, not −inf; mark them so the merge ignores this part for them
                    l_r = l_r.masked_fill(ci + 1 > zs if hard else ci + 1 >= zs + ramp, NEG_INF)
                res.append((o_r, l_r))
                parts.append(("ramp", Kr, Vr, mask_r, False, E, Wr))
            if E > Wr:  # full columns [c0 − E + Wr, c0): inside every query's span, no mask at all
                Kf, Vf = window(kp, E - Wr, E - Wr), window(vp, E - Wr, E - Wr)
                res.append(_FLASH(Qs, Kf, Vf, scale=scale))
                parts.append(("full", Kf, Vf, None, False, E - Wr, 0))
            Kd, Vd = window(kp, 0, C), window(vp, 0, C)
            mask_d = None
            if in_diag:
                mask_d = _band_mask(zs, d_diag, r, hard).add_(causal)
            res.append(_FLASH(Qs, Kd, Vd, is_causal=mask_d is None, attn_mask=mask_d, scale=scale))
            parts.append(("diag", Kd, Vd, mask_d, mask_d is None, E, C if in_diag else 0))
            o_s, lse = _merge(res)
            if kind == "box":
                out[r0:r1, cs:] = o_s
            else:
                out[rr, cc] = o_s.squeeze(1)
            saved.append((kind, where, Qs, o_s, lse, parts))
        ctx.saved = saved
        ctx.meta = (B, H, Tq, Tk, D, C, nC, pad, ramp, hard, scale)
        ctx.z_shape = z.shape
        return out.view(B, H, nC * C, D)[:, :, :Tq]

    @staticmethod
    def backward(ctx, dout):
        B, H, Tq, Tk, D, C, nC, pad, ramp, hard, scale = ctx.meta
        BH, o, Tkp = B * H, Tk - Tq, Tk + pad
        doc = F.pad(dout, (0, 0, 0, pad)).reshape(BH, nC, C, D)
        dq = dout.new_empty(BH, nC, C, D)
        dk = dout.new_zeros(BH, Tkp, D)
        dv = dout.new_zeros(BH, Tkp, D)
        want_z = ctx.needs_input_grad[3] and not hard
        dz = dout.new_zeros(BH, nC, C, dtype=torch.float32) if want_z else None
        for kind, where, Qs, o_s, lse, parts in ctx.saved:
            if kind == "box":
                r0, r1, cs = where
                nr, nc = r1 - r0, nC - cs
                dOs = doc[r0:r1, cs:]
            else:
                rr, cc = where[:, 0], where[:, 1]
                dOs = doc[rr, cc].unsqueeze(1)
                start = rr * Tkp + o + cc * C
            dQs, dZs = None, None
            delta = None
            for name, Kx, Vx, mask, is_causal, E, Wg in parts:
                # With the merged output and lse, each part's backward yields exactly its share.
                gq, gk, gv = _FLASH_BWD(dOs, Qs, Kx, Vx, o_s, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
                dQs = gq if dQs is None else dQs.add_(gq)
                off, width = {"ramp": (E, Wg), "full": (E, E), "diag": (0, C)}[name]
                width = Kx.shape[-2]
                if kind == "box":
                    for u in range(0, width, C):  # fold the overlapping windows back, one key tile at a time
                        p0, w = o + cs * C - off + u, min(C, width - u)
                        dk[r0:r1, p0:p0 + nc * C].view(nr, nc, C, D)[:, :, :w].add_(gk[:, :, u:u + w])
                        dv[r0:r1, p0:p0 + nc * C].view(nr, nc, C, D)[:, :, :w].add_(gv[:, :, u:u + w])
                else:
                    flat = (start[:, None] - off + torch.arange(width, device=dout.device)).reshape(-1)
                    dk.view(-1, D).index_add_(0, flat, gk.reshape(-1, D))
                    dv.view(-1, D).index_add_(0, flat, gv.reshape(-1, D))
                if want_z and Wg > 0:
                    # ∂L/∂z_i = Σ_j P_ij (dO_i·v_j − δ_i)/(R m_ij) over the ramp (0 < m < 1); P/m = exp(s − lse)
                    if delta is None:
                        delta = (dOs.float() * o_s.float()).sum(-1, keepdim=True)
                    n1, n2 = Qs.shape[:2]
                    f32 = torch.float32  # (bf16 inputs: the span gradient is accumulated in fp32)
                    Q3, dO3 = Qs.reshape(n1 * n2, C, D).to(f32), dOs.reshape(n1 * n2, C, D).to(f32)
                    K3 = Kx[..., :Wg, :].reshape(n1 * n2, Wg, D).to(f32)
                    V3 = Vx[..., :Wg, :].reshape(n1 * n2, Wg, D).to(f32)
                    A = torch.baddbmm(-lse.reshape(n1 * n2, C, 1), Q3, K3.transpose(1, 2), alpha=scale).exp_()
                    A.mul_(torch.baddbmm(-delta.reshape(n1 * n2, C, 1), dO3, V3.transpose(1, 2)))
                    mr = mask[..., :Wg]
                    g = torch.where((mr < 0) & (mr > NEG_INF), A.view(n1, n2, C, Wg), 0.0).sum(-1)
                    dZs = g if dZs is None else dZs + g
            if kind == "box":
                dq[r0:r1, cs:] = dQs
                if dZs is not None:
                    dz[r0:r1, cs:] = dZs / ramp
            else:
                dq[rr, cc] = dQs.squeeze(1)
                if dZs is not None:
                    dz[rr, cc] = dZs.squeeze(1) / ramp
        dq = dq.view(B, H, nC * C, D)[:, :, :Tq]
        dk = dk.view(B, H, Tkp, D)[:, :, :Tk]
        dv = dv.view(B, H, Tkp, D)[:, :, :Tk]
        if dz is not None:
            dz = _sum_to(dz.view(B, H, nC * C)[:, :, :Tq], ctx.z_shape)
        return dq, dk, dv, dz, None, None, None, None


def _sum_to(g: torch.Tensor, shape) -> torch.Tensor:
    """Reduce a broadcast gradient back to `shape`."""
    dims = [i for i, (a, s) in enumerate(zip(g.shape, shape, strict=True)) if s == 1 and a != 1]
    return g.sum(dims, keepdim=True) if dims else g


def band_span_attention(q, k, v, z, ramp: float, hard: bool = False, chunk: int = 64, box_waste: float = 0.15):
    """CPU band kernel (see module doc). q: (B, H, Tq, D); k, v: (B, H, Tk, D); z broadcastable to (B, H, Tq)
    with size-1 dims kept as such (the span gradient is summed over them)."""
    B, H, Tq, _ = q.shape
    if z.dim() != 3:
        raise ValueError(f"z must be 3-d (B|1, H|1, Tq|1), got {tuple(z.shape)}")
    zf = z.to(torch.float32)
    # expand is a view; _BandSpanAttention reduces the gradient to z's own shape
    return _BandSpanAttention.apply(q, k, v, _Expand.apply(zf, (B, H, Tq)), float(ramp), hard, chunk, box_waste)


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
    """(query·key pairs the band kernel computes, pairs dense causal attention computes) for z (B, H, Tq)."""
    sets, E = band_plan(z.detach().float(), Tq, Tk, ramp, hard, chunk, box_waste)
    nC = E.shape[1]
    band = 0
    for kind, where, e, *_ in sets:
        n = (where[1] - where[0]) * (nC - where[2]) if kind == "box" else where.shape[0]
        band += n * (e + chunk) * chunk
    B, H = z.shape[:2]
    o = Tk - Tq
    dense = B * H * (Tq * o + Tq * (Tq + 1) // 2)
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

def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, z: torch.Tensor, ramp: float,
                   hard: bool = False, impl: str = "auto", chunk: int = 64) -> torch.Tensor:
    """Causal span attention; q: (B, H, Tq, D), k, v: (B, H, Tk, D), z: (B|1, H, Tq|1) spans in tokens.

    impl: auto | band | masked | dense | flex | reference. auto: dense SDPA when the spans cover every key
    (the mask is identically 1), FlexAttention on CUDA, the masked SDPA for short or single-step queries,
    else the CPU band kernel."""
    Tq, Tk = q.shape[-2], k.shape[-2]
    if impl == "auto" and Tq <= 16 and not (torch.is_grad_enabled() and (q.requires_grad or z.requires_grad)):
        return decode_span_attention(q, k, v, z, ramp, hard)
    if impl == "auto":
        if span_covers_all(z.detach(), Tq, Tk):
            impl = "dense"
        elif q.is_cuda:
            impl = "flex"
        elif Tq < chunk or Tk <= 2 * chunk:
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
