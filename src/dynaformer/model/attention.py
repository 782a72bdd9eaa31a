"""Multi-head self-attention, causal (decoder) or bidirectional (encoder): fused QKV, rotary positions, SDPA,
optional KV cache, optional span (model/span.py: fixed window, learned per head, or predicted per token;
kernels/span.py and kernels/span_symmetric.py compute it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import (
    SpanPredictor,
    bidirectional_attention,
    causal_attention,
    check_span_impl,
    decode_attention,
    span_attention,
    symmetric_span_attention,
)
from .config import ModelConfig
from .context import ForwardContext
from .layers import Rotary
from .ragged import RaggedCache
from .span import make_span
from .value_residual import ValueResidual


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: Rotary) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.rotary = rotary  # shared across layers; holds no parameters
        self.span = make_span(cfg)  # None: dense attention
        self.span_impl = cfg.span_impl
        # Value residual (model/value_residual.py): layer 0 hands its values on, later layers mix them in.
        self.value_mix = ValueResidual() if cfg.value_residual and layer_idx > 0 else None
        self.gives_values = cfg.value_residual and layer_idx == 0

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) the normed input → (B, T, C)."""
        B, T, C = x.shape
        if ctx.decoding:
            qkv, xs = F.linear(x, self.qkv.weight).view(B, 3 * C), x.view(B, C)
            if isinstance(ctx.cache, RaggedCache):  # each row at its own position against its own cache
                y = torch.cat([self._decode_step(qkv[b : b + 1], xs[b : b + 1], row.cache.layers[self.layer_idx],
                                                 row.start, ctx) for b, row in enumerate(ctx.cache.contexts(ctx))])
            else:
                y = self._decode_step(qkv, xs, ctx.cache.layers[self.layer_idx], ctx.start, ctx)
            return F.linear(y, self.proj.weight).view(B, 1, C)
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        q, k = self.rotary(qkv[:2], ctx.start, ctx.pos).unbind(0)  # rotate q and k in one pass; each (B, H, T, D)
        v = qkv[2]
        if self.value_mix is not None:
            v = self.value_mix(v, ctx.first_values)
        elif self.gives_values:
            ctx.first_values = v
        if isinstance(ctx.cache, RaggedCache):  # independent sequences: each row against its own cache
            y = torch.cat([self._attend(x[b : b + 1], q[b : b + 1], k[b : b + 1], v[b : b + 1], row)
                           for b, row in enumerate(ctx.cache.contexts(ctx))])
        else:
            y = self._attend(x, q, k, v, ctx)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def _attend(self, x, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        if self.span is None:
            return self._dense_attention(q, k, v, ctx)
        if hasattr(self.span, "attend"):  # the span relatives (model/span_relatives.py) run their own kernels
            return self.span.attend(q, k, v, x, ctx, self.layer_idx, self.span_impl)
        return self._span_attention(x, q, k, v, ctx)

    def _decode_step(self, qkv: torch.Tensor, x: torch.Tensor, layer, start: int, ctx: ForwardContext) -> torch.Tensor:
        """Rows of one token at position `start`, no padding, no autograd: qkv (b, 3C) the projection, x (b, C) the
        attention input; rotary, the cache write, the spans and attention in one compiled call (kernels/decode.py)
        → (b, C), the heads' outputs side by side."""
        z = predictor = None
        ramp, hard = 1.0, False
        if self.span is not None:
            spans = self.span.decode_spans(ctx)
            z, predictor = (None, spans) if isinstance(spans, SpanPredictor) else (spans, None)
            ramp, hard = self.span.ramp, self.span.hard
        cos, sin = self.rotary.half_tables(start + 1, x.device)
        y, z = decode_attention(qkv, cos, sin, start, layer.k_bufs, layer.v_bufs, layer.head_lists, layer.step(), z,
                                ramp, hard, predictor=predictor, x=x)
        if z is not None:
            ctx.outputs.spans[self.layer_idx] = z.unsqueeze(-1)  # (1|b, H, 1)
        return y

    def _dense_attention(self, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        if not ctx.causal:
            return bidirectional_attention(q, k, v, ctx.key_padding_mask, p)
        if ctx.cache is not None:  # a dense cache answers one group: every head, every key so far (B, H, L, D)
            (_, k, v), = ctx.cache.layers[self.layer_idx].append(k, v)
            k, v = _as(k, q), _as(v, q)
        return causal_attention(q, k, v, ctx.key_padding_mask, p)  # (B, H, T, D)

    def _span_attention(self, x, q, k, v, ctx: ForwardContext) -> torch.Tensor:
        """Span attention (no attention-probability dropout). With a span-bounded cache, each group of heads
        gets its own key window: only the keys those heads can still reach."""
        z = self.span(x, ctx)  # (1, H, 1) or (B, H, T) spans in tokens
        ctx.outputs.spans[self.layer_idx] = z.detach() if z.requires_grad else z
        impl, ramp, hard, km = self.span_impl, self.span.ramp, self.span.hard, ctx.key_padding_mask
        if not ctx.causal:  # encoder: the same ramp on both sides
            return symmetric_span_attention(q, k, v, z, ramp, hard, km, impl=impl)
        check_span_impl(impl, q)
        if ctx.cache is None:
            return span_attention(q, k, v, z, ramp, hard, km, impl=impl)
        groups = ctx.cache.layers[self.layer_idx].append(k, v)
        if len(groups) == 1:  # one bound for every head: no per-group split
            kg, vg = _as(groups[0].k, q), _as(groups[0].v, q)
            return span_attention(q, kg, vg, z, ramp, hard, _last_keys(km, kg.shape[-2]), impl=impl)
        y = torch.empty_like(q)
        for heads, kg, vg in groups:  # (B, G, L_g, D) each, ending at the newest position
            y[:, heads] = span_attention(q[:, heads], _as(kg, q), _as(vg, q), z[:, heads], ramp, hard,
                                         _last_keys(km, kg.shape[-2]), impl=impl)
        return y


def _as(t: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Cached keys or values in the queries' dtype (a bf16 cache under an fp32 model)."""
    return t if t.dtype == q.dtype else t.to(q.dtype)


def _last_keys(key_padding_mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The padding mask (B, n) of the last n keys, or None for an unpadded batch."""
    return None if key_padding_mask is None else key_padding_mask[:, -n:]
