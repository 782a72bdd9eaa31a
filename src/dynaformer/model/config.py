"""`ModelConfig`: the one config that flows into every module of the model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from ..kernels.plan import SpanImpl

ResidualKind = Literal["prenorm", "postnorm", "rezero", "layerscale", "deepnorm", "dynamic",
                       "hyper", "hyper_static", "mhc", "attnres"]  # the last four: model/streams.py
SpanKind = Literal["none", "fixed", "per_head", "dynamic", "fox", "sink_window"]  # "none" + model/span.py's SPANS


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
    residual: ResidualKind = "prenorm"  # see model/residual.py
    # Depth L used by depth-scaled residual inits (deepnorm α=(2L)^¼, β=(8L)^-¼; layerscale ε); None: n_layer.
    residual_depth: int | None = None
    layerscale_init: float | None = None  # LayerScale ε; None: CaiT's depth rule (0.1 / 1e-5 / 1e-6)
    # `dynamic` residual: x ← x + c·s(τ)·m(p, x)·F(N(x)); each factor can be switched off for ablations.
    dyn_gain: bool = True  # learned per-sub-layer gain c (starts at 1)
    dyn_step: bool = True  # s(τ) = 1 + a·τ + b·τ², learned a, b (start at 0), τ = training progress
    dyn_position: bool = True  # 1 + β·log((p+1)/P0), learned β (starts at 0), p = position (encoder: p+1 = length)
    dyn_content: bool = True  # + Σ_j γ_j·tanh(w_jᵀN(x)), w (k×d) starts at 0, so the term starts at 0
    dyn_rank: int = 4  # k: content features per sub-layer (1..8)
    dyn_p0: float | None = None  # P0 of the position term; None: √context_len (φ centred in log-space)
    dyn_gamma_init: float = 0.1  # γ's start (with w = 0 the term is still exactly 0); > 0 so w gets gradient
    # Residual-stream relatives (model/streams.py): hyper-connections (hyper, hyper_static) and mHC keep n streams.
    hc_streams: int = 4  # n, the expansion rate (≥ 1)
    mhc_sinkhorn_iters: int = 20  # t_max, Sinkhorn-Knopp rounds projecting mHC's residual mixing (≥ 1)
    mhc_per_stream: bool = False  # mHC mappings read from each stream alone (the HC form) instead of all n·C
    value_residual: bool = False  # ResFormer: layers after the first mix in the first layer's values
    span: SpanKind = "none"
    # Attention span (model/span.py; adaptive span, Sukhbaatar et al. 2019). Distances d = i − j ≥ 0.
    span_window: int = 256  # fixed: each query sees its last span_window keys (itself included)
    span_max: int = 256  # S: the largest learned span z (tokens); per_head z_h = S·σ(a_h), dynamic S·σ(a_h + v_hᵀx_t)
    span_ramp: int = 32  # R: soft mask m(d) = clamp((R + z − d)/R, 0, 1)
    span_init: float = 32.0  # initial span of the learned kinds (tokens; v starts at zero)
    span_penalty: float = 2e-5  # weight of the L1 penalty on the tile-quantised span (per layer, in tokens)
    span_tile: int = 64  # the penalty charges spans rounded up to this tile (what the kernels pay for)
    span_max_start: int | None = None  # growth: the max span rises linearly from this to span_max over training
    span_impl: SpanImpl = "auto"  # the span kernel, kernels/plan.py's SPAN_IMPLS (auto: plan() decides)
    # sink_window (StreamingLLM): the window is span_window keys, plus the first sink_tokens tokens for every
    # query; sink_logits adds a learned per-head logit to each softmax's denominator (gpt-oss).
    sink_tokens: int = 4
    sink_logits: bool = False
    # fox (Forgetting Transformer): keys whose accumulated decay Σ log f is below −fox_prune nats are skipped
    # (adaptive computation pruning); 0 keeps every key.
    fox_prune: float = 0.0

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
        if not 0 < self.span_init < self.span_max:
            raise ConfigError(f"model.span_init: must be in (0, span_max={self.span_max}), got {self.span_init}")
        if self.span_penalty < 0:
            raise ConfigError(f"model.span_penalty: must be ≥ 0, got {self.span_penalty}")
        if self.span_max_start is not None and not self.span_init < self.span_max_start <= self.span_max:
            raise ConfigError(f"model.span_max_start: must be in (span_init={self.span_init}, "
                              f"span_max={self.span_max}], got {self.span_max_start}")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.norm_eps and model.init_std must be > 0")
        self._validate_span_relatives()
        self._validate_residual()

    def _validate_span_relatives(self) -> None:
        if self.sink_tokens < 0 or (self.span == "sink_window" and self.sink_tokens >= self.span_window):
            raise ConfigError(f"model.sink_tokens: must be in [0, span_window={self.span_window}) (sinks are the "
                              f"first tokens, outside the window), got {self.sink_tokens}")
        if not (self.fox_prune >= 0 and math.isfinite(self.fox_prune)):
            raise ConfigError(f"model.fox_prune: must be a finite number of nats ≥ 0 (0: no pruning), "
                              f"got {self.fox_prune}")
        if self.span in ("fox", "sink_window"):
            if not self.causal:
                raise ConfigError(f"model.span: {self.span} is a causal mechanism; an encoder (causal: false) "
                                  f"takes none, fixed, per_head or dynamic")
            if self.span_impl == "flex":
                raise ConfigError(f"model.span_impl: {self.span} has no FlexAttention kernel; use auto, band, "
                                  f"masked or reference")

    def _validate_residual(self) -> None:
        if self.residual_depth is not None and self.residual_depth <= 0:
            raise ConfigError(f"model.residual_depth: must be > 0 (the depth L that {self.residual} scales by), "
                              f"got {self.residual_depth}")
        if self.residual == "deepnorm" and self.residual_depth is not None and self.residual_depth < self.n_layer:
            raise ConfigError(f"model.residual_depth: deepnorm needs the model's depth (≥ n_layer={self.n_layer}), "
                              f"got {self.residual_depth}")
        if self.layerscale_init is not None and not 0 < self.layerscale_init <= 1:
            raise ConfigError(f"model.layerscale_init: must be in (0, 1], got {self.layerscale_init}")
        if not 1 <= self.dyn_rank <= 8:
            raise ConfigError(f"model.dyn_rank: must be in 1..8, got {self.dyn_rank}")
        if self.dyn_p0 is not None and not (self.dyn_p0 > 0 and math.isfinite(self.dyn_p0)):
            raise ConfigError(f"model.dyn_p0: must be a finite number > 0, got {self.dyn_p0}")
        if self.hc_streams < 1:
            raise ConfigError(f"model.hc_streams: must be ≥ 1 (the number of residual streams), got {self.hc_streams}")
        if self.mhc_sinkhorn_iters < 1:
            raise ConfigError(f"model.mhc_sinkhorn_iters: must be ≥ 1 (Sinkhorn-Knopp rounds), "
                              f"got {self.mhc_sinkhorn_iters}")
        if self.value_residual and self.n_layer < 2:
            raise ConfigError(f"model.value_residual: needs n_layer ≥ 2 (layers after the first mix in the first "
                              f"layer's values), got n_layer={self.n_layer}")
        if not 0 < self.dyn_gamma_init <= 1:
            raise ConfigError(f"model.dyn_gamma_init: must be in (0, 1] (0 would leave the content projection "
                              f"without gradient), got {self.dyn_gamma_init}")

    @property
    def depth(self) -> int:
        """The depth L that depth-scaled residual inits use."""
        return self.residual_depth if self.residual_depth is not None else self.n_layer

    @property
    def position_p0(self) -> float:
        return self.dyn_p0 if self.dyn_p0 is not None else math.sqrt(self.context_len)
