"""The span family's relatives: other ways to choose which keys a query reads, as span kinds of model/span.py.

- `fox` (`ForgetSpan`): the Forgetting Transformer (Lin et al., ICLR 2025, arXiv 2503.02130). A forget gate per
  head and token, f_t = σ(w_hᵀx_t + b_h) from the attention input, adds the decay Σ_{l=j+1}^{i} log f_l to the
  logits; adaptive computation pruning (Lin et al. 2025, arXiv 2504.06949) skips the keys decayed by more
  than `fox_prune` nats, which become a hard span per query and token for the span kernels (kernels/fox.py).
  Its cache is unbounded: with pruning the reach depends on the gates, without it every key is read.
  Init: w from the model's N(0, init_std); b_h spread evenly over [2, 6] across heads (f from 0.88 to
  0.9975 per token: from a reach of ~130 tokens at 16 nats to beyond the context; our choice, a spread of
  decay rates as ALiBi's slopes, so that the model does not start forgetting everything after a few tokens).
- `sink_window` (`SinkWindowSpan`): StreamingLLM (Xiao et al., ICLR 2024): a sliding window of `span_window`
  keys plus the row's first `sink_tokens` tokens, always visible; `sink_logits` adds a learned logit per head
  to every softmax's denominator (gpt-oss, 2025), starting at 0. Its cache holds W + n keys (kernels/sink.py).

Both are causal (the config refuses them for encoders) and attend themselves (`attend`), executing the kernel
the planner picks; `__call__` gives the spans of a forward without cache, as every span kind does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import keys_reached, span_attention
from ..kernels.fox import augment, pruned_spans
from ..kernels.sink import sink_window_attention
from .cache_relatives import DecayLayerCache, SinkLayerCache
from .config import ModelConfig
from .context import ForwardContext

COVER = 2.0**30  # a span past any sequence (a constant: an exported graph must not specialise on the length)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


class ForgetSpan(nn.Module):
    """FoX: decay bias from per-head forget gates, optional pruning into hard spans (module doc)."""

    hard = True
    ramp = 1.0
    causal_only = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.prune = cfg.n_head, float(cfg.fox_prune)
        self.fgate = nn.Linear(cfg.d_model, cfg.n_head, bias=True)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(2.0, 6.0, cfg.n_head) if cfg.n_head > 1 else torch.full((1,), 4.0))
        self.fgate.bias.no_weight_decay = True

    def log_forget(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) → log f (B, H, T) fp32, f = σ(wᵀx + b)."""
        return F.logsigmoid(F.linear(_f32(x), _f32(self.fgate.weight), _f32(self.fgate.bias))).transpose(1, 2)

    def _spans(self, u_keys: torch.Tensor, u_q: torch.Tensor) -> torch.Tensor:
        if self.prune > 0:
            return pruned_spans(u_keys, u_q, self.prune)
        return u_q.new_full((1, self.n_head, 1), COVER)  # every key: dense

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The spans z of a forward without cache: (B, H, T) pruned hard spans, or (1, H, 1) covering every key."""
        u = -self.log_forget(x).cumsum(-1)
        return self._spans(u, u)

    def reach(self, progress: float) -> list[int]:
        """Unbounded: which keys survive pruning depends on the gates (a huge reach: nothing is dropped)."""
        return [2**62] * self.n_head

    def new_layer_cache(self, batch: int, max_len: int, head_dim: int, dtype, device) -> DecayLayerCache:
        return DecayLayerCache(batch, self.n_head, max_len, head_dim, device)

    def attend(self, q, k, v, x, ctx: ForwardContext, layer_idx: int, impl: str) -> torch.Tensor:
        """q, k, v (B, H, T, D) rotated, x (B, T, C) the attention input → (B, H, T, D)."""
        D = q.shape[-1]
        with torch.autocast(q.device.type, enabled=False):  # the decay column needs fp32 (kernels/fox.py)
            step = -self.log_forget(x)  # (B, H, T) ≥ 0
            cache = ctx.cache.layers[layer_idx] if ctx.cache is not None else None
            u = step.cumsum(-1) + (cache.last_decay() if cache is not None else 0.0)
            qa, ka, va = augment(q, k, v, u)
            if cache is not None:
                (_, ka, va), = cache.append(ka, va)
            z = self._spans(ka[..., -1] if cache is not None else u, u)
            ctx.outputs.spans[layer_idx] = z
            y = span_attention(qa, ka, va, z, 1.0, True, ctx.key_padding_mask, impl=impl)
        return y[..., :D].to(q.dtype)


class SinkWindowSpan(nn.Module):
    """StreamingLLM: a window of W keys plus the first n tokens, optional learned sink logits (module doc)."""

    hard = True
    ramp = 1.0
    causal_only = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.window, self.n_sink = cfg.n_head, cfg.span_window, cfg.sink_tokens
        self.sink_logit = nn.Parameter(torch.zeros(cfg.n_head)) if cfg.sink_logits else None
        if self.sink_logit is not None:
            self.sink_logit.no_weight_decay = True

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The window part's span: z = W − 1 (1, H, 1), hard."""
        return x.new_full((1, self.n_head, 1), float(self.window - 1), dtype=torch.float32)

    def reach(self, progress: float) -> list[int]:
        """The window (the sinks are kept apart by the cache)."""
        z = torch.full((self.n_head,), float(self.window - 1), dtype=torch.float64)
        return [int(r) for r in keys_reached(z, self.ramp, self.hard)]

    def new_layer_cache(self, batch: int, max_len: int, head_dim: int, dtype, device) -> SinkLayerCache:
        return SinkLayerCache(batch, self.n_head, self.window, self.n_sink, head_dim, dtype, device)

    def attend(self, q, k, v, x, ctx: ForwardContext, layer_idx: int, impl: str) -> torch.Tensor:
        """q, k, v (B, H, T, D) rotated, x (B, T, C) the attention input → (B, H, T, D)."""
        T = q.shape[-2]
        km = ctx.key_padding_mask
        ctx.outputs.spans[layer_idx] = self(x, ctx)
        extra_k = extra_v = None
        if ctx.cache is not None:
            layer = ctx.cache.layers[layer_idx]
            (_, k, v), = layer.append(k, v, None if km is None else km[:, -T:])
            extra_k, extra_v = layer.sinks()
        Tk, L = k.shape[-2], ctx.start + T
        if km is None:  # positions count from each row's first real token
            q_pos = torch.arange(ctx.start, L, device=q.device)[None]
            k_pos = torch.arange(L - Tk, L, device=q.device)[None]
        else:
            q_pos, k_pos = ctx.pos, (km.long().cumsum(1) - 1)[:, -Tk:]
            km = km[:, -Tk:]
        return sink_window_attention(q, k, v, q_pos, k_pos, self.window, self.n_sink, self.sink_logit, km,
                                     extra_k, extra_v, impl=impl)
