"""The decode path: cached decoding gives the tokens of the uncached reference over every residual × span kind
(greedy and seeded sampling, unpadded and padded batches), allocates nothing per token that grows with the
sequence, and the uniform interfaces it relies on (KV cache groups, span reach, residual coefficients, side
outputs collected per forward) hold for every kind."""

from __future__ import annotations

import pytest
import torch

from dynaformer.model import Transformer
from dynaformer.model.cache import BoundedLayerCache, KeyGroup, LayerCache
from dynaformer.model.generate import generate
from dynaformer.model.residual import RESIDUALS, residual_modules
from dynaformer.model.span_stats import span_stats

from .conftest import MATRIX, SPANS, tiny_config


@pytest.mark.parametrize("residual,span", MATRIX)
def test_cached_decode_equals_reference_greedy_and_seeded(residual, span):
    torch.manual_seed(1)
    model = Transformer(tiny_config(residual=residual, span=span, span_max=12, span_init=6.0, span_window=6))
    if residual == "dynamic":  # gates off zero, so every factor of the weight is live
        with torch.no_grad():
            for mod in residual_modules(model):
                for p in mod._gates:
                    p.normal_(0.0, 0.3)
        model.progress.fill_(0.4)
    prompt = torch.randint(0, 64, (3, 7))
    for sampling in (dict(temperature=0.0), dict(temperature=1.0, top_k=10, seed=5)):
        fast = generate(model, prompt, 30, max_len=40, **sampling)  # keys dropped by a bounded cache
        ref = generate(model, prompt, 30, max_len=40, use_cache=False, **sampling)
        assert torch.equal(fast, ref), sampling


@pytest.mark.parametrize("span", SPANS)
def test_cached_decode_of_a_left_padded_batch_equals_each_row_alone(span):
    """Padded rows go through the same cached decode step (key_padding_mask over every key so far)."""
    torch.manual_seed(2)
    model = Transformer(tiny_config(residual="dynamic", span=span, span_max=12, span_init=6.0)).eval()
    rows = [torch.randint(1, 64, (n,)) for n in (9, 4)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, 9 - len(r):], mask[b, 9 - len(r):] = r, 1
    with torch.no_grad():
        cache = model.new_cache(2, 30)
        logits, _ = model(ids, cache=cache, key_padding_mask=mask)
        tok = logits[:, -1:].argmax(-1)
        got = [tok]
        for _ in range(12):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            logits, _ = model(tok, cache=cache, key_padding_mask=mask)
            tok = logits[:, -1:].argmax(-1)
            got.append(tok)
    got = torch.cat(got, 1)
    for b, r in enumerate(rows):
        alone = generate(model, r[None], 13, temperature=0.0, use_cache=False)
        assert torch.equal(got[b], alone[0, len(r):]), b


def test_decoding_concatenates_nothing_and_keeps_the_rotary_table(monkeypatch):
    """Per token: no torch.cat (the token buffer and the dense KV cache are preallocated), no rotary table rebuilt."""
    model = Transformer(tiny_config(context_len=64))
    prompt = torch.randint(0, 64, (2, 5))
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    tables = []
    real_reserve = model.rotary.reserve

    def reserve(n, device):
        real_reserve(n, device)
        tables.append(model.rotary._cos)

    monkeypatch.setattr(model.rotary, "reserve", reserve)
    out = generate(model, prompt, 40, temperature=0.0)
    assert out.shape == (2, 45)
    assert calls == []
    assert len(tables) > 40 and all(t is tables[0] for t in tables)  # built once, by new_cache
    assert tables[0].shape[0] >= 45


def test_generate_stops_at_eos_and_returns_only_the_tokens_made():
    model = Transformer(tiny_config())
    prompt = torch.randint(0, 64, (1, 4))
    ref = generate(model, prompt, 20, temperature=0.0)
    eos = int(ref[0, 6])  # the third new token
    first = int((ref[0, 4:] == eos).nonzero()[0, 0]) + 4
    out = generate(model, prompt, 20, temperature=0.0, eos_id=eos)
    assert torch.equal(out, ref[:, : first + 1])


def test_both_caches_answer_key_groups():
    k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 4, 3, 8)
    dense = LayerCache(2, 4, 10, 8, torch.float32, None).append(k, v)
    assert len(dense) == 1 and isinstance(dense[0], KeyGroup)
    assert torch.equal(dense[0].k, k) and torch.equal(dense[0].v, v)
    assert torch.equal(k[:, dense[0].heads], k)
    bounded = BoundedLayerCache(2, [5, 5, 9, 5], 8, torch.float32, None).append(k, v)
    assert [type(g) for g in bounded] == [KeyGroup, KeyGroup]
    for g in bounded:
        assert torch.equal(g.k, k[:, g.heads]) and torch.equal(g.v, v[:, g.heads])
    assert sorted(h for g in bounded for h in torch.arange(4)[g.heads].tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("span", [s for s in SPANS if s != "none"])
def test_every_span_kind_has_one_reach_signature(span):
    model = Transformer(tiny_config(span=span, span_max=24, span_init=8.0, span_max_start=12, span_window=10))
    mod = model.blocks[0].attn.span
    early, late = mod.reach(0.0), mod.reach(1.0)
    assert len(early) == len(late) == model.cfg.n_head
    assert all(a <= b for a, b in zip(early, late, strict=True))
    if span == "dynamic":  # the max span grows with progress, and content may use any of it
        assert late[0] > early[0]
    if span == "fixed":
        assert early == late == [10] * model.cfg.n_head


@pytest.mark.parametrize("residual", list(RESIDUALS))
def test_every_residual_kind_reports_coefficients_the_same_way(residual):
    model = Transformer(tiny_config(residual=residual))
    for mod in residual_modules(model):
        a, b = mod.coefficients(model.progress), mod.coefficients()
        assert isinstance(a, dict) and all(isinstance(x, float) for x in a.values())
        assert set(b) <= set(a)


def test_side_outputs_belong_to_the_last_forward():
    model = Transformer(tiny_config(span="dynamic", span_max=24, span_init=8.0, span_penalty=0.1)).train()
    x = torch.randint(0, 64, (2, 20))
    model(x)
    first = model.aux_loss()
    assert first.requires_grad and float(first.detach()) > 0
    assert len(model.last_outputs.aux_losses) == model.cfg.n_layer  # one per layer, not accumulated
    model(x)
    assert len(model.last_outputs.aux_losses) == model.cfg.n_layer
    assert torch.allclose(model.aux_loss(), first)
    stats = span_stats(model)
    assert len(stats["span_mean"]) == model.cfg.n_layer
    model.eval()
    with torch.no_grad():
        model(x[:, :5])
    assert float(model.aux_loss()) == 0.0  # no penalty outside training
    assert span_stats(model, 5)["span_mean"]  # the spans of this forward
    assert not any(hasattr(m, "aux_loss") or hasattr(m, "last_z") for m in model.blocks.modules())
