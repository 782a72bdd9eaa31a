"""Residual kinds: dynamic == pre-norm at init, the dynamic weight against a slow reference (incl. the
cached inference path), cache/causality with every dynamic parameter moved, each kind's init and
training, the 48-layer depth test, diagnostics, metrics logging, and bad input."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from dynaformer.configtools import from_dict
from dynaformer.errors import ConfigError
from dynaformer.eval import diagnostics as diag
from dynaformer.model import ModelConfig, Transformer
from dynaformer.model.residual import DynamicResidual, cait_layerscale_init, residual_modules, residual_stats
from dynaformer.train.optim import no_weight_decay

from .conftest import RESIDUALS, cli_in_process, tiny_config

FACTORS = ("dyn_gain", "dyn_step", "dyn_position", "dyn_content")


def _seeded(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(**kw))


def _perturb(model: Transformer, scale: float = 0.3) -> Transformer:
    """Move every residual-mechanism parameter (including the content projection w) off its init."""
    with torch.no_grad():
        for mod in residual_modules(model):
            for name, p in mod.named_parameters():
                if "norm" not in name:
                    p.add_(scale * torch.randn_like(p))
    return model


def _block_grad_norms(model: Transformer, x: torch.Tensor) -> list[float]:
    model.zero_grad(set_to_none=True)
    model(x, x)[1].backward()
    return diag.layer_grad_norms(model)


# --- dynamic == prenorm at init ---------------------------------------------------------------------------

@pytest.mark.parametrize("factors", [FACTORS, ("dyn_position",), ("dyn_content",), ("dyn_step",), ()])
@pytest.mark.parametrize("progress", [0.0, 0.7])
def test_dynamic_at_init_equals_prenorm(factors, progress):
    flags = {f: f in factors for f in FACTORS}
    pre, dyn = _seeded(n_layer=3), _seeded(n_layer=3, residual="dynamic", **flags)
    pre.progress.fill_(progress)
    dyn.progress.fill_(progress)
    x = torch.randint(0, 64, (2, 40))  # beyond context_len too
    for mode in (torch.no_grad, torch.enable_grad):  # the cached inference path and the autograd path
        with mode():
            assert torch.equal(pre(x)[0], dyn(x)[0])
    g_pre, g_dyn = _block_grad_norms(pre, x), _block_grad_norms(dyn, x)
    assert g_pre == g_dyn  # exactly: the weight is exactly 1 and adds exact zeros to every gradient
    # Every gate gets a gradient at step 0 (none is stuck at a saddle) except γ (tanh(w·h) = 0 at w = 0).
    for mod in residual_modules(dyn):
        for name, p in mod.named_parameters():
            if name not in ("content_coef", "norm.weight") and not (name == "scale_coef" and progress == 0.0):
                assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dynamic_gates_are_tagged_and_initialised():
    model = _seeded(residual="dynamic")
    res = residual_modules(model)[0]
    assert isinstance(res, DynamicResidual)
    for name, p in res.named_parameters():
        if name != "norm.weight":
            assert getattr(p, "no_weight_decay", False) and no_weight_decay(p), name
    assert torch.all(res.content_proj == 0) and res.content_proj.shape == (4, 32)
    assert torch.all(res.scale_coef == 0) and res.pos_coef == 0
    ablated = _seeded(residual="dynamic", dyn_content=False, dyn_position=False)
    names = {n for n, _ in residual_modules(ablated)[0].named_parameters()}
    assert names == {"norm.weight", "scale_coef"}


# --- the weight against a slow reference ------------------------------------------------------------------

@torch.no_grad()
def _reference_weight(mod: DynamicResidual, h: torch.Tensor, start: int, tau: float, p0: float) -> torch.Tensor:
    """c·s(τ)·m(p, x) written out per token, in float64, straight from the formula."""
    h = h.double()
    B, T, _ = h.shape
    coefs = dict(zip(mod.scale_names, mod.scale_coef.double().tolist(), strict=True)) if mod.scale_coef is not None \
        else {}
    cs = 1 + coefs.get("gain", 0.0) + coefs.get("step_a", 0.0) * tau + coefs.get("step_b", 0.0) * tau**2
    out = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            m = 1.0
            if mod.pos_coef is not None:
                m += float(mod.pos_coef) * math.log((start + t + 1) / p0)
            if mod.content_proj is not None:
                z = torch.tanh(mod.content_proj.double() @ h[b, t])
                m += float(mod.content_coef.double()[0] @ z)
            out[b, t] = cs * m
    return out


@pytest.mark.parametrize("factors", [FACTORS, ("dyn_position", "dyn_step"), ("dyn_content",), ("dyn_gain",)])
def test_dynamic_weight_matches_reference(factors):
    from dynaformer.model.context import ForwardContext

    cfg = tiny_config(residual="dynamic", dyn_p0=5.0, **{f: f in factors for f in FACTORS})
    mod = _perturb(Transformer(cfg)).blocks[0].attn_res
    h = torch.randn(2, 6, 32)
    for start in (0, 37):
        ctx = ForwardContext(start=start, length=6, progress=torch.tensor(0.6))
        ref = _reference_weight(mod, h, start, 0.6, 5.0)
        with torch.enable_grad():
            m = mod.multiplier(h, ctx)
        with torch.no_grad():
            m_inf = mod.inference_multiplier(h, ctx)
        assert torch.allclose(torch.as_tensor(m).expand(2, 6, 1)[..., 0].double(), ref, atol=1e-5)
        assert torch.allclose(m_inf.expand(2, 6, 1)[..., 0].double(), ref, atol=1e-5)
        # decoding one token at a time gives the same weights
        for t in range(6):
            one = ForwardContext(start=start + t, length=1, progress=torch.tensor(0.6))
            with torch.no_grad():
                w = mod.inference_multiplier(h[:, t : t + 1], one)
            assert torch.allclose(w.expand(2, 1, 1)[:, 0, 0].double(), ref[:, t], atol=1e-5)


def test_dynamic_position_is_the_token_own_position():
    """A token's weight depends on its absolute position only, not on how long the sequence is."""
    model = _perturb(_seeded(residual="dynamic")).eval()
    x = torch.randint(0, 64, (1, 30))
    with torch.no_grad():
        short, long = model(x[:, :10])[0], model(x)[0]
    assert torch.allclose(short, long[:, :10], atol=1e-6)


@pytest.mark.parametrize("factors", [FACTORS, ("dyn_content",), ("dyn_position",)])
def test_dynamic_cache_causality_and_paths(factors):
    """With every parameter moved (w too, which the shared MATRIX tests leave at 0): cached decoding ==
    full forward beyond the training context, causality, autograd path == inference path."""
    model = _perturb(_seeded(residual="dynamic", **{f: f in factors for f in FACTORS})).eval()
    model.progress.fill_(0.8)
    x = torch.randint(0, 64, (2, 45))
    with torch.no_grad():
        full = model(x)[0]
        cache, parts, i = model.new_cache(2, 45), [], 0
        for n in (9, 1, 1, 20, 14):
            parts.append(model(x[:, i : i + n], cache=cache)[0])
            i += n
    assert (full - torch.cat(parts, 1)).abs().max() <= 1e-5
    with torch.enable_grad():
        assert torch.allclose(model(x)[0], full, atol=1e-5)
    y = x.clone()
    y[:, 20:] = (y[:, 20:] + 1) % 64
    with torch.no_grad():
        other = model(y)[0]
    assert torch.equal(other[:, :20], full[:, :20]) and not torch.allclose(other[:, 20:], full[:, 20:])


def test_inference_cache_follows_parameters_and_progress():
    model = _perturb(_seeded(residual="dynamic")).eval()
    x = torch.randint(0, 64, (1, 12))

    def both():
        with torch.no_grad():
            a = model(x)[0]
        with torch.enable_grad():
            b = model(x)[0].detach()
        return a, b

    a0, _ = both()
    with torch.no_grad():
        model.blocks[0].attn_res.pos_coef.add_(0.5)
    a1, b1 = both()
    assert not torch.allclose(a0, a1) and torch.allclose(a1, b1, atol=1e-5)
    model.progress.fill_(0.9)
    a2, b2 = both()
    assert not torch.allclose(a1, a2) and torch.allclose(a2, b2, atol=1e-5)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.blocks[1].mlp_res.content_coef.mul_(3)
    a3, b3 = both()
    assert torch.allclose(a3, b3, atol=1e-5) and not torch.allclose(a2, a3)
    model.load_state_dict(state)
    assert torch.allclose(both()[0], a2, atol=1e-6)
    model.double()  # new storage and dtype: the cache is rebuilt
    a4, b4 = both()
    assert a4.dtype == torch.float64 and torch.allclose(a4, b4, atol=1e-9) and torch.allclose(a4.float(), a2, atol=1e-5)


# --- baselines: init ------------------------------------------------------------------------------------

def test_baseline_inits():
    L = 6
    rz = _seeded(residual="rezero", n_layer=L)
    assert all(m.alpha.item() == 0 for m in residual_modules(rz))
    x = torch.randint(0, 64, (1, 8))
    logits = rz(x)[0]
    assert torch.allclose(logits, rz.head(rz.norm(rz.embed(x))))  # every sub-layer is the identity at init

    ls = _seeded(residual="layerscale", n_layer=L)
    assert torch.all(residual_modules(ls)[0].scale == 0.1)
    assert cait_layerscale_init(24) == 1e-5 and cait_layerscale_init(36) == 1e-6
    assert torch.all(residual_modules(_seeded(residual="layerscale", layerscale_init=0.5))[0].scale == 0.5)

    pre, dn = _seeded(n_layer=L), _seeded(residual="deepnorm", n_layer=L)
    beta, alpha = (8 * L) ** -0.25, (2 * L) ** 0.25
    assert residual_modules(dn)[0].skip_scale == pytest.approx(alpha)
    C = 32
    b_pre, b_dn = pre.blocks[2], dn.blocks[2]
    assert torch.allclose(b_dn.attn.qkv.weight[: 2 * C], b_pre.attn.qkv.weight[: 2 * C])  # q, k untouched
    assert torch.allclose(b_dn.attn.qkv.weight[2 * C :], beta * b_pre.attn.qkv.weight[2 * C :])
    assert torch.allclose(b_dn.mlp.up.weight, beta * b_pre.mlp.up.weight)
    assert torch.allclose(b_dn.mlp.down.weight, beta * math.sqrt(2 * L) * b_pre.mlp.down.weight)
    deeper = _seeded(residual="deepnorm", n_layer=L, residual_depth=48)
    assert residual_modules(deeper)[0].skip_scale == pytest.approx(96**0.25)


def test_postnorm_normalises_the_stream():
    model = _seeded(residual="postnorm").eval()
    seen = []
    model.blocks[0].attn_res.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 8)))
    rms = seen[0].pow(2).mean(-1).sqrt()
    assert torch.allclose(rms, torch.ones_like(rms), atol=5e-3)  # eps 1e-6 against a small stream


# --- every kind trains --------------------------------------------------------------------------------------

def _pattern_batch(n: int = 16, T: int = 17, vocab: int = 32) -> torch.Tensor:
    """Sequences that count up modulo `vocab` from a random start: learnable only by looking back."""
    g = torch.Generator().manual_seed(0)
    return (torch.arange(T)[None, :] + torch.randint(0, vocab, (n, 1), generator=g)) % vocab


def _train(cfg: ModelConfig, steps: int, lr: float, warmup: int = 0, batch: int = 8) -> tuple[list[float], float]:
    """Losses of a short AdamW run and the first/last-layer gradient-norm ratio at step 0."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    data = _pattern_batch(64, cfg.context_len + 1, cfg.vocab_size)
    g = torch.Generator().manual_seed(1)
    losses, ratio = [], math.nan
    for step in range(steps):
        model.progress.fill_(step / steps)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / warmup) if warmup else lr
        idx = torch.randint(0, len(data), (batch,), generator=g)
        _, loss = model(data[idx, :-1], data[idx, 1:])
        loss.backward()
        if step == 0:
            norms = diag.layer_grad_norms(model)
            ratio = norms[0] / norms[-1] if norms[-1] > 0 else math.nan  # ReZero: no branch gradient at init
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, ratio


@pytest.mark.parametrize("residual", RESIDUALS)
def test_every_kind_trains(residual):
    cfg = tiny_config(residual=residual, vocab_size=32, context_len=16)
    losses, _ = _train(cfg, steps=40, lr=3e-3)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5, (residual, losses[0], losses[-5:])


def test_depth_48_layers():
    """48 layers, width 16, unit-scale init (std 1/√d as in the original Transformer), Adam at lr 1e-2
    with no warm-up: post-norm collapses to the uniform prediction (ln 32), pre-norm and dynamic
    train. Prints the first/last-layer gradient-norm ratios at step 0."""
    base = dict(vocab_size=32, context_len=16, n_layer=48, n_head=2, d_model=16, init_std=0.25)
    results = {}
    for kind in ("prenorm", "dynamic", "postnorm"):
        losses, ratio = _train(tiny_config(residual=kind, **base), steps=25, lr=1e-2)
        results[kind] = (losses[0], sum(losses[-5:]) / 5, ratio)
    print("\ndepth-48 (first loss, last-5 mean, grad-norm ratio first/last layer):", results)
    for kind in ("prenorm", "dynamic"):
        first, last, _ = results[kind]
        assert math.isfinite(last) and last < first - 1.0, (kind, results[kind])
    first, last, _ = results["postnorm"]
    assert not math.isfinite(last) or last > math.log(32) - 0.15, results["postnorm"]
    assert results["dynamic"][2] == pytest.approx(results["prenorm"][2])  # identical at init


# --- diagnostics ----------------------------------------------------------------------------------------

def test_diagnostics_numbers():
    model = _perturb(_seeded(residual="dynamic", n_layer=3))
    windows = torch.randint(0, 64, (6, 33))
    d = diag.diagnose(model, windows)
    assert len(d["layer_grad_norm"]) == 3 and all(v > 0 for v in d["layer_grad_norm"])
    assert d["grad_ratio_first_last"] == pytest.approx(d["layer_grad_norm"][0] / d["layer_grad_norm"][2])
    assert len(d["branch_stream_ratio"]) == 6 and all(v > 0 for v in d["branch_stream_ratio"])
    assert len(d["attn_ablation_increase"]) == 3
    assert set(d["coefficients"]) >= {"res_gain", "res_beta", "res_gamma_norm", "res_scale"}
    assert len(d["dynamic_weight"]["weight_mean"]) == 6

    # attention ablation against doing it by hand for layer 1
    x, y = windows[:, :-1], windows[:, 1:]
    with torch.no_grad():
        h = model.blocks[1].attn.register_forward_hook(lambda m, a, out: out * 0)
        ablated = torch.nn.functional.cross_entropy(model(x)[0].transpose(1, 2), y).item()
        h.remove()
        intact = torch.nn.functional.cross_entropy(model(x)[0].transpose(1, 2), y).item()
    assert d["attn_ablation_increase"][1] == pytest.approx(ablated - intact, abs=1e-5)

    # ReZero at init adds nothing: every branch/stream ratio is 0; post-norm uses ‖F‖/‖x‖
    assert diag.branch_stream_ratios(_seeded(residual="rezero"), windows) == [0.0] * 4
    pn = diag.branch_stream_ratios(_seeded(residual="postnorm"), windows)
    assert all(0 < v < 10 for v in pn)


def test_prenorm_branch_ratio_by_hand():
    model = _seeded(n_layer=1).eval()
    windows = torch.randint(0, 64, (2, 9))
    x = model.embed(windows[:, :-1]).detach()
    with torch.no_grad():
        from dynaformer.model.context import ForwardContext

        ctx = ForwardContext(0, 8, model.progress)
        f = model.blocks[0].attn(model.blocks[0].attn_res.norm(x), ctx)
    expected = (f.norm(dim=-1) / x.norm(dim=-1)).mean().item()
    assert diag.branch_stream_ratios(model, windows)[0] == pytest.approx(expected, rel=1e-5)


def test_training_logs_coefficients_and_eval_diagnostics(tmp_path, text_file, capsys):
    from dynaformer.cli import main

    out = tmp_path / "run"
    rc = main(["train", "--residual", "dynamic", "--n_layer", "2", "--n_head", "2", "--d_model", "32",
               "--context_len", "32", "--batch_size", "4", "--eval_tokens", "256", "--progress_bar", "false",
               "--data", str(text_file), "--out", str(out), "--max_steps", "12", "--log_interval", "4",
               "--tokenizer", "char", "--warmup_steps", "2"])
    assert rc == 0
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in records if "loss" in r]
    assert [r["step"] for r in logs] == [4, 8, 12]
    for r in logs:
        assert len(r["layer_grad_norm"]) == 2 and all(v > 0 for v in r["layer_grad_norm"])
        assert len(r["res_beta"]) == 4 and len(r["res_scale"]) == 4
    assert logs[-1]["res_beta"] != [0.0] * 4  # the gates moved
    capsys.readouterr()
    assert main(["eval", str(out), "--diagnostics", "--json", "--tokens", "2048"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["diagnostics"]["attn_ablation_increase"]) == 2
    saved = json.loads((out / "diagnostics.json").read_text())
    assert saved["layer_grad_norm"] == result["diagnostics"]["layer_grad_norm"]
    pytest.importorskip("matplotlib")
    assert (out / "diagnostics.png").stat().st_size > 1000
    assert (out / "training_diagnostics.png").stat().st_size > 1000


def test_residual_stats_per_kind():
    assert residual_stats(_seeded()) == {}
    assert residual_stats(_seeded(residual="rezero")) == {"res_alpha": [0.0] * 4}
    stats = residual_stats(_seeded(residual="dynamic", dyn_content=False))
    assert set(stats) == {"res_gain", "res_step_a", "res_step_b", "res_scale", "res_beta"}


# --- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("residual", "highway", "model.residual"),
    ("residual_depth", 0, "model.residual_depth"),
    ("layerscale_init", -0.1, "model.layerscale_init"),
    ("dyn_rank", 9, "model.dyn_rank"),
    ("dyn_rank", 0, "model.dyn_rank"),
    ("dyn_p0", -1.0, "model.dyn_p0"),
    ("dyn_gamma_init", 0.0, "model.dyn_gamma_init"),
    ("dyn_gamma_init", -0.5, "model.dyn_gamma_init"),
    ("dyn_step", "maybe", "model.dyn_step"),
])
def test_bad_residual_config(field, value, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, {field: value}, "model")


def test_deepnorm_needs_its_depth():
    with pytest.raises(ConfigError, match="model.residual_depth"):
        from_dict(ModelConfig, {"residual": "deepnorm", "n_layer": 12, "residual_depth": 6}, "model")
    cfg = from_dict(ModelConfig, {"residual": "deepnorm", "n_layer": 12}, "model")
    assert cfg.depth == 12


def test_bad_residual_cli_exits_2(tmp_path, capsys):
    from dynaformer.cli import main

    res = cli_in_process(capsys, "train", "--residual", "nonsense", "--out", str(tmp_path / "r"), "--max_steps", "1")
    assert res.returncode == 2 and "model.residual" in res.stderr and "Traceback" not in res.stderr
    assert len([ln for ln in res.stderr.splitlines() if ln.strip()]) == 1
    for args, needle in ((["--residual", "layerscale", "--layerscale_init", "-1"], "model.layerscale_init"),
                         (["--residual", "deepnorm", "--n_layer", "4", "--residual_depth", "2"],
                          "model.residual_depth"),
                         (["--residual", "dynamic", "--dyn_rank", "16"], "model.dyn_rank")):
        capsys.readouterr()
        assert main(["train", *args, "--out", str(tmp_path / "r"), "--max_steps", "1"]) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "r").exists()


def test_every_kind_is_selectable_and_round_trips():
    for kind in RESIDUALS:
        cfg = from_dict(ModelConfig, {"residual": kind}, "model")
        assert dataclasses.asdict(cfg)["residual"] == kind
        module = residual_modules(Transformer(tiny_config(residual=kind)))[0]
        assert type(module).__name__.lower().startswith(kind.replace("_", ""))


def test_every_kind_shards_with_fsdp2(tmp_path):
    """FSDP2 refuses 0-d parameters and turns parameters into DTensors: every kind must shard, train a
    step, and report its coefficients and per-layer gradient norms (one gloo rank, in a subprocess)."""
    import subprocess
    import sys

    script = tmp_path / "fsdp.py"
    script.write_text(f"""
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from dynaformer.model import ModelConfig, Transformer
from dynaformer.eval.diagnostics import layer_grad_norms
from dynaformer.model.residual import residual_stats
dist.init_process_group("gloo", rank=0, world_size=1)
for kind in {RESIDUALS!r}:
    m = Transformer(ModelConfig(n_layer=2, d_model=32, n_head=2, vocab_size=64, residual=kind))
    for b in m.blocks:
        fully_shard(b)
    fully_shard(m)
    x = torch.randint(0, 64, (2, 16))
    m(x, x)[1].backward()
    assert all(v == v for v in layer_grad_norms(m)), kind
    residual_stats(m)
dist.destroy_process_group()
print("ok")
""")
    import socket

    with socket.socket() as s:  # a free port: another test or process may hold any fixed one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PATH": "/usr/bin:/bin"}
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
