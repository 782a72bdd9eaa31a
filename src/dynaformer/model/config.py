"""`ModelConfig`: the one config that flows into every module of the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

ResidualKind = Literal["prenorm"]
SpanKind = Literal["none", "fixed", "per_head", "dynamic"]


@dataclass
class ModelConfig:
    vocab_size: int = 256
    context_len: int = 256  # training context; generation may go further (rotary positions extrapolate)
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int | None = None  # None: 4·d_model for gelu, ≈ 8/3·d_model (rounded up to 32) for swiglu
    mlp: Literal["gelu", "swiglu"] = "gelu"
    rope_base: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dropout: float = 0.0
    tie_embeddings: bool = True
    causal: bool = True  # False: a bidirectional encoder (masked-LM pretraining, classification)
    residual: ResidualKind = "prenorm"
    span: SpanKind = "none"
    # Attention span (model/span.py; adaptive span, Sukhbaatar et al. 2019). Distances d = i − j ≥ 0.
    span_window: int = 256  # fixed: each query sees its last span_window keys (itself included)
    span_max: int = 256  # S: the largest learned span z (tokens); per_head z_h = S·σ(a_h), dynamic S·σ(a_h + v_hᵀx_t)
    span_ramp: int = 32  # R: soft mask m(d) = clamp((R + z − d)/R, 0, 1)
    span_init: float = 32.0  # initial span of the learned kinds (tokens; v starts at zero)
    span_penalty: float = 2e-5  # weight of the L1 penalty on the tile-quantised span (per layer, in tokens)
    span_tile: int = 64  # the penalty charges spans rounded up to this tile (what the kernels pay for)
    span_max_start: int | None = None  # growth: the max span rises linearly from this to span_max over training
    span_impl: Literal["auto", "band", "masked", "reference", "flex"] = "auto"  # kernel (auto: see kernels/span.py)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ff_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "swiglu":
            return 32 * -(-(8 * self.d_model // 3) // 32)
        return 4 * self.d_model

    def validate(self) -> None:
        for name in ("vocab_size", "context_len", "n_layer", "n_head", "d_model"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be > 0, got {getattr(self, name)}")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ConfigError(f"model.d_ff: must be > 0, got {self.d_ff}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.n_head: {self.n_head} heads do not divide d_model={self.d_model}")
        if self.head_dim % 2:
            raise ConfigError(f"model.d_model: head dimension {self.head_dim} must be even for rotary positions")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout: must be in [0, 1), got {self.dropout}")
        if self.rope_base <= 1.0:
            raise ConfigError(f"model.rope_base: must be > 1, got {self.rope_base}")
        for name in ("span_window", "span_max", "span_ramp", "span_tile"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name}: must be > 0, got {getattr(self, name)}")
        if self.span != "none" and not self.causal:
            raise ConfigError(f"model.span: '{self.span}' spans are causal; the encoder (causal=false) needs "
                              f"span=none (symmetric spans are not implemented)")
        if not 0 < self.span_init < self.span_max:
            raise ConfigError(f"model.span_init: must be in (0, span_max={self.span_max}), got {self.span_init}")
        if self.span_penalty < 0:
            raise ConfigError(f"model.span_penalty: must be ≥ 0, got {self.span_penalty}")
        if self.span_max_start is not None and not self.span_init < self.span_max_start <= self.span_max:
            raise ConfigError(f"model.span_max_start: must be in (span_init={self.span_init}, "
                              f"span_max={self.span_max}], got {self.span_max_start}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.norm_eps and model.init_std must be > 0")
