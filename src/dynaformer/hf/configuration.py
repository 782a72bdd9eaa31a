"""`DynaformerConfig`: the transformers config. It stores the whole `ModelConfig` as one dict, so
every field (including the residual and span options) round-trips through `config.json` unchanged;
the standard HF names (`hidden_size`, `num_hidden_layers`, ...) are derived from it for tools that
read them and are never the source of truth."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from ..configtools import from_dict, to_dict
from ..model import ModelConfig

# HF attribute → ModelConfig field; recomputed on every load, whatever config.json says.
_DERIVED = {"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layer",
            "num_attention_heads": "n_head", "max_position_embeddings": "context_len",
            "intermediate_size": None, "tie_word_embeddings": "tie_embeddings"}


class DynaformerConfig(PretrainedConfig):
    model_type = "dynaformer"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, dynaformer: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # Explicit __init__ (transformers 5 turns configs without one into strict dataclasses).
        cfg = from_dict(ModelConfig, dict(dynaformer or {}), "dynaformer")  # unknown keys / bad values raise
        self.dynaformer = to_dict(cfg)
        for key in _DERIVED:
            kwargs.pop(key, None)
        use_cache = kwargs.pop("use_cache", True)
        super().__init__(tie_word_embeddings=cfg.tie_embeddings, **kwargs)
        self.use_cache = use_cache
        self.vocab_size = cfg.vocab_size
        self.hidden_size = cfg.d_model
        self.num_hidden_layers = cfg.n_layer
        self.num_attention_heads = cfg.n_head
        self.max_position_embeddings = cfg.context_len
        self.intermediate_size = cfg.ff_dim

    def model_config(self) -> ModelConfig:
        return from_dict(ModelConfig, dict(self.dynaformer), "dynaformer")
