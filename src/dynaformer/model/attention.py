"""Multi-head causal self-attention: fused QKV, rotary positions, SDPA, optional KV cache, optional span
(model/span.py: fixed window, learned per head, or predicted per token; kernels/span.py computes it)."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import (
    bidirectional_attention,
    causal_attention,
    check_span_impl,
    span_attention,
    symmetric_span_attention,
)
from .config import ModelConfig
from .context import ForwardContext
from .layers import Rotary
from .span import make_span


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: Rotary) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.rotary = rotary  # shared across layers; holds no parameters
        self.span = make_span(cfg)  # None: dense causal attention
        self.span_impl = cfg.span_impl

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(qkv[:2], ctx.start, ctx.pos).unbind(0)  # rotate q and k in one pass; each (B, H, T, D)
        v = qkv[2]
        if self.span is not None and not ctx.causal:  # encoder: the same ramp on both sides
            y = symmetric_span_attention(q, k, v, self.span(x, ctx), self.span.ramp, self.span.hard,
                                         ctx.key_padding_mask, impl=self.span_impl)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
        if self.span is not None:
            return self.proj(self._span_attention(x, q, k, v, ctx).transpose(1, 2).reshape(B, T, C))
        if ctx.cache is not None:
            k, v = ctx.cache.layers[self.layer_idx].append(k, v)  # (B, H, L, D), L = start + T
        p = self.dropout if self.training else 0.0
        if ctx.causal:
            y = causal_attention(q, k, v, p, key_mask=ctx.key_mask)  # (B, H, T, D)
        else:
            y = bidirectional_attention(q, k, v, ctx.key_padding_mask, p)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _span_attention(self, x, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        """Span attention (no attention-probability dropout). With a span-bounded cache, each group of heads
        gets its own key window: only the keys those heads can still reach."""
        check_span_impl(self.span_impl, q)
        z = self.span(x, ctx)  # (1, H, 1) or (B, H, T) spans in tokens
        impl, ramp, hard, km = self.span_impl, self.span.ramp, self.span.hard, ctx.key_mask

        def keys(n: int) -> torch.Tensor | None:  # the padding mask of the last n keys (B, n)
            return None if km is None else km[:, -n:]

        if ctx.cache is None:
            return span_attention(q, k, v, z, ramp, hard, impl=impl, key_mask=km)
        groups = ctx.cache.layers[self.layer_idx].append(k, v)
        if isinstance(groups, tuple):  # an unbounded cache: every key so far
            return span_attention(q, groups[0], groups[1], z, ramp, hard, impl=impl, key_mask=km)
        if len(groups) == 1:  # one bound for every head (dynamic spans): no per-group split
            kg = groups[0][1]
            return span_attention(q, kg, groups[0][2], z, ramp, hard, impl=impl, key_mask=keys(kg.shape[-2]))
        y = torch.empty_like(q)
        for heads, kg, vg in groups:  # (B, G, L_g, D) each, ending at the newest position
            y[:, heads] = span_attention(q[:, heads], kg, vg, z[:, heads], ramp, hard, impl=impl,
                                         key_mask=keys(kg.shape[-2]))
        return y
