"""Padded batches (key_padding_mask; transformers' attention_mask) for every residual × span kind: a padded row
gives, logit for logit and token for token, what it gives alone — in the plain forward, through the KV cache
(including span-bounded caches that compact), and in transformers' generate (greedy and beam, cached and
uncached). Bad masks are one clear error."""

from __future__ import annotations

import pytest
import torch

from dynaformer.model import Transformer

from .conftest import MATRIX, trained_like

# Short spans, so bounded caches keep fewer keys than the prompts hold and compact while decoding.
SPANS = dict(span_window=6, span_max=16, span_init=4.0, span_ramp=4)
LENGTHS = (9, 3, 14, 1)


def _trained_like(residual: str, span: str, **kw) -> Transformer:
    return trained_like(residual, span, **SPANS, **kw)


def _left_padded(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):] = r
        mask[b, T - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize("residual,span", MATRIX)
@torch.no_grad()
def test_padded_forward_and_cache_equal_single_rows(residual, span):
    model = _trained_like(residual, span)
    rows = [torch.randint(0, 64, (n,)) for n in LENGTHS]
    ids, mask = _left_padded(rows, pad=5)
    T = ids.shape[1]
    full, _ = model(ids, key_padding_mask=mask)
    cache = model.new_cache(len(rows), T + 8)
    prefill, _ = model(ids, cache=cache, key_padding_mask=mask)
    steps = torch.randint(0, 64, (len(rows), 8))
    decoded = []
    for t in range(8):  # one token at a time, the mask growing with the cache
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        decoded.append(model(steps[:, t : t + 1], cache=cache, key_padding_mask=mask)[0])
    decoded = torch.cat(decoded, dim=1)
    for b, r in enumerate(rows):
        alone, _ = model(torch.cat([r, steps[b]])[None])  # (1, n + 8, V), no padding, no cache
        n = len(r)
        torch.testing.assert_close(full[b, T - n:], alone[0, :n], rtol=0, atol=2e-5)
        torch.testing.assert_close(prefill[b, T - n:], alone[0, :n], rtol=0, atol=2e-5)
        torch.testing.assert_close(decoded[b], alone[0, n:], rtol=0, atol=2e-5)


@pytest.mark.parametrize("span", ["none", "fixed", "per_head", "dynamic"])
@torch.no_grad()
def test_padded_long_prefill_and_right_padding(span):
    """Prompts past one band-kernel chunk (64 queries: alone they take the band kernel, padded the masked
    path) and right padding (the mask's other side) give the same logits."""
    model = _trained_like("dynamic", span, context_len=128)
    rows = [torch.randint(0, 64, (n,)) for n in (100, 70)]
    ids, mask = _left_padded(rows)
    out, _ = model(ids, key_padding_mask=mask)
    right = torch.zeros_like(ids)
    rmask = torch.zeros_like(mask)
    for b, r in enumerate(rows):
        right[b, : len(r)] = r
        rmask[b, : len(r)] = 1
    rout, _ = model(right, key_padding_mask=rmask)
    for b, r in enumerate(rows):
        alone, _ = model(r[None])
        torch.testing.assert_close(out[b, ids.shape[1] - len(r):], alone[0], rtol=0, atol=2e-5)
        torch.testing.assert_close(rout[b, : len(r)], alone[0], rtol=0, atol=2e-5)


def test_unpadded_mask_is_exactly_no_mask():
    model = _trained_like("dynamic", "dynamic")
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        assert torch.equal(model(x, key_padding_mask=torch.ones_like(x))[0], model(x)[0])


def test_padded_batch_trains():
    """Gradients flow through the masked path (span parameters included) and padded targets are ignored."""
    model = _trained_like("dynamic", "dynamic").train()
    rows = [torch.randint(0, 64, (n,)) for n in (12, 5)]
    ids, mask = _left_padded(rows)
    targets = ids.roll(-1, dims=1).masked_fill(mask == 0, -100)
    _, loss = model(ids, targets=targets, key_padding_mask=mask)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    span = model.blocks[0].attn.span
    assert span.a.grad.abs().sum() > 0


@pytest.mark.parametrize("bad,match", [
    (torch.ones(2, 7, dtype=torch.long), "shape"),
    (torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1], [1] * 8]), "padding between real tokens"),
    (torch.tensor([[0, 1, 1, 0, 1, 1, 1, 1], [1] * 8]), "padding between real tokens"),
    (torch.full((2, 8), 2), "only 0"),
    (torch.ones(2, 8, 1, dtype=torch.long), "shape"),
])
def test_bad_padding_mask_is_one_clear_error(bad, match):
    model = _trained_like("prenorm", "none")
    with pytest.raises(ValueError, match=match):
        model(torch.randint(0, 64, (2, 8)), key_padding_mask=bad)


def test_cache_mask_must_cover_the_cached_tokens():
    model = _trained_like("prenorm", "fixed")
    cache = model.new_cache(1, 16)
    model(torch.randint(0, 64, (1, 5)), cache=cache)
    with pytest.raises(ValueError, match=r"\(1, 6\)"):
        model(torch.randint(0, 64, (1, 1)), cache=cache, key_padding_mask=torch.ones(1, 1, dtype=torch.long))


# --- transformers: generate and pipeline on padded batches -------------------------------------------

@pytest.mark.parametrize("residual,span", MATRIX)
def test_hf_generate_padded_equals_single(residual, span):
    pytest.importorskip("transformers", reason="needs the [hf] extra: pip install 'dynaformer[hf]'")
    from dynaformer.hf import DynaformerForCausalLM

    hf = DynaformerForCausalLM.from_dynaformer(_trained_like(residual, span)).eval()
    rows = [torch.randint(0, 63, (n,)) for n in (7, 2, 5)]  # 63 is the pad id: never in a prompt
    ids, mask = _left_padded(rows, pad=63)
    T = ids.shape[1]
    for kw in (dict(num_beams=1), dict(num_beams=3)):
        for use_cache in (True, False):
            batch = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, use_cache=use_cache,
                                pad_token_id=63, **kw)
            for b, r in enumerate(rows):
                alone = hf.generate(r[None], max_new_tokens=10, do_sample=False, use_cache=use_cache,
                                    pad_token_id=63, **kw)
                assert torch.equal(batch[b, T:], alone[0, len(r):]), (kw, use_cache, b)
