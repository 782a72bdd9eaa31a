"""Attention span: every fast path matches the dense reference (outputs and gradients, span gradients
included), the span-bounded KV cache equals full recomputation after it has dropped keys, spans move in
training, and bad span settings are clean user errors."""

from __future__ import annotations

import pytest
import torch

from dynaformer.configtools import from_dict
from dynaformer.errors import ConfigError
from dynaformer.kernels import band_flops, band_native, band_span_attention, reference_span_attention, span_attention
from dynaformer.kernels.span import masked_sdpa_span_attention
from dynaformer.model import ModelConfig, Transformer
from dynaformer.model.generate import generate
from dynaformer.model.span import paid_span
from dynaformer.model.span_stats import span_stats

from .conftest import cli_in_process, output_and_grads, tiny_config


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _spans(kind: str, B: int, H: int, Tq: int, lo: float, hi: float) -> torch.Tensor:
    shape = (B, H, Tq) if kind == "dynamic" else (1, H, 1)
    return lo + (hi - lo) * torch.rand(shape)


CASES = [  # kind, B, H, Tq, Tk, span range, ramp
    ("dynamic", 2, 3, 100, 100, (0.0, 40.0), 8.0),  # spans ending inside the query's own chunk
    ("dynamic", 2, 2, 77, 130, (5.0, 60.0), 8.0),  # queries after a cached prefix (Tk > Tq)
    ("dynamic", 1, 2, 97, 97, (50.0, 200.0), 16.0),  # spans longer than the sequence for some rows
    ("per_head", 2, 3, 100, 100, (5.0, 40.0), 8.0),
    ("per_head", 2, 4, 150, 150, (10.0, 70.0), 4.5),
    ("fixed", 2, 3, 90, 90, (3.0, 50.0), 1.0),
]


@pytest.mark.parametrize("kind,B,H,Tq,Tk,zr,ramp", CASES)
@pytest.mark.parametrize("impl", ["band_box", "band_gather", "band_recompute", "native", "native_recompute",
                                  "masked"])
def test_fast_paths_match_reference(kind, B, H, Tq, Tk, zr, ramp, impl):
    hard = kind == "fixed"
    q, k, v = (torch.randn(B, H, T, 16, requires_grad=True) for T in (Tq, Tk, Tk))
    z = _spans(kind, B, H, Tq, *zr).requires_grad_(not hard)
    go = torch.randn(B, H, Tq, 16)

    def run(fn):
        return output_and_grads(fn, [q, k, v, z], go)

    ref = run(lambda: reference_span_attention(q, k, v, z, ramp, hard))
    if impl == "masked":
        got = run(lambda: masked_sdpa_span_attention(q, k, v, z, ramp, hard))
    elif impl.startswith("native"):  # the compiled kernel (csrc/band_span.cpp)
        if not band_native.available():
            pytest.skip(f"compiled band kernel: {band_native.unavailable_reason()}")
        keep = impl == "native"
        got = run(lambda: band_span_attention(q, k, v, z, ramp, hard, chunk=16, keep_scores=keep, native=True))
    else:  # chunk 16: lengths are not multiples of it; box_waste 0/1 forces the gather / box batching
        waste = 0.0 if impl == "band_gather" else 1.0
        keep = impl != "band_recompute"  # recompute: the backward rebuilds P from the kept log-sum-exp
        got = run(lambda: band_span_attention(q, k, v, z, ramp, hard, chunk=16, box_waste=waste, keep_scores=keep,
                                              native=False))
    names = ["out", "dq", "dk", "dv", "dz"]
    for name, a, b in zip(names[: len(got)], got, ref, strict=True):
        assert _rel(a, b) <= 1e-5, (name, _rel(a, b))
    if not hard:
        assert ref[-1].abs().sum() > 0  # the span gradient is exercised


def test_band_is_used_and_saves_work():
    z = torch.full((1, 8, 1), 256.0)
    computed, dense = band_flops(z.expand(1, 8, 4096), 4096, 4096, 32.0, False)
    assert computed < dense / 5  # span 256 of 4096: the band touches < 1/5 of the causal pairs
    # per-head spans: a long head must not make the short heads pay for it
    z2 = torch.tensor([4000.0] + [200.0] * 7).view(1, 8, 1)
    c2, _ = band_flops(z2.expand(1, 8, 4096), 4096, 4096, 32.0, False)
    assert c2 < (computed + dense / 8) * 1.05


def test_dispatch_dense_when_span_covers_everything():
    q, k, v = (torch.randn(1, 2, 50, 8) for _ in range(3))
    z = torch.full((1, 2, 1), 60.0)
    assert torch.equal(span_attention(q, k, v, z, 8.0), torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True))


def test_paid_span_is_tile_quantised_with_straight_through_gradient():
    z = torch.tensor([[[10.5, 3.0, 1.0, 70.25]]], requires_grad=True)  # (1, 1, 4): two tiles of 2 queries
    paid = paid_span(z, 4.0, 2)
    assert paid.tolist() == [[[16.0, 76.0]]]  # max reach z + R per tile, rounded up to the tile
    paid.sum().backward()
    assert z.grad.tolist() == [[[1.0, 0.0, 0.0, 1.0]]]


SMALL = dict(span_window=6, span_max=10, span_ramp=3, span_init=4.0)


def _span_model(span: str, **kw) -> Transformer:
    model = Transformer(tiny_config(span=span, **{**SMALL, **kw}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "span" in name:
                p.add_(0.5 * torch.randn_like(p))  # heads with different spans; dynamic: content-dependent
    return model.eval()


def test_none_and_covering_spans_equal_dense_exactly():
    x = torch.randint(0, 64, (2, 30))
    torch.manual_seed(1)
    dense = Transformer(tiny_config())
    for span, kw in [("fixed", dict(span_window=30)), ("per_head", dict(span_max=1000, span_init=999.0)),
                     ("dynamic", dict(span_max=1000, span_init=999.0))]:
        torch.manual_seed(1)
        other = Transformer(tiny_config(span=span, **kw))
        other.load_state_dict(dense.state_dict(), strict=False)
        assert torch.equal(dense(x)[0], other(x)[0]), span


@pytest.mark.parametrize("span", ["fixed", "per_head", "dynamic"])
def test_model_band_path_matches_reference_with_span_gradients(span):
    x = torch.randint(0, 64, (2, 70))
    torch.manual_seed(2)
    fast = _span_model(span, span_impl="band", context_len=70).train()
    ref = _span_model(span, span_impl="reference", context_len=70).train()
    ref.load_state_dict(fast.state_dict())
    for m in (fast, ref):
        _, loss = m(x, x)
        (loss + m.aux_loss()).backward()
    assert _rel(fast(x)[0], ref(x)[0]) <= 1e-5
    for (name, a), (_, b) in zip(fast.named_parameters(), ref.named_parameters(), strict=True):
        assert _rel(a.grad, b.grad) <= 1e-4, name
        if "span" in name:
            assert b.grad.abs().sum() > 0, name


@pytest.mark.parametrize("span", ["fixed", "per_head", "dynamic"])
def test_bounded_cache_equals_recomputation_after_dropping_keys(span):
    model = _span_model(span)
    x = torch.randint(0, 64, (2, 60))
    with torch.no_grad():
        full, _ = model(x)
        for chunks in ([60], [1] * 60, [7, 1, 1, 13, 18, 20]):
            cache = model.new_cache(2, 64)
            parts, i = [], 0
            for n in chunks:
                parts.append(model(x[:, i : i + n], cache=cache)[0])
                i += n
            assert (torch.cat(parts, 1) - full).abs().max().item() <= 1e-5, chunks
    dense_bytes = 2 * model.cfg.n_layer * 2 * model.cfg.n_head * 60 * model.cfg.head_dim * 4
    assert cache.length == 60
    held = sum(g.buf.shape[-2] for layer in cache.layers for g in layer.groups)
    assert held < model.cfg.n_layer * model.cfg.n_head * 60  # keys were dropped
    assert cache.nbytes() < dense_bytes


@pytest.mark.parametrize("span", ["fixed", "per_head", "dynamic"])
def test_generation_with_bounded_cache_equals_uncached(span):
    model = _span_model(span)
    prompt = torch.randint(0, 64, (2, 5))
    a = generate(model, prompt, 70, seed=3, temperature=0.8, max_len=80)  # keys dropped, no window slide
    b = generate(model, prompt, 70, seed=3, temperature=0.8, max_len=80, use_cache=False)
    assert torch.equal(a, b)
    a = generate(model, prompt, 50, seed=4, top_k=8)  # the window slides past context_len (cache refills)
    assert torch.equal(a, generate(model, prompt, 50, seed=4, top_k=8, use_cache=False))


def _train_spans(data_fn, penalty: float, init: float, steps: int) -> float:
    torch.manual_seed(0)
    cfg = tiny_config(n_layer=1, n_head=2, context_len=48, span="per_head", span_max=48, span_ramp=8,
                      span_init=init, span_penalty=penalty)
    model = Transformer(cfg).train()
    spans = [p for n, p in model.named_parameters() if "span" in n]
    rest = [p for n, p in model.named_parameters() if "span" not in n]
    opt = torch.optim.Adam([{"params": rest, "lr": 3e-2}, {"params": spans, "lr": 0.1}])
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = data_fn(g)
        _, loss = model(x, y)
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad()
    return float(span_stats(model)["span_mean"][0][0] + span_stats(model)["span_mean"][0][1]) / 2


def test_spans_grow_for_retrieval_and_shrink_on_local_text():
    def lag(g, L=12):  # y_t = x_{t−L}: the answer sits L tokens back
        x = torch.randint(0, 64, (16, 48), generator=g)
        y = torch.roll(x, L, 1)
        y[:, :L] = -100
        return x, y

    def local(g):  # y_t = x_t + 1: nothing beyond the token itself helps
        x = torch.randint(0, 63, (16, 48), generator=g)
        return x, x + 1

    grown = _train_spans(lag, penalty=0.0, init=8.0, steps=30)
    shrunk = _train_spans(local, penalty=2e-2, init=16.0, steps=30)
    assert grown > 11.0, grown  # from 8 towards the answer's distance (12), where m(12) reaches 1
    assert shrunk < 8.0, shrunk  # from 16


@pytest.mark.parametrize("field,value", [("span_window", 0), ("span_max", -4), ("span_ramp", 0),
                                         ("span_init", 0), ("span_tile", 0), ("span_penalty", -1.0),
                                         ("span", "sliding")])
def test_bad_span_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        from_dict(ModelConfig, {"span": "per_head", field: value}, "model")


def test_cli_bad_span_exits_2(tmp_path, capsys):
    res = cli_in_process(capsys, "train", "--span", "per_head", "--span_ramp", "0", "--out", str(tmp_path / "r"),
                         "--max_steps", "1")
    assert res.returncode == 2 and "span_ramp" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("kind", ["dynamic", "per_head", "fixed"])
def test_flex_block_mask_matches_reference_forward(kind, monkeypatch):
    """The GPU path's kv-tile block mask and score_mod, run by eager FlexAttention on CPU (forward only:
    CPU has no FlexAttention backward; the compiled GPU kernel itself is unverified here)."""
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    import dynaformer.kernels.flex as ks

    monkeypatch.setattr(ks, "_FLEX_COMPILED", flex.flex_attention)
    q, k, v = (torch.randn(2, 2, T, 16) for T in (300, 428, 428))  # Tk > Tq, lengths not multiples of 128
    z = _spans(kind, 2, 2, 300, 0.0, 200.0)
    got = ks.flex_span_attention(q, k, v, z, 16.0, kind == "fixed")
    assert _rel(got, reference_span_attention(q, k, v, z, 16.0, kind == "fixed")) <= 1e-5


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("keep", [True, False])
def test_band_survives_an_invisible_key_that_outscores_every_visible_one(hard, keep, native):
    if native and not band_native.available():
        pytest.skip(f"compiled band kernel: {band_native.unavailable_reason()}")
    # The band kernel's softmax takes the row max over all window columns; a key outside the span whose
    # score beats every visible one by far more than exp's range must not zero the visible row (NaN), nor
    # overflow when the backward recomputes P from the log-sum-exp.
    torch.manual_seed(0)
    B, H, T, D = 1, 2, 160, 16
    q, k, v = (torch.randn(B, H, T, D) for _ in range(3))
    q[..., 0] = 1.0
    k[:, :, 40:60, 0] = 2000.0  # far keys: out of every late query's span, scores ~ +500
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    z = torch.full((1, H, 1), 20.0, requires_grad=not hard)
    go = torch.randn(B, H, T, D)
    ref = output_and_grads(lambda: reference_span_attention(q, k, v, z, 4.0, hard), [q, k, v, z], go)
    got = output_and_grads(lambda: band_span_attention(q, k, v, z, 4.0, hard, chunk=16, keep_scores=keep,
                                                               native=native),
                           [q, k, v, z], go)
    assert _rel(got[0], ref[0]) <= 1e-5
    for a, b in zip(got, ref, strict=True):  # gradients through |k| = 2000 keys: fp32 rounding ~1e-4 on both
        assert torch.isfinite(a).all() and _rel(a, b) <= 1e-3


@pytest.mark.parametrize("kind", ["per_head", "dynamic"])
def test_heads_that_cover_everything_run_dense_and_still_match(kind, monkeypatch):
    # One head's span covers the whole sequence: auto runs it as dense SDPA and the rest through the band
    # kernel; outputs and gradients (spans included) equal the reference.
    import dynaformer.kernels.span as S

    calls = []
    band = S.band_span_attention
    monkeypatch.setattr(S, "band_span_attention", lambda q, *a, **kw: calls.append(q.shape[1]) or band(q, *a, **kw))
    B, H, T = 2, 4, 150
    q, k, v = (torch.randn(B, H, T, 16, requires_grad=True) for _ in range(3))
    z = _spans(kind, B, H, T, 5.0, 30.0)
    z[:, 2] = 500.0  # head 2 sees everything
    z.requires_grad_(True)
    go = torch.randn(B, H, T, 16)
    outs = []
    for fn in (lambda: reference_span_attention(q, k, v, z, 8.0), lambda: span_attention(q, k, v, z, 8.0)):
        for t in (q, k, v, z):
            t.grad = None
        out = fn()
        out.backward(go)
        outs.append([out.detach()] + [t.grad.clone() for t in (q, k, v, z)])
    assert calls == [3]  # the band kernel saw only the three short heads
    for a, b in zip(outs[1], outs[0], strict=True):
        assert _rel(a, b) <= 1e-5


def test_plan_picks_each_kernel_where_it_applies():
    from dynaformer.kernels import plan

    short = torch.full((1, 4, 1), 20.0)
    assert plan("auto", short, 8, 500).kernel == "decode"  # a few queries without autograd
    assert plan("auto", short, 8, 500, grad=True).kernel == "masked"  # fewer queries than a chunk
    assert plan("auto", short, 300, 300, grad=True).kernel == "band"
    assert plan("auto", short, 300, 300, padded=True).kernel == "masked"  # padded batches: exact masked SDPA
    assert plan("reference", short, 300, 300, padded=True).kernel == "reference"
    assert plan("auto", torch.full((1, 4, 1), 400.0), 300, 300).kernel == "dense"  # spans cover every key
    mixed = torch.tensor([400.0, 20.0, 20.0, 20.0]).view(1, 4, 1)
    p = plan("auto", mixed, 300, 300, grad=True)
    assert p.kernel == "split" and p.cover.tolist() == [True, False, False, False]
    # FlexAttention is unverified: auto never picks it, on CUDA the masked SDPA runs
    assert plan("auto", short, 300, 300, device="cuda", grad=True).kernel == "masked"
    assert plan("flex", short, 300, 300, device="cuda").kernel == "flex"


def test_band_flops_counts_the_kernel_that_runs(monkeypatch):
    z = 100 + 50 * torch.rand(2, 4, 512)
    native_pairs, dense = band_flops(z, 512, 512, 16.0, False)
    monkeypatch.setenv("DYNAFORMER_NATIVE", "0")
    monkeypatch.setattr(band_native, "_module", None)
    monkeypatch.setattr(band_native, "_reason", None)
    python_pairs, _ = band_flops(z, 512, 512, 16.0, False)  # the Python kernel batches rows at their max E
    assert native_pairs <= python_pairs < dense
    assert band_native.unavailable_reason() == "disabled by DYNAFORMER_NATIVE=0"
    q, k, v = (torch.randn(2, 4, 512, 16) for _ in range(3))
    out = band_span_attention(q, k, v, z, 16.0)  # falls back to the Python kernel
    assert _rel(out, reference_span_attention(q, k, v, z, 16.0)) <= 1e-5
    with pytest.raises(RuntimeError, match="DYNAFORMER_NATIVE=0"):
        band_span_attention(q, k, v, z, 16.0, native=True)


def test_bench_attention_contention_reports_idle_and_loaded():
    import argparse

    from dynaformer.bench import attention

    p = argparse.ArgumentParser()
    attention.add_arguments(p)
    args = p.parse_args(["--seq", "256", "--span", "32", "--repeats", "1", "--contention"])
    record = next(attention.run(args))
    assert record["loaded_dense_ms"] > 0 and record["loaded_span_ms"] > 0
    assert record["loaded_over_idle"] == pytest.approx(record["loaded_speedup"] / record["speedup"], rel=0.02)
