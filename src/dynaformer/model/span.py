"""Attention span per head (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers").

A query at distance d = i − j ≥ 0 from a key weights it by m(d) = clamp((R + z − d)/R, 0, 1) (kernels/span.py):
- `fixed`:    a hard sliding window of w keys (z = w − 1, no ramp).
- `per_head`: z_h = S·σ(a_h), one learned span per head.
- `dynamic`:  z_{t,h} = S·σ(a_h + v_hᵀx_t), predicted from the token's own (normed) input, so it is causal and
              the KV cache stays valid. v starts at zero, so every head starts at span_init.
S may grow linearly from `span_max_start` to `span_max` over training (τ = progress; frozen at inference).
Learned kinds add an L1 penalty on the span *as the kernels pay for it*: per tile of queries the largest
reach z + R, rounded up to the tile (straight-through), averaged over heads and tiles.

Every kind offers what `SpanModule` writes down and is listed in `SPANS` (its name is also a `SpanKind` of
the config): adding a kind touches this module and the config. The relatives `fox` (Forgetting Transformer)
and `sink_window` (StreamingLLM) live in model/span_relatives.py.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import SpanPredictor, keys_reached
from .config import ModelConfig
from .context import ForwardContext
from .span_relatives import ForgetSpan, SinkWindowSpan


@runtime_checkable
class SpanModule(Protocol):
    """What a span kind offers the attention layer (the spans and how the kernels read them), the KV cache
    (how far back any query can see) and the statistics."""

    hard: bool  # m(d) = [d ≤ z]: a hard window without ramp or span gradient; else the soft ramp of width R
    ramp: float  # R

    def __call__(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) the attention input → spans z in tokens (fp32), (1, H, 1) per head or (B, H, T) per
        token and head. May add a penalty to ctx.outputs.aux_losses in training."""
        ...

    def reach(self, progress: float) -> list[int]:
        """Per head: how many keys back (counting the query itself) any query can see at training progress τ."""
        ...

    # Optional: `decode_spans(ctx) -> Tensor | SpanPredictor`, the spans of a one-token decoding step without
    # autograd: (1, H) fp32 where they do not depend on the token (kept between steps: decoding pays per op),
    # else how the compiled step predicts them from it (kernels/decode.py). A kind without it (the relatives,
    # which attend themselves) decodes with tensor ops.


def _reach(z: torch.Tensor, ramp: float, hard: bool) -> list[int]:
    """Per head keys reached (kernels/reach.py) by the largest spans z (H,), in float64 (exact for fp32 z)."""
    return [int(r) for r in keys_reached(z.double(), ramp, hard)]


class FixedSpan(nn.Module):
    """A hard sliding window of `span_window` keys (the query itself included): z = w − 1, no ramp, no loss."""

    hard = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head, self.window, self.ramp = cfg.n_head, cfg.span_window, 1.0
        self._z: torch.Tensor | None = None  # decode_spans' (1, H)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) → spans z (1, H, 1) in tokens."""
        return x.new_full((1, self.n_head, 1), float(self.window - 1), dtype=torch.float32)

    def reach(self, progress: float) -> list[int]:
        """Per head: how many keys back (counting the query itself) any future query can see (the window:
        ⌊w − 1⌋ + 1); it does not depend on training progress."""
        return _reach(torch.full((self.n_head,), float(self.window - 1)), self.ramp, self.hard)

    def decode_spans(self, ctx: ForwardContext) -> torch.Tensor:
        z = getattr(self, "_z", None)
        if z is None or z.device != ctx.progress.device:
            z = self._z = torch.full((1, self.n_head), float(self.window - 1), device=ctx.progress.device)
        return z


class LearnedSpan(nn.Module):
    """A learned soft span: one per head (z_h = S·σ(a_h)) or predicted per token (dynamic), with its L1 penalty."""

    hard = False

    def __init__(self, cfg: ModelConfig, dynamic: bool) -> None:
        super().__init__()
        self.n_head, self.ramp, self.tile = cfg.n_head, float(cfg.span_ramp), cfg.span_tile
        self.s_max, self.s_start = float(cfg.span_max), float(cfg.span_max_start or cfg.span_max)
        self.penalty = cfg.span_penalty
        frac = cfg.span_init / self.s_start  # validate() keeps it in (0, 1)
        self.a = nn.Parameter(torch.full((cfg.n_head,), math.log(frac / (1 - frac))))
        self.a.no_weight_decay = True
        self.v = None
        if dynamic:
            self.v = nn.Parameter(torch.zeros(cfg.n_head, cfg.d_model))  # zero: spans start at span_init
            self.v.keep_init = True  # Transformer.reset_parameters leaves it at zero
        self._decode: tuple | None = None  # decode_spans' answer and what it was computed from

    def max_span(self, progress: torch.Tensor | float) -> torch.Tensor | float:
        if self.s_start == self.s_max:
            return self.s_max
        return self.s_start + (self.s_max - self.s_start) * progress

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """x: (B, T, C) the attention input → spans z in tokens, (1, H, 1) per head or (B, H, T) dynamic.
        Training adds the span penalty to ctx.outputs.aux_losses."""
        S = self.s_max if self.s_start == self.s_max else self.max_span(ctx.progress.float())
        a = _f32(self.a)
        if self.v is None:
            z = (S * torch.sigmoid(a)).view(1, -1, 1)
        else:  # spans in fp32 whatever the model's dtype; a as the linear's bias: one op for a·1 + x vᵀ
            z = S * torch.sigmoid(F.linear(_f32(x), _f32(self.v), a).transpose(1, 2))  # (B, H, T)
        if self.training and self.penalty > 0:
            ctx.outputs.aux_losses.append(self.penalty * paid_span(z, self.ramp, self.tile).mean())
        return z

    def decode_spans(self, ctx: ForwardContext) -> torch.Tensor | SpanPredictor:
        key = (ctx.progress._version, self.a._version, None if self.v is None else self.v._version,
               ctx.progress.device)
        cached = getattr(self, "_decode", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        S = self.s_max if self.s_start == self.s_max else float(self.max_span(float(ctx.progress)))
        a = _f32(self.a.detach())
        if self.v is None:
            out = (S * torch.sigmoid(a)).view(1, -1)
        else:
            out = SpanPredictor(_f32(self.v.detach()).contiguous(), a.contiguous(), S)
        self._decode = (key, out)
        return out

    def _apply(self, fn, *args, **kwargs):
        """.to(), .double(), ... replace parameter storage: drop the spans kept for decoding."""
        self._decode = None
        return super()._apply(fn, *args, **kwargs)

    def reach(self, progress: float) -> list[int]:
        """Per head: how many keys back (counting the query itself) any future query can see."""
        S = float(self.max_span(progress))
        if self.v is None:
            return _reach(S * torch.sigmoid(self.a.detach().float()), self.ramp, self.hard)
        return _reach(torch.full((self.n_head,), S, dtype=torch.float64), self.ramp, self.hard)  # content decides


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()  # (no call when it already is: decoding pays per op)


def paid_span(z: torch.Tensor, ramp: float, tile: int) -> torch.Tensor:
    """Reach z + R, maximised over each tile of `tile` queries and rounded up to the tile (straight-through
    gradient): the keys the band kernel touches for that tile. z (B|1, H, T|1) → (B|1, H, ⌈T/tile⌉)."""
    reach = z + ramp
    if reach.shape[-1] > 1:
        T = reach.shape[-1]
        reach = F.pad(reach, (0, -T % tile), value=0.0).unflatten(-1, (-1, tile)).amax(-1)
    return reach + (torch.ceil(reach.detach() / tile) * tile - reach.detach())


class PerHeadSpan(LearnedSpan):
    """z_h = S·σ(a_h): one learned span per head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, dynamic=False)


class DynamicSpan(LearnedSpan):
    """z_{t,h} = S·σ(a_h + v_hᵀx_t): a span per token and head, predicted from the token's own input."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg, dynamic=True)


# Every span kind but "none" (dense attention, no module): config name → module class. The relatives
# (model/span_relatives.py) attend themselves (`attend`) and bring their own KV cache (`new_layer_cache`).
SPANS: dict[str, type[nn.Module]] = {
    "fixed": FixedSpan,
    "per_head": PerHeadSpan,
    "dynamic": DynamicSpan,
    "fox": ForgetSpan,
    "sink_window": SinkWindowSpan,
}


def causal_only(kind: str) -> bool:
    """Whether a span kind exists only for causal models (the config refuses it for encoders)."""
    return kind in SPANS and getattr(SPANS[kind], "causal_only", False)


def learns_span(kind: str) -> bool:
    """Whether a span kind learns its spans (and so has a trained reach to match): the LearnedSpan kinds."""
    return kind in SPANS and issubclass(SPANS[kind], LearnedSpan)


def make_span(cfg: ModelConfig) -> SpanModule | None:
    """The span module of one attention layer, None for dense attention (span: none)."""
    return None if cfg.span == "none" else SPANS[cfg.span](cfg)


def span_cache_bound(span: SpanModule | None, progress: float, slack: int = 1) -> list[int] | None:
    """Per-head number of keys a span-bounded KV cache keeps (reach + slack), None for dense attention."""
    if span is None:
        return None
    return [r + slack for r in span.reach(progress)]
