"""`ModelConfig`: the one config that flows into every module of the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError

ResidualKind = Literal["prenorm"]
SpanKind = Literal["none"]


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
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.norm_eps and model.init_std must be > 0")
