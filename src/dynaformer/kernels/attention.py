"""Dense causal attention over SDPA, with the query block placed at the end of the keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """q: (B, H, Tq, D); k, v: (B, H, Tk, D) with Tk ≥ Tq, the queries being the last Tq positions.

    Returns (B, H, Tq, D). SDPA's `is_causal` aligns the mask top-left, so it is only right when
    Tq == Tk; a single decoding query needs no mask; other cases (prefill after a cached prefix)
    get an explicit bottom-right aligned mask.
    """
    Tq, Tk = q.shape[-2], k.shape[-2]
    if Tq == Tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    if Tq == 1:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    offset = Tk - Tq
    i = torch.arange(Tq, device=q.device)[:, None] + offset
    j = torch.arange(Tk, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i, dropout_p=dropout_p)


def bidirectional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            key_padding_mask: torch.Tensor | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """Encoder attention: every query sees every non-padding key (and its own, so that padding queries
    have a row too; their outputs are never read). key_padding_mask: (B, T) bool, True = real token."""
    mask = None
    if key_padding_mask is not None:
        eye = torch.eye(q.shape[-2], dtype=torch.bool, device=q.device)
        mask = key_padding_mask[:, None, None, :] | eye  # (B, 1, T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
