"""The span relatives against their papers' defining equations (no package implements either, so the references
are the equations, checked on hand-computed cases):

- fox, the Forgetting Transformer (Lin et al., ICLR 2025, arXiv 2503.02130): the decay bias
  D_ij = Σ_{l=j+1}^{i} log f_l for a 4-token sequence; attention = softmax(QKᵀ/√d + D)V by hand for 3 tokens;
  every fast path (dense SDPA, band kernel, masked, decode) equals the dense definition with gradients (the
  forget gates' included); adaptive computation pruning (arXiv 2504.06949) keeps exactly the keys with
  D_ij ≥ −θ (spans by hand), equals the dense form when the threshold prunes nothing, computes fewer pairs,
  and a cached decode equals the full forward under the same pruning.
- sink_window, StreamingLLM (Xiao et al., ICLR 2024) with gpt-oss's learned sink logits: the visible set by
  hand (window edge at distance W − 1 / W, sinks always attended); the band-kernel path with its merged
  log-sum-exp equals the one-softmax reference with gradients (sink logits included); the learned logit scales
  the output by σ(lse − s); the cache holds W + n keys whatever the length.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from dynaformer.kernels import band_native, band_span_attention, reference_span_attention, span_attention
from dynaformer.kernels.fox import augment, decay_bias, pruned_spans, reference_fox_attention
from dynaformer.kernels.sink import reference_sink_attention, sink_window_attention, visible_keys
from dynaformer.model import Transformer
from dynaformer.model.span_stats import span_stats

from .conftest import output_and_grads, tiny_config


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# --- fox: the defining equations ------------------------------------------------------------------------------

def test_decay_bias_of_four_tokens_by_hand():
    f = torch.tensor([0.9, 0.5, 0.25, 0.8])
    D = decay_bias(f.log())
    a, b, c = math.log(0.5), math.log(0.25), math.log(0.8)  # log f_1, f_2, f_3 (f_0 never enters)
    want = torch.tensor([[0.0, -math.inf, -math.inf, -math.inf],
                         [a, 0.0, -math.inf, -math.inf],
                         [a + b, b, 0.0, -math.inf],
                         [a + b + c, b + c, c, 0.0]])
    torch.testing.assert_close(D, want, rtol=0, atol=1e-6)


def test_forgetting_attention_of_three_tokens_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]).view(1, 1, 3, 2)
    k = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]]).view(1, 1, 3, 2)
    v = torch.tensor([[1.0], [2.0], [4.0]]).view(1, 1, 3, 1)
    f = torch.tensor([1.0, 0.5, 0.25])
    # query 2: logits q·k/√2 + D: key 0: 1/√2 + log(.5·.25), key 1: 2/√2 + log .25, key 2: 2/√2
    s = torch.tensor([1 / math.sqrt(2) + math.log(0.125), 2 / math.sqrt(2) + math.log(0.25), 2 / math.sqrt(2)])
    w = s.softmax(0)
    want = float(w @ torch.tensor([1.0, 2.0, 4.0]))
    got = reference_fox_attention(q, k, v, f.log().view(1, 1, 3))
    assert abs(float(got[0, 0, 2, 0]) - want) < 1e-6
    assert float(got[0, 0, 0, 0]) == 1.0  # the first query sees only its own key


def test_pruned_spans_by_hand():
    # u = −c: 0.5, 1.5, 4.5, 5.0 (steps 0.5, 1, 3, 0.5); θ = 2: query 3 keeps keys with u_j ≥ 3 → j ≥ 2
    u = torch.tensor([0.5, 1.5, 4.5, 5.0]).view(1, 1, 4)
    assert pruned_spans(u, u, 2.0).tolist() == [[[0.0, 1.0, 0.0, 1.0]]]
    assert pruned_spans(u, u, 100.0).tolist() == [[[0.0, 1.0, 2.0, 3.0]]]  # nothing pruned: every causal key


def _fox_inputs(B=2, H=3, T=150, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
    logf = torch.nn.functional.logsigmoid(1.5 + torch.randn(B, H, T, generator=g)).requires_grad_()
    return q, k, v, logf


def _fox_fast(q, k, v, logf, prune: float, impl: str, native: bool | None = None):
    u = -logf.cumsum(-1)
    qa, ka, va = augment(q, k, v, u)
    z = pruned_spans(u.detach(), u.detach(), prune) if prune > 0 else torch.full((1, q.shape[1], 1), 2.0**30)
    if impl == "band":  # chunk 16 over 150 queries, as the span tests run the kernel
        return band_span_attention(qa, ka, va, z, 1.0, True, chunk=16, native=native)[..., :q.shape[-1]]
    return span_attention(qa, ka, va, z, 1.0, True, impl=impl)[..., :q.shape[-1]]


@pytest.mark.parametrize("prune", [0.0, 6.0])
@pytest.mark.parametrize("impl", ["auto", "band_python", "band_native", "masked"])
def test_fox_fast_paths_equal_the_dense_definition_with_gradients(impl, prune):
    if impl == "band_native" and not band_native.available():
        pytest.skip(f"compiled band kernel: {band_native.unavailable_reason()}")
    q, k, v, logf = _fox_inputs()
    go = torch.randn(2, 3, 150, 16)
    ref = output_and_grads(lambda: reference_fox_attention(q, k, v, logf, prune), [q, k, v, logf], go)
    kind = "band" if impl.startswith("band") else impl
    native = None if kind != "band" else impl == "band_native"
    got = output_and_grads(lambda: _fox_fast(q, k, v, logf, prune, kind, native), [q, k, v, logf], go)
    for name, a, b in zip(["out", "dq", "dk", "dv", "dlogf"], got, ref, strict=True):
        assert _rel(a, b) <= 2e-5, (name, _rel(a, b))
    assert ref[-1].abs().sum() > 0  # the forget gates get a gradient


def test_fox_pruning_with_a_permissive_threshold_equals_unpruned_and_a_tight_one_saves_work():
    q, k, v, logf = _fox_inputs(T=300)
    with torch.no_grad():
        full = reference_fox_attention(q, k, v, logf)
        assert _rel(_fox_fast(q, k, v, logf, 60.0, "auto"), full) <= 1e-5  # e^-60: nothing visible lost
        tight = _fox_fast(q, k, v, logf, 4.0, "auto")
        assert _rel(tight, full) > 1e-4  # keys within 4 nats only: a different function
        assert _rel(tight, reference_fox_attention(q, k, v, logf, 4.0)) <= 1e-5
    torch.manual_seed(0)
    model = Transformer(tiny_config(span="fox", fox_prune=4.0, context_len=1024, n_head=4)).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.span.fgate.bias.zero_()  # f ≈ 1/2: about 6 keys within 4 nats
        model(torch.randint(0, 64, (1, 1024)))
    assert span_stats(model)["attn_pairs_frac"] < 0.3  # the band kernel's windows over the pruned spans


def _fox_model(prune: float, **kw) -> Transformer:
    torch.manual_seed(3)
    model = Transformer(tiny_config(span="fox", fox_prune=prune, **kw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fgate" in name:
                p.add_(0.5 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("prune", [0.0, 3.0])
def test_fox_cached_decode_equals_the_full_forward_under_the_same_pruning(prune):
    model = _fox_model(prune)
    x = torch.randint(0, 64, (2, 70))
    with torch.no_grad():
        full, _ = model(x)
        for chunks in ([70], [1] * 70, [7, 1, 1, 13, 18, 30]):
            cache = model.new_cache(2, 70)
            parts, i = [], 0
            for n in chunks:
                parts.append(model(x[:, i:i + n], cache=cache)[0])
                i += n
            assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5, chunks
    if prune:  # the last call's queries (positions 40..69): some keep fewer keys than causality allows
        z = model.last_outputs.spans[0]
        assert bool((z < torch.arange(40, 70)).any())


def test_fox_with_forget_gates_at_one_is_dense_attention():
    torch.manual_seed(1)
    dense = Transformer(tiny_config())
    torch.manual_seed(1)
    fox = Transformer(tiny_config(span="fox"))
    fox.load_state_dict(dense.state_dict(), strict=False)
    with torch.no_grad():
        for b in fox.blocks:
            b.attn.span.fgate.weight.zero_()
            b.attn.span.fgate.bias.fill_(40.0)  # log σ(40) = −4e−18: f = 1 to fp32
    x = torch.randint(0, 64, (2, 30))
    torch.testing.assert_close(fox(x)[0], dense(x)[0], rtol=0, atol=1e-5)


def test_fox_trains_on_cpu_with_gradients_to_the_gates():
    model = _fox_model(4.0, context_len=128).train()
    x = torch.randint(0, 64, (2, 128))
    _, loss = model(x, x)
    loss.backward()
    g = model.blocks[0].attn.span.fgate
    assert g.weight.grad.abs().sum() > 0 and g.bias.grad.abs().sum() > 0


# --- sink_window: the defining equations ----------------------------------------------------------------------

def test_sink_window_visible_keys_by_hand():
    """W = 3, n = 2 sinks, 7 tokens: query 6 sees its window 4, 5, 6 and the sinks 0, 1; query 3 sees 1, 2, 3
    and sink 0 (sink 1 is in its window, counted once)."""
    pos = torch.arange(7)[None]
    vis = visible_keys(pos, pos, 3, 2)[0, 0].int()
    assert vis[6].tolist() == [1, 1, 0, 0, 1, 1, 1]
    assert vis[3].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert vis[2].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert vis[4].tolist() == [1, 1, 1, 1, 1, 0, 0]  # the window edge: distance 2 = W − 1 seen, 3 = W not (key 1
    assert vis[5].tolist() == [1, 1, 0, 1, 1, 1, 0]  # is a sink; key 2 at distance W from query 5 is not)


def test_sink_window_attention_by_hand_and_sink_logit_scaling():
    """Query 5 of 6 tokens, W = 2, one sink: the softmax runs over keys {0, 4, 5}; a sink logit s adds e^s to the
    denominator, so the output scales by σ(lse − s)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 6, 4, generator=g) for _ in range(3))
    pos = torch.arange(6)[None]
    s = (q[0, 0, 5] @ k[0, 0, [0, 4, 5]].T) / 2.0
    want = s.softmax(0) @ v[0, 0, [0, 4, 5]]
    got = reference_sink_attention(q, k, v, pos, pos, 2, 1)
    torch.testing.assert_close(got[0, 0, 5], want, rtol=0, atol=1e-6)
    logit = torch.tensor([0.7])
    scaled = reference_sink_attention(q, k, v, pos, pos, 2, 1, sink_logit=logit)
    factor = torch.sigmoid(torch.logsumexp(s, 0) - 0.7)
    torch.testing.assert_close(scaled[0, 0, 5], want * factor, rtol=0, atol=1e-6)


def test_sinks_are_always_attended_and_the_rest_outside_the_window_is_not():
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_layer=1, span="sink_window", span_window=4, sink_tokens=2)).eval()
    x = torch.randint(0, 64, (1, 30))
    base = model(x)[0][0, 29]
    for j, seen in ((0, True), (1, True), (2, False), (25, False), (26, True), (29, True)):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 64
        changed = not torch.allclose(model(y)[0][0, 29], base, atol=1e-6)
        assert changed == seen, (j, seen)


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("logits", [False, True])
def test_sink_window_band_path_equals_the_reference_with_gradients(native, logits):
    if native and not band_native.available():
        pytest.skip(f"compiled band kernel: {band_native.unavailable_reason()}")
    plan_mod = importlib.import_module("dynaformer.kernels.plan")  # (the package's `plan` is the function)

    g = torch.Generator().manual_seed(1)
    B, H, T, D, W, n = 2, 3, 200, 16, 40, 4
    q, k, v = (torch.randn(B, H, T, D, generator=g).requires_grad_() for _ in range(3))
    s = torch.randn(H, generator=g).requires_grad_() if logits else None
    pos = torch.arange(T)[None]
    inputs = [q, k, v] + ([s] if logits else [])
    go = torch.randn(B, H, T, D)
    ref = output_and_grads(lambda: reference_sink_attention(q, k, v, pos, pos, W, n, s), inputs, go)
    assert plan_mod.plan("auto", torch.full((1, H, 1), W - 1.0), T, T, grad=True).kernel == "band"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan_mod, "uses_native", lambda *a: native)
        got = output_and_grads(lambda: sink_window_attention(q, k, v, pos, pos, W, n, s), inputs, go)
    for name, a, b in zip(["out", "dq", "dk", "dv", "ds"][: len(ref)], got, ref, strict=True):
        assert _rel(a, b) <= 2e-5, (name, _rel(a, b))


@pytest.mark.parametrize("native", [False, True])
def test_band_log_sum_exp_is_the_span_softmax_normaliser_with_its_gradient(native):
    if native and not band_native.available():
        pytest.skip(f"compiled band kernel: {band_native.unavailable_reason()}")
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 100, 8, generator=g, dtype=torch.float32).requires_grad_() for _ in range(3))
    z = torch.tensor([5.0, 30.0]).view(1, 2, 1)
    go, gl = torch.randn(1, 2, 100, 8, generator=g), torch.randn(1, 2, 100, generator=g)
    d = torch.arange(100)[:, None] - torch.arange(100)[None, :]

    def ref():
        s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        s = s.masked_fill(~((d >= 0) & (d <= z[..., None])), -math.inf)
        lse = torch.logsumexp(s, -1)
        return (torch.exp(s - lse[..., None]) @ v * go).sum() + (lse * gl).sum()

    def fast():
        y, lse = band_span_attention(q, k, v, z, 1.0, True, chunk=16, native=native, with_lse=True)
        torch.testing.assert_close(y, reference_span_attention(q, k, v, z, 1.0, True), rtol=0, atol=1e-5)
        return (y * go).sum() + (lse * gl).sum()

    a = output_and_grads(ref, [q, k, v], torch.tensor(1.0))
    b = output_and_grads(fast, [q, k, v], torch.tensor(1.0))
    for x, y in zip(a, b, strict=True):
        assert _rel(y, x) <= 2e-5


def test_sink_window_cache_holds_window_plus_sinks_and_decodes_the_full_forward():
    torch.manual_seed(2)
    model = Transformer(tiny_config(span="sink_window", span_window=8, sink_tokens=3, sink_logits=True,
                                    context_len=128)).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.span.sink_logit.normal_()
    x = torch.randint(0, 64, (2, 120))
    with torch.no_grad():
        full, _ = model(x)  # 120 queries: the band kernel with the merged sinks
        cache = model.new_cache(2, 120)
        parts = [model(x[:, :5], cache=cache)[0]] + [model(x[:, i:i + 1], cache=cache)[0] for i in range(5, 120)]
    assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5
    keys = model.cfg.n_layer * 2 * model.cfg.n_head * model.cfg.head_dim * 4 * 2  # bytes per position, B = 2
    assert cache.nbytes() <= keys * (8 + 4 + 3)  # W + its compaction slack + n sinks, not 120 positions


def test_sink_window_covering_everything_is_dense_attention_exactly():
    torch.manual_seed(1)
    dense = Transformer(tiny_config())
    torch.manual_seed(1)
    other = Transformer(tiny_config(span="sink_window", span_window=40, sink_tokens=4))
    other.load_state_dict(dense.state_dict())
    x = torch.randint(0, 64, (2, 30))
    assert torch.equal(dense(x)[0], other(x)[0])


def test_sink_logits_train():
    model = Transformer(tiny_config(span="sink_window", span_window=8, sink_tokens=2, sink_logits=True,
                                    context_len=96)).train()
    x = torch.randint(0, 64, (2, 96))
    model(x, x)[1].backward()
    assert all(b.attn.span.sink_logit.grad.abs().sum() > 0 for b in model.blocks)


@pytest.mark.parametrize("kind", ["fox", "sink_window"])
def test_bench_attention_times_the_relatives_against_their_baselines(kind):
    import argparse

    from dynaformer.bench import attention

    p = argparse.ArgumentParser()
    attention.add_arguments(p)
    args = p.parse_args(["--kind", kind, "--seq", "512", "--span", "32", "--heads", "2", "--head_dim", "16",
                         "--repeats", "1"])
    record = next(attention.run(args))
    names = ("fox_unpruned", "fox_pruned", "dynamic_span") if kind == "fox" else ("sink_window", "window")
    assert all(record[f"{n}_ms"] > 0 for n in names + ("dense",))
    pruned = record["fox_pruned_pairs_frac" if kind == "fox" else "window_pairs_frac"]
    assert 0 < pruned < 0.5  # reach ~32 of 512 keys: the band kernel computes a fraction of the triangle
