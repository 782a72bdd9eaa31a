"""Generation: cached and uncached decoding give identical tokens, for every sampling mode."""

from __future__ import annotations

import pytest
import torch

from dynaformer.errors import DynaformerError
from dynaformer.model import Transformer
from dynaformer.model.generate import generate, sample_next

from .conftest import MATRIX, tiny_config


@pytest.mark.parametrize("residual,span", MATRIX)
@pytest.mark.parametrize("sampling", [dict(temperature=0.0), dict(temperature=1.0, top_k=8),
                                      dict(temperature=0.9, top_p=0.8), dict(temperature=1.3)])
def test_cached_equals_uncached(residual, span, sampling):
    model = Transformer(tiny_config(residual=residual, span=span))
    prompt = torch.randint(0, 64, (2, 5))
    # 50 new tokens with context 32: the window slides past the training context.
    a = generate(model, prompt, 50, seed=3, use_cache=True, **sampling)
    b = generate(model, prompt, 50, seed=3, use_cache=False, **sampling)
    assert a.shape == (2, 55)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], prompt)


def test_seed_controls_sampling():
    model = Transformer(tiny_config())
    prompt = torch.zeros(1, 1, dtype=torch.long)
    a = generate(model, prompt, 30, seed=1)
    assert torch.equal(a, generate(model, prompt, 30, seed=1))
    assert not torch.equal(a, generate(model, prompt, 30, seed=2))


def test_top_k_and_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 3.0, -10.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, 1.0, 2, None, g).item() for _ in range(200)}
    assert picks == {0, 1}
    picks = {sample_next(logits, 1.0, None, 0.5, g).item() for _ in range(200)}
    assert picks == {0}  # token 0 alone holds > 50% of the mass
    assert sample_next(logits, 0.0, None, None, g).item() == 0


def test_prompt_too_long():
    model = Transformer(tiny_config())
    with pytest.raises(DynaformerError, match="prompt has 40 tokens"):
        generate(model, torch.zeros(1, 40, dtype=torch.long), 5)
    out = generate(model, torch.zeros(1, 40, dtype=torch.long), 5, max_len=64)  # extrapolation on request
    assert out.shape == (1, 45)
