"""Dense attention over SDPA: causal (the query block placed at the end of the keys) and bidirectional.

Both take (q, k, v, key_padding_mask, dropout_p); key_padding_mask (B, Tk) bool, True = a real key."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk ≥ Tq, the queries being the last Tq positions.

    Returns (B, H, Tq, D). SDPA's `is_causal` aligns the mask top-left, so it is only right when
    Tq == Tk; a single decoding query needs no mask; other cases (prefill after a cached prefix)
    get an explicit bottom-right aligned mask. key_padding_mask (B, Tk) bool, True = a real key: padded keys
    are hidden from every query (see `padding_bias`).
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if key_padding_mask is not None:
        ok = padding_bias(key_padding_mask, Tq, Tk) == 0  # (B, 1, Tq, Tk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ok & _causal(Tq, Tk, q.device), dropout_p=dropout_p)
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal(Tq, Tk, q.device), dropout_p=dropout_p)


def _causal(Tq: int, Tk: int, device: torch.device) -> torch.Tensor:
    """(Tq, Tk) bool, bottom-right aligned: query i (key position i + Tk − Tq) sees keys j ≤ i + Tk − Tq."""
    i = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)
    return torch.arange(Tk, device=device)[None, :] <= i


def padding_bias(key_padding_mask: torch.Tensor, Tq: int, Tk: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, 1, Tq, Tk) additive mask: 0 for real keys, −inf for padded ones. Each query keeps its own key (the
    diagonal), so a padding query, whose output is never read, still has a finite row instead of NaN.
    key_padding_mask: (B, Tk) bool, True = a real token; the queries are the last Tq keys."""
    i = torch.arange(Tq, device=key_padding_mask.device)[:, None] + (Tk - Tq)
    own = torch.arange(Tk, device=key_padding_mask.device)[None, :] == i  # (Tq, Tk)
    ok = key_padding_mask[:, None, None, :] | own
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, float("-inf"))


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Encoder attention: every query sees every non-padding key (and its own, so that padding queries
    have a row too; their outputs are never read). key_padding_mask: (B, T) bool, True = real token."""
    mask = None
    if key_padding_mask is not None:
        eye = torch.eye(q.shape[-2], dtype=torch.bool, device=q.device)
        mask = key_padding_mask[:, None, None, :] | eye  # (B, 1, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
