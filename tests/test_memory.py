"""The memory estimates that refuse user-given sizes before allocation are upper bounds of what they bound:
the parameter bound holds for every residual × span kind and both MLPs; training refuses only past the machine's
memory (pinned here), on both sides of the line."""

from __future__ import annotations

import pytest

from dynaformer.errors import DynaformerError
from dynaformer.model import ModelConfig, Transformer
from dynaformer.model.memory import generate_bytes, param_bound, train_bytes
from dynaformer.train.config import TrainConfig, check_train_memory

from .conftest import MATRIX


@pytest.mark.parametrize("residual,span", MATRIX)
@pytest.mark.parametrize("mlp,tied", [("gelu", True), ("swiglu", False)])
def test_the_parameter_bound_holds_for_every_kind(residual, span, mlp, tied):
    cfg = ModelConfig(vocab_size=300, context_len=64, n_layer=3, n_head=4, d_model=32, residual=residual, span=span,
                      mlp=mlp, tie_embeddings=tied)
    n = sum(p.numel() for p in Transformer(cfg).parameters())
    assert n <= param_bound(cfg) <= 3 * n  # a bound, not a wild one


def test_training_is_refused_exactly_past_the_available_memory(monkeypatch):
    import dynaformer.resources as res

    cfg = ModelConfig(vocab_size=256, context_len=128, n_layer=2, n_head=2, d_model=64)
    tcfg = TrainConfig(batch_size=8, device="cpu")
    need = train_bytes(cfg, 8)
    monkeypatch.setattr(res, "available_memory", lambda: need)
    check_train_memory(cfg, tcfg)  # fits exactly
    monkeypatch.setattr(res, "available_memory", lambda: need - 1)
    with pytest.raises(DynaformerError, match=r"training this model \(batch 8 × context 128\) needs about"):
        check_train_memory(cfg, tcfg)
    # The staged context's wider batch is checked too (its logits are longer in rows).
    staged = TrainConfig(batch_size=8, device="cpu", short_context=16, short_steps=10)
    monkeypatch.setattr(res, "available_memory", lambda: need)
    if train_bytes(cfg, 64, 16) > need:
        with pytest.raises(DynaformerError, match="staged context"):
            check_train_memory(cfg, staged)
    monkeypatch.setattr(res, "available_memory", lambda: None)  # unknown: nothing is refused
    check_train_memory(ModelConfig(d_model=10**6, n_head=2), tcfg)


def test_generation_grows_with_the_tokens_asked_for():
    cfg = ModelConfig(vocab_size=256, context_len=128, n_layer=2, n_head=2, d_model=64)
    assert generate_bytes(cfg, 1, 10**12) > 8 * 10**12  # the token ids alone
    assert generate_bytes(cfg, 1, 200) < generate_bytes(cfg, 4, 200)
