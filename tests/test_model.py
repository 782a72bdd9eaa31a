"""Model invariants: shapes, causality, cache equivalence, config strictness — over the flag matrix."""

from __future__ import annotations

import pytest
import torch

from dynaformer.configtools import from_dict
from dynaformer.errors import ConfigError
from dynaformer.model import ModelConfig, Transformer

from .conftest import MATRIX, tiny_config


def _model(residual: str, span: str, **kw) -> Transformer:
    model = Transformer(tiny_config(residual=residual, span=span, **kw))
    # Move every mechanism parameter off its identity initialisation, so the tests exercise it.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 and "norm" not in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_shapes_and_loss():
    model = Transformer(tiny_config())
    x = torch.randint(0, 64, (3, 20))
    logits, loss = model(x, x)
    assert logits.shape == (3, 20, 64)
    assert loss.ndim == 0 and 3.5 < loss.item() < 4.8  # ≈ ln 64 at init
    assert model(x)[1] is None


def test_tied_embeddings_and_init():
    model = Transformer(tiny_config(n_layer=4))
    assert model.head.weight is model.embed.weight
    std = model.blocks[0].attn.proj.weight.std().item()
    assert 0.02 / (8**0.5) * 0.7 < std < 0.02 / (8**0.5) * 1.3  # GPT-2 scaled residual init


@pytest.mark.parametrize("residual,span", MATRIX)
def test_causality(residual, span):
    model = _model(residual, span)
    x = torch.randint(0, 64, (2, 24))
    y = x.clone()
    y[:, 15:] = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        a, _ = model(x)
        b, _ = model(y)
    assert torch.equal(a[:, :15], b[:, :15])
    assert not torch.allclose(a[:, 15:], b[:, 15:])


@pytest.mark.parametrize("residual,span", MATRIX)
@pytest.mark.parametrize("chunks", [[40], [1] * 40, [7, 1, 1, 13, 18], [31, 9]])
def test_cache_equivalence(residual, span, chunks):
    """Full-sequence logits == incremental decoding with the KV cache, also past the training context."""
    model = _model(residual, span)
    x = torch.randint(0, 64, (2, sum(chunks)))  # 40 > context_len 32
    with torch.no_grad():
        full, _ = model(x)
        cache = model.new_cache(2, x.size(1))
        parts, i = [], 0
        for n in chunks:
            parts.append(model(x[:, i : i + n], cache=cache)[0])
            i += n
    inc = torch.cat(parts, dim=1)
    assert (full - inc).abs().max().item() <= 1e-5


def test_gradients_reach_every_parameter():
    model = Transformer(tiny_config())
    x = torch.randint(0, 64, (2, 16))
    model(x, x)[1].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("field,value,message", [
    ("n_head", 3, "n_head"),
    ("context_len", 0, "context_len"),
    ("d_model", -8, "d_model"),
    ("dropout", 1.5, "dropout"),
    ("residual", "nonsense", "residual"),
    ("span", "nonsense", "span"),
    ("n_layer", "four", "n_layer"),
    ("colour", "red", "colour"),
])
def test_config_errors_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, {field: value}, "model")


def test_config_coerces_strings():
    cfg = from_dict(ModelConfig, {"n_layer": "6", "dropout": "0.1", "tie_embeddings": "false"}, "model")
    assert cfg.n_layer == 6 and cfg.dropout == 0.1 and cfg.tie_embeddings is False


def test_training_after_a_first_forward_under_inference_mode():
    """The rotary table is built lazily; built under inference_mode it must still serve a backward."""
    model = Transformer(tiny_config())
    x = torch.randint(0, 64, (1, 8))
    with torch.inference_mode():
        model(x)
    model(x, x)[1].backward()
    assert model.embed.weight.grad is not None
