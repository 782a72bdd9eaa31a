"""Span attention on GPU through FlexAttention (torch ≥ 2.5): a block mask built from kv-tile indices (full
tiles without mask_mod, partial tiles with it) and the ramp as a score_mod.

UNVERIFIED: written without a GPU. Its block mask and score_mod match the reference on CPU (eager
FlexAttention, forward only: tests/test_span.py), but the compiled GPU kernel, its backward and its speed
have not been run. `span_impl: auto` therefore never picks it: on CUDA auto runs the masked SDPA path, and
FlexAttention runs only when asked for by `span_impl: flex` (docs/design.md §4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reach import keys_reached

_FLEX_COMPILED = None


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
        reach = keys_reached(zp, ramp, hard)
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
