"""The residual-stream relatives (model/streams.py, model/value_residual.py) against their references.

Parity: our hyper-connections (dynamic and static) and mHC layers against the reference code of
`hyper-connections` 0.4.11 (lucidrains; `HyperConnections`, `ManifoldConstrainedHyperConnections` = `mHC`, and its
`sinkhorn_knopps`), the same weights copied across: outputs and gradients (input and every weight) agree within
float tolerance. AttnRes and the value residual have no package reference: their defining equations are checked
on small hand-computed cases. Then the model invariants with every mechanism weight moved off its init (the
matrix tests in test_model.py leave the zero-initialised projections at zero), identity at init where the method
has one, the diagnostics, and training end to end."""

from __future__ import annotations

import copy
import importlib.metadata
import math
from pathlib import Path

import pytest
import torch

from dynaformer.eval.diagnostics import branch_stream_ratios
from dynaformer.model import Transformer
from dynaformer.model.residual import STREAMS, make_residual, residual_stats
from dynaformer.model.streams import depth_attention, sinkhorn_knopp
from dynaformer.model.value_residual import ValueResidual

from .conftest import tiny_config

hc = pytest.importorskip("hyper_connections")
REFERENCE = "hyper-connections"
REFERENCE_VERSION = "0.4.11"
KINDS = sorted(STREAMS)  # hyper, hyper_static, mhc, attnres


def test_reference_is_the_named_version():
    assert importlib.metadata.version(REFERENCE) == REFERENCE_VERSION


def _perturbed(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Every parameter moved off its init, so dynamic terms (zero at init) and scales are exercised."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _to_ref_layout(h: torch.Tensor) -> torch.Tensor:
    """(B, T, n, C) → the reference's (B·n, T, C), batch outer, stream inner."""
    B, T, n, C = h.shape
    return h.permute(0, 2, 1, 3).reshape(B * n, T, C)


def _from_ref_layout(r: torch.Tensor, n: int) -> torch.Tensor:
    Bn, T, C = r.shape
    return r.view(Bn // n, n, T, C).permute(0, 2, 1, 3)


def _run_pair(ours, ref, n: int, dtype: torch.dtype, layer: int):
    """Outputs and gradients of our layer and the reference's on the same streams and branch weights."""
    torch.manual_seed(1)
    B, T, C = 2, 5, ours.norm.weight.numel()
    lin = torch.nn.Linear(C, C, bias=False).to(dtype)
    ref_norm, ref_lin = copy.deepcopy(ours.norm), copy.deepcopy(lin)
    h = torch.randn(B, T, n, C, dtype=dtype, requires_grad=True)
    h_ref = _to_ref_layout(h.detach()).requires_grad_()
    probe = torch.randn(B, T, n, C, dtype=dtype)

    out = ours(h, lambda u: lin(u), None)
    branch_in, add = ref(h_ref)
    out_ref = _from_ref_layout(add(ref_lin(ref_norm(branch_in))), n)
    (out * probe).sum().backward()
    (out_ref * probe).sum().backward()
    grads = {"input": (h.grad, _from_ref_layout(h_ref.grad, n)), "branch": (lin.weight.grad, ref_lin.weight.grad),
             "branch_norm": (ours.norm.weight.grad, ref_norm.weight.grad)}
    return out, out_ref, grads


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("layer", [0, 3])
def test_hyper_dynamic_equals_reference(layer):
    """`hyper` (DHC) = hyper_connections.HyperConnections (tanh on, n = 4), float64."""
    n = 4
    cfg = tiny_config(residual="hyper", hc_streams=n, norm_eps=1e-300)
    ours = _perturbed(make_residual(cfg, layer)).double()
    ref = hc.HyperConnections(n, dim=cfg.d_model, layer_index=layer, tanh=True).double()
    with torch.no_grad():  # copy ours → reference
        ref.static_alpha.copy_(torch.cat([ours.static_pre[:, None], ours.static_mix], dim=1))
        ref.dynamic_alpha_fn.copy_(ours.proj[:, : n + 1])
        ref.dynamic_alpha_scale.copy_(ours.alpha_scale[0])
        ref.static_beta.copy_(ours.static_post)
        ref.dynamic_beta_fn.copy_(ours.proj[:, n + 1])
        ref.dynamic_beta_scale.copy_(ours.beta_scale[0])
        ref.norm.gamma.copy_(ours.coef_norm.weight - 1)  # theirs scales by (γ + 1)
    out, out_ref, grads = _run_pair(ours, ref, n, torch.float64, layer)
    assert _max_err(out, out_ref) < 1e-12
    grads["static_alpha"] = (torch.cat([ours.static_pre.grad[:, None], ours.static_mix.grad], 1), ref.static_alpha.grad)
    grads["dynamic_alpha_fn"] = (ours.proj.grad[:, : n + 1], ref.dynamic_alpha_fn.grad)
    grads["dynamic_beta_fn"] = (ours.proj.grad[:, n + 1], ref.dynamic_beta_fn.grad)
    grads["alpha_scale"] = (ours.alpha_scale.grad[0], ref.dynamic_alpha_scale.grad)
    grads["beta_scale"] = (ours.beta_scale.grad[0], ref.dynamic_beta_scale.grad)
    grads["static_beta"] = (ours.static_post.grad, ref.static_beta.grad)
    grads["coef_norm"] = (ours.coef_norm.weight.grad, ref.norm.gamma.grad)
    for name, (a, b) in grads.items():
        assert _max_err(a, b) < 1e-10, name


def test_hyper_static_equals_reference_without_dynamic_terms():
    """`hyper_static` (SHC) = the reference with its dynamic projections held at zero, float64."""
    n, layer = 4, 1
    cfg = tiny_config(residual="hyper_static", hc_streams=n, norm_eps=1e-300)
    ours = _perturbed(make_residual(cfg, layer)).double()
    ref = hc.HyperConnections(n, dim=cfg.d_model, layer_index=layer).double()
    with torch.no_grad():
        ref.static_alpha.copy_(torch.cat([ours.static_pre[:, None], ours.static_mix], dim=1))
        ref.static_beta.copy_(ours.static_post)
    assert not ref.dynamic_alpha_fn.any() and not ref.dynamic_beta_fn.any()
    out, out_ref, grads = _run_pair(ours, ref, n, torch.float64, layer)
    assert _max_err(out, out_ref) < 1e-12
    grads["static_alpha"] = (torch.cat([ours.static_pre.grad[:, None], ours.static_mix.grad], 1), ref.static_alpha.grad)
    grads["static_beta"] = (ours.static_post.grad, ref.static_beta.grad)
    for name, (a, b) in grads.items():
        assert _max_err(a, b) < 1e-10, name


@pytest.mark.parametrize("iters", [20, 3])
def test_mhc_per_stream_equals_reference(iters):
    """`mhc` with mhc_per_stream = hyper_connections.mHC, which computes in float32 whatever its input: compared
    in float32 (measured: outputs within ~1e-7 relative, gradients within ~1e-6)."""
    n, layer = 4, 2
    cfg = tiny_config(residual="mhc", hc_streams=n, mhc_per_stream=True, mhc_sinkhorn_iters=iters, norm_eps=1e-30)
    ours = _perturbed(make_residual(cfg, layer))
    ref = hc.mHC(n, dim=cfg.d_model, layer_index=layer, sinkhorn_iters=iters)
    with torch.no_grad():
        ref.static_alpha.copy_(torch.cat([ours.static_pre[:, None], ours.static_mix], dim=1))
        ref.dynamic_alpha_fn.copy_(ours.proj[None, :, : n + 1])
        ref.pre_branch_scale.copy_(ours.alpha_pre)
        ref.residual_scale.copy_(ours.alpha_res)
        ref.static_beta.copy_(ours.static_post)
        ref.dynamic_beta_fn.copy_(ours.proj[:, n + 1])
        ref.h_post_scale.copy_(ours.alpha_post[0])
        ref.norm.gamma.copy_(ours.coef_norm.weight - 1)
    out, out_ref, grads = _run_pair(ours, ref, n, torch.float32, layer)
    assert _max_err(out, out_ref) < 2e-6
    grads["static_alpha"] = (torch.cat([ours.static_pre.grad[:, None], ours.static_mix.grad], 1), ref.static_alpha.grad)
    grads["dynamic_alpha_fn"] = (ours.proj.grad[None, :, : n + 1], ref.dynamic_alpha_fn.grad)
    grads["dynamic_beta_fn"] = (ours.proj.grad[:, n + 1], ref.dynamic_beta_fn.grad)
    grads["pre_scale"] = (ours.alpha_pre.grad, ref.pre_branch_scale.grad)
    grads["res_scale"] = (ours.alpha_res.grad, ref.residual_scale.grad)
    grads["post_scale"] = (ours.alpha_post.grad[0], ref.h_post_scale.grad)
    grads["static_beta"] = (ours.static_post.grad, ref.static_beta.grad)
    grads["coef_norm"] = (ours.coef_norm.weight.grad, ref.norm.gamma.grad)
    for name, (a, b) in grads.items():
        assert _max_err(a, b) < 2e-5, name


def test_sinkhorn_equals_reference_and_is_doubly_stochastic():
    from hyper_connections.manifold_constrained_hyper_connections import sinkhorn_knopps

    torch.manual_seed(0)
    logits = torch.randn(6, 4, 4, dtype=torch.float64).requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    ours = sinkhorn_knopp(logits, 20)
    ref = sinkhorn_knopps(ref_logits.float(), iters=20).double()
    assert _max_err(ours, ref) < 1e-5  # theirs runs in float32
    probe = torch.randn_like(ours)
    (ours * probe).sum().backward()
    (ref * probe).sum().backward()
    assert _max_err(logits.grad, ref_logits.grad) < 1e-4
    assert (ours >= 0).all()
    assert torch.allclose(ours.sum(-1), torch.ones(6, 4, dtype=torch.float64), atol=1e-12)  # the last step: exact
    assert torch.allclose(ours.sum(-2), torch.ones(6, 4, dtype=torch.float64), atol=1e-3)  # 20 rounds: close, not exact
    assert tiny_config(residual="mhc").mhc_sinkhorn_iters == 20  # the paper's t_max


def test_mhc_flat_follows_the_papers_equations():
    """The paper's mHC (arXiv 2512.24880 §4.2), n = 2, C = 2, written out by hand: x̃ = RMSNorm(vec(x)),
    H_pre = σ(α_pre·x̃φ_pre + b_pre), H_post = 2σ(α_post·x̃φ_post + b_post), H_res = SK(α_res·mat(x̃φ_res) + b_res),
    x' = H_resᵀ-weighted streams + H_postᵀ·F(H_pre·x)."""
    n, C = 2, 2
    cfg = tiny_config(residual="mhc", hc_streams=n, d_model=C, n_head=1, norm_eps=1e-30)
    m = _perturbed(make_residual(cfg, 0)).double()
    h = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], dtype=torch.float64)  # (1, 1, n, C)
    W = torch.tensor([[0.3, -1.2], [0.7, 0.4]], dtype=torch.float64)

    def branch(u):
        return u @ W.T

    out = m(h, branch, None)[0, 0]
    vec = h[0, 0].reshape(-1)
    xt = vec / math.sqrt(float((vec**2).mean())) * m.coef_norm.weight
    z = xt @ m.proj
    pre = torch.sigmoid(m.alpha_pre * z[:n] + m.static_pre)
    post = 2 * torch.sigmoid(m.alpha_post * z[n : 2 * n] + m.static_post)
    M = torch.exp(m.alpha_res * z[2 * n :].view(n, n) + m.static_mix)
    for _ in range(cfg.mhc_sinkhorn_iters):
        M = M / M.sum(0, keepdim=True)
        M = M / M.sum(1, keepdim=True)
    x_in = pre[0] * h[0, 0, 0] + pre[1] * h[0, 0, 1]
    f = branch(m.norm(x_in))
    expect = torch.stack([M[0, t] * h[0, 0, 0] + M[1, t] * h[0, 0, 1] + post[t] * f for t in range(n)])
    assert torch.allclose(out, expect, atol=1e-12)
    # Mass: the streams' sum changes by Σ_t post_t·F only (the mixing is doubly stochastic, rows exact).
    assert torch.allclose(out.sum(0), h[0, 0].sum(0) + post.sum() * f, atol=1e-12)


def test_attnres_follows_the_papers_equation():
    """h_l = Σ_i softmax_i(w_lᵀ RMSNorm(v_i))·v_i over v_0 (embedding) … v_{l−1}, by hand for three vectors."""
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]], dtype=torch.float64)  # (k=3, C=2)
    w = torch.tensor([0.5, -1.0], dtype=torch.float64)
    keys = [vi / math.sqrt(float((vi**2).mean())) for vi in v]  # RMSNorm without gain
    logits = torch.tensor([float(w @ k) for k in keys])
    a = torch.exp(logits) / torch.exp(logits).sum()
    expect = sum(a[i] * v[i] for i in range(3))
    got = depth_attention(v[None, None], w, 0.0)[0, 0]
    assert torch.allclose(got, expect.double(), atol=1e-12)
    # Zero query: the mean (the paper's init).
    assert torch.allclose(depth_attention(v[None, None], torch.zeros(2, dtype=torch.float64), 0.0)[0, 0], v.mean(0))


def test_attnres_layer_appends_its_output_and_reads_the_stack():
    cfg = tiny_config(residual="attnres")
    m = _perturbed(make_residual(cfg, 1))
    state = torch.randn(2, 3, 4, cfg.d_model)
    lin = torch.nn.Linear(cfg.d_model, cfg.d_model, bias=False)
    out = m(state, lin, None)
    assert out.shape == (2, 3, 5, cfg.d_model) and torch.equal(out[..., :4, :], state)
    expect = lin(m.norm(depth_attention(state, m.query, cfg.norm_eps)))
    assert torch.allclose(out[..., 4, :], expect, atol=1e-6)


def test_value_residual_follows_the_papers_equation():
    """ResFormer: V'_n = λ₁·V_n + λ₂·V_1; λ starts at (0.5, 0.5)."""
    mix = ValueResidual()
    assert mix.mix.tolist() == [0.5, 0.5]
    v, v1 = torch.tensor([[2.0, -4.0]]), torch.tensor([[6.0, 8.0]])
    assert torch.equal(mix(v, v1), torch.tensor([[4.0, 2.0]]))
    with torch.no_grad():
        mix.mix.copy_(torch.tensor([0.25, -1.0]))
    assert torch.equal(mix(v, v1), torch.tensor([[0.5 - 6.0, -1.0 - 8.0]]))


def test_value_residual_in_the_model():
    """With λ = (1, 0) the model is the model without it (same weights); with λ = (0, 1) a later layer attends
    with the first layer's values of the same tokens."""
    torch.manual_seed(0)
    base = Transformer(tiny_config(n_layer=3)).eval()
    torch.manual_seed(0)
    vr = Transformer(tiny_config(n_layer=3, value_residual=True)).eval()
    assert vr.blocks[0].attn.value_mix is None and vr.blocks[1].attn.value_mix is not None
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        for b in vr.blocks[1:]:
            b.attn.value_mix.mix.copy_(torch.tensor([1.0, 0.0]))
        assert torch.equal(vr(x)[0], base(x)[0])
        assert not torch.equal(vr.blocks[1].attn.value_mix(torch.ones(1), torch.zeros(1)), torch.zeros(1))
        for b in vr.blocks[1:]:
            b.attn.value_mix.mix.copy_(torch.tensor([0.0, 1.0]))
        seen = {}
        vr.blocks[2].attn.value_mix.register_forward_hook(lambda mod, a, o: seen.update(first=a[1], out=o))
        vr(x)
        B, T, C, H = 2, 12, 32, 2
        v0 = vr.blocks[0].attn.qkv(vr.blocks[0].attn_res.norm(vr.embed(x)))[..., 2 * C :]
        v0 = v0.view(B, T, H, C // H).transpose(1, 2)  # layer 0's values, (B, H, T, D)
    assert torch.allclose(seen["first"], v0, atol=1e-6) and torch.equal(seen["out"], seen["first"])


def _model(residual: str, **kw) -> Transformer:
    torch.manual_seed(0)
    return _perturbed(Transformer(tiny_config(residual=residual, **kw)), 0.05).eval()


@pytest.mark.parametrize("value_residual", [False, True])
@pytest.mark.parametrize("residual", KINDS + ["prenorm"])
def test_causal_and_cache_equivalent_with_every_weight_moved(residual, value_residual):
    model = _model(residual, value_residual=value_residual)
    x = torch.randint(0, 64, (2, 30))
    y = x.clone()
    y[:, 20:] = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full, _ = model(x)
        assert torch.equal(full[:, :20], model(y)[0][:, :20])
        cache = model.new_cache(2, 30)
        parts = [model(x[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 8), (8, 30))]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


@pytest.mark.parametrize("value_residual", [False, True])
@pytest.mark.parametrize("residual", KINDS)
def test_left_padded_rows_equal_rows_alone(residual, value_residual):
    model = _model(residual, value_residual=value_residual)
    a, b = torch.randint(0, 64, (1, 12)), torch.randint(0, 64, (1, 8))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        both, _ = model(batch, key_padding_mask=mask)
        assert torch.allclose(both[0], model(a)[0][0], atol=1e-5)
        assert torch.allclose(both[1, 4:], model(b)[0][0], atol=1e-5)


@pytest.mark.parametrize("residual", ["hyper", "hyper_static", "attnres"])
def test_starts_as_prenorm(residual):
    """Hyper-connections' init (all streams hold the pre-norm stream; the final sum is n·x) and AttnRes' zero
    queries (each layer reads the mean, i.e. the pre-norm stream / l) give pre-norm's logits: exactly up to the
    norms' ε, so with ε → 0 they agree to float rounding."""
    torch.manual_seed(0)
    pre = Transformer(tiny_config(norm_eps=1e-30))
    torch.manual_seed(0)
    rel = Transformer(tiny_config(residual=residual, norm_eps=1e-30))
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.allclose(rel(x)[0], pre(x)[0], atol=2e-6, rtol=0)


def test_mhc_init_is_stated():
    """mHC's init is not pre-norm: every branch enters each stream with weight 2σ(1) and H_res = SK(I)."""
    m = make_residual(tiny_config(residual="mhc"), 0)
    pre, mix, post = m.mappings(torch.randn(1, 1, 4, 32))
    assert torch.allclose(post, torch.full_like(post, 2 * torch.sigmoid(torch.tensor(1.0)).item()))
    assert torch.allclose(mix.sum(-1), torch.ones(1, 1, 4)) and torch.allclose(mix.sum(-2), torch.ones(1, 1, 4))
    assert torch.allclose(pre[0, 0], torch.tensor([torch.sigmoid(torch.tensor(1.0)).item(), 0.5, 0.5, 0.5]))


@pytest.mark.parametrize("residual", KINDS)
def test_diagnostics_and_metrics(residual):
    model = _model(residual)
    ratios = branch_stream_ratios(model, torch.randint(0, 64, (3, 17)))
    assert len(ratios) == 4 and all(math.isfinite(r) and r > 0 for r in ratios)
    stats = residual_stats(model)
    assert stats and all(len(v) == 4 for v in stats.values())


def test_streams_are_n_copies_and_reduce_sums():
    model = Transformer(tiny_config(residual="hyper", hc_streams=3))
    x = torch.randn(2, 5, 32)
    s = model.stream.expand(x)
    assert s.shape == (2, 5, 3, 32) and torch.equal(model.stream.reduce(s), 3 * x)
    assert Transformer(tiny_config()).stream is None  # single-stream kinds: nothing added


@pytest.mark.parametrize("residual", KINDS)
def test_a_few_training_steps_lower_the_loss(residual):
    torch.manual_seed(0)
    model = Transformer(tiny_config(residual=residual, value_residual=residual == "hyper"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, 64, (4, 24))
    losses = []
    for _ in range(8):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3


def test_a_tiny_grid_with_a_relative_trains_and_reports(tmp_path):
    """A grid with one relative (mHC with the value residual) beside the reference and the dynamic residual trains
    end to end, records its residual coefficients and reaches the report's Relatives section."""
    import json

    from dynaformer.study.compare import run_grid
    from dynaformer.study.grid import grid_from_dict
    from dynaformer.study.report import write_report

    grid = {"name": "relatives",
            "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_len": 64},
            "train": {"max_steps": 4, "batch_size": 4, "eval_interval": 4, "eval_tokens": 512, "log_interval": 2,
                      "ckpt_interval": 4, "warmup_steps": 1, "data": "task:passkey?text=builtin:stories&frac=0.5",
                      "threads": 1, "progress_bar": False, "dtype": "fp32"},
            "variants": {"baseline": {}, "dyn_residual": {"residual": "dynamic"},
                         "mhc_vr": {"residual": "mhc", "value_residual": True, "n_layer": 2}},
            "seeds": 1,
            "eval": {"tasks": ["passkey"], "n_per_distance": 2, "text_tokens": 512, "diag_windows": 2,
                     "multiples": [1], "cost_lengths": [128], "cost_repeats": 1},
            "questions": {"residual": "dyn_residual", "span": "dyn_residual", "relatives": {"residual": ["mhc_vr"]}}}
    status = run_grid(grid_from_dict(grid), tmp_path / "out", workers=0, progress=False)
    assert sorted(status["done"]) == ["baseline/seed0", "dyn_residual/seed0", "mhc_vr/seed0"] and not status["failed"]
    result = json.loads((tmp_path / "out" / "cells" / "mhc_vr" / "seed0" / "result.json").read_text())
    assert result["steps"] == 4 and math.isfinite(result["val_loss"])
    assert len(result["diagnostics"]["grad_norm_layers"]) == 2
    metrics = (tmp_path / "out" / "cells" / "mhc_vr" / "seed0" / "run" / "metrics.jsonl").read_text()
    assert "res_mix_diag" in metrics  # mHC's coefficients are logged like the dynamic residual's
    rep = write_report([tmp_path / "out"], tmp_path / "rep")
    md = Path(rep["markdown"]).read_text()
    assert "Relatives" in md and "mhc_vr" in md
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["relatives"]["residual"]["relatives"] == ["mhc_vr"]
