"""One kernel vocabulary, one reach formula, one place that picks the kernel (kernels/plan.py), written
interfaces for span and residual kinds, and one name and argument order for the padding mask."""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import math
import typing
from pathlib import Path
from typing import get_args

import pytest
import torch
from torch import nn

from dynaformer import kernels
from dynaformer.configtools import from_dict
from dynaformer.errors import ConfigError
from dynaformer.kernels import KERNELS, SPAN_IMPLS, band_flops, keys_reached, plan
from dynaformer.kernels import span as kspan
from dynaformer.kernels.band import band_pairs
from dynaformer.kernels.span_symmetric import band_symmetric_span_attention, reference_symmetric_span_attention
from dynaformer.model import ModelConfig, Transformer
from dynaformer.model.config import ResidualKind, SpanKind
from dynaformer.model.context import ForwardContext
from dynaformer.model.residual import RESIDUALS, Residual
from dynaformer.model.span import SPANS, SpanModule, make_span

from .conftest import tiny_config

SRC = Path(__file__).resolve().parents[1] / "src" / "dynaformer"
PLAN = importlib.import_module("dynaformer.kernels.plan")  # (the package's `plan` attribute is the function)


# --- one vocabulary -----------------------------------------------------------------------------------------

def test_the_config_and_the_benchmark_take_the_kernels_plan_names():
    assert get_args(typing.get_type_hints(ModelConfig)["span_impl"]) == SPAN_IMPLS
    assert set(SPAN_IMPLS) - {"auto"} <= set(KERNELS)  # a requested kernel is a kernel plan() can pick
    with pytest.raises(ConfigError, match=r"model\.span_impl: expected one of auto, band, masked, reference, flex"):
        from_dict(ModelConfig, {"span_impl": "dense"}, "model")  # dense ignores the spans: not a request
    from dynaformer.bench.attention import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    impl = next(a for a in parser._actions if a.dest == "impl")
    assert tuple(impl.choices) == SPAN_IMPLS


def test_plan_refuses_a_name_outside_the_vocabulary():
    with pytest.raises(ValueError, match="choose one of auto, band"):
        plan("dense", torch.full((1, 2, 1), 8.0), 200, 200)


# --- plan(): every (device, span kind, causal/encoder, compiled or not) --------------------------------------

T = 300
SHORT = {"fixed": (torch.full((1, 4, 1), 19.0), True),  # a window of 20 keys
         "per_head": (torch.tensor([20.0, 30.0, 40.0, 50.0]).view(1, 4, 1), False),
         "dynamic": (torch.linspace(10.0, 60.0, 2 * 4 * T).view(2, 4, T), False)}


def _one_long_head(z: torch.Tensor) -> torch.Tensor:
    z = z.clone()
    z[:, 0] = 2.0 * T  # head 0 sees every key with weight 1
    return z


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("span", list(SHORT))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_plan_picks_the_kernel_for_each_case(monkeypatch, device, span, compiled):
    """Expected kernels written out per case, with the compiled kernel's availability pinned (no test depends
    on this machine's compiler or GPU: plan() reads only the device's type)."""
    monkeypatch.setattr(PLAN, "native_available", lambda: compiled)
    z, hard = SHORT[span]
    cpu = device == "cpu"

    def causal(impl="auto", **kw):
        return plan(impl, kw.pop("z", z), T, T, device=device, ramp=8.0, hard=hard, grad=True, **kw)

    # causal training call: the band on CPU (compiled where it runs, never for fp64), the masked SDPA on CUDA
    assert causal() == (("band", None, compiled) if cpu else ("masked", None, False))
    assert causal(dtype=torch.float64).native is False
    assert causal(impl="band").native == (compiled and cpu)
    split = causal(z=_one_long_head(z))
    if cpu:
        assert split.kernel == "split" and split.native == compiled and split.cover.tolist() == [1, 0, 0, 0]
    else:
        assert split.kernel == "masked"
    assert causal(z=torch.full_like(z, 2.0 * T)).kernel == "dense"  # every span covers every key
    assert causal(padded=True).kernel == "masked"
    assert plan("auto", z[..., -8:], 8, T, device=device, hard=hard).kernel == "decode"  # few queries, no grad
    # encoder: its band kernel off CUDA when the spans leave most keys out (Python only), else the masked SDPA
    enc = plan("auto", z, T, T, device=device, causal=False, ramp=8.0, hard=hard)
    assert enc == (("band", None, False) if cpu else ("masked", None, False))
    assert plan("auto", torch.full_like(z, 200.0), T, T, device=device, causal=False, ramp=8.0).kernel == "masked"
    for impl in ("masked", "reference", "flex"):  # the encoder's reference is its masked SDPA; it has no flex
        assert plan(impl, z, T, T, device=device, causal=False, ramp=8.0, hard=hard).kernel == "masked"
    assert plan("band", z, T, T, device=device, causal=False, ramp=8.0, hard=hard).kernel == "band"


@pytest.mark.parametrize("compiled", [True, False])
def test_span_attention_runs_the_planned_band_kernel(monkeypatch, compiled):
    monkeypatch.setattr(PLAN, "native_available", lambda: compiled)
    seen = []
    monkeypatch.setattr(kspan, "band_span_attention", lambda *a, native, **kw: seen.append(native) or a[0])
    q = k = v = torch.randn(1, 2, 128, 8)
    kspan.span_attention(q, k, v, torch.full((1, 2, 1), 16.0), 8.0, impl="band")
    kspan.span_attention(q.double(), k.double(), v.double(), torch.full((1, 2, 1), 16.0), 8.0, impl="band")
    assert seen == [compiled, False]


@pytest.mark.parametrize("compiled", [True, False])
def test_band_flops_counts_what_runs_on_the_device(monkeypatch, compiled):
    monkeypatch.setattr(PLAN, "native_available", lambda: compiled)
    z = 40 + 20 * torch.rand(2, 4, 512)
    dense = 2 * 4 * 512 * 513 // 2
    assert band_flops(z, 512, 512, 16.0, False) == (band_pairs(z, 512, 512, 16.0, False, native=compiled), dense)
    assert band_flops(z, 512, 512, 16.0, False, device="cuda") == (dense, dense)  # CUDA runs the masked SDPA
    assert band_flops(z, 512, 512, 16.0, False, dtype=torch.float64)[0] == band_pairs(z, 512, 512, 16.0, False,
                                                                                       native=False)


# --- one reach formula --------------------------------------------------------------------------------------

def test_keys_reached_is_the_mask_support():
    """keys_reached(z) counts exactly the distances d ≥ 0 with m(d) > 0."""
    d = torch.arange(200, dtype=torch.float64)
    for z in (0.0, 3.0, 7.5, 40.25, 63.999):
        for ramp, hard in ((8.0, False), (1.0, True), (32.0, False)):
            m = (d <= z) if hard else ((ramp + z - d) / ramp).clamp(0, 1) > 0
            assert int(keys_reached(torch.tensor(z, dtype=torch.float64), ramp, hard)) == int(m.sum()), (z, hard)


def test_the_span_modules_reach_through_the_same_formula():
    cfg = tiny_config(span="per_head", span_max=64, span_init=20.0, span_ramp=8)
    span = make_span(cfg)
    with torch.no_grad():
        span.a.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0][: cfg.n_head]))
    z = 64.0 * torch.sigmoid(span.a.detach().float())  # the spans in fp32, as the model computes them
    assert span.reach(1.0) == [math.ceil(float(zh) + 8.0) for zh in z]
    assert make_span(tiny_config(span="fixed", span_window=10)).reach(0.0) == [10] * cfg.n_head
    dyn = make_span(tiny_config(span="dynamic", span_max=64, span_init=20.0, span_ramp=8))
    assert dyn.reach(1.0) == [64 + 8] * cfg.n_head


# --- written interfaces and the span registry ---------------------------------------------------------------

def test_the_span_registry_lists_every_kind_the_config_accepts_and_each_builds():
    assert set(SPANS) | {"none"} == set(get_args(SpanKind)) and "none" not in SPANS
    assert make_span(tiny_config(span="none")) is None
    x = torch.randn(2, 12, 64)
    for kind in SPANS:
        span = make_span(tiny_config(span=kind, d_model=64))
        assert isinstance(span, SpanModule) and isinstance(span, SPANS[kind]), kind
        ctx = ForwardContext(start=0, length=12, progress=torch.zeros(()))
        z = span(x, ctx)
        assert z.dtype == torch.float32 and z.dim() == 3 and z.shape[1] == span.n_head
        assert z.shape in ((1, span.n_head, 1), (2, span.n_head, 12)), (kind, z.shape)
        assert len(span.reach(0.5)) == span.n_head and isinstance(span.hard, bool)
    assert not isinstance(nn.Linear(2, 2), SpanModule)  # the Protocol is not met by any module


def test_every_residual_kind_satisfies_the_residual_interface():
    assert set(RESIDUALS) == set(get_args(ResidualKind))
    for kind in RESIDUALS:
        model = Transformer(tiny_config(residual=kind, n_layer=1))
        res = model.blocks[0].attn_res
        assert isinstance(res, Residual) and isinstance(res, RESIDUALS[kind]), kind
        assert isinstance(res.additive, bool) and isinstance(res.coefficients(), dict)
    assert not isinstance(nn.Linear(2, 2), Residual)


# --- the padding mask: one name, one order ------------------------------------------------------------------

def _names(tree: ast.AST) -> set[str]:
    """Parameter, keyword-argument and attribute names used in a module."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg):
            out.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            out.add(node.arg)
        elif isinstance(node, ast.Attribute):
            out.add(node.attr)
        elif isinstance(node, ast.Name):
            out.add(node.id)
    return out


def test_the_library_calls_the_padding_mask_key_padding_mask():
    """`attention_mask` is transformers' name: it appears only at the hf/ boundary; `key_mask` nowhere."""
    for path in SRC.rglob("*.py"):
        names = _names(ast.parse(path.read_text(encoding="utf-8")))
        assert "key_mask" not in names, path
        if "hf" not in path.relative_to(SRC).parts:
            assert "attention_mask" not in names, path


@pytest.mark.parametrize("fn,before", [
    (kernels.causal_attention, ["q", "k", "v"]),
    (kernels.bidirectional_attention, ["q", "k", "v"]),
    (kernels.span_attention, ["q", "k", "v", "z", "ramp", "hard"]),
    (kernels.symmetric_span_attention, ["q", "k", "v", "z", "ramp", "hard"]),
    (kernels.reference_span_attention, ["q", "k", "v", "z", "ramp", "hard"]),
    (kspan.masked_sdpa_span_attention, ["q", "k", "v", "z", "ramp", "hard"]),
    (kspan.decode_span_attention, ["q", "k", "v", "z", "ramp", "hard"]),
    (reference_symmetric_span_attention, ["q", "k", "v", "z", "ramp", "hard"]),
    (band_symmetric_span_attention, ["q", "k", "v", "z", "ramp", "hard"]),
])
def test_every_kernel_takes_the_mask_right_after_its_inputs(fn, before):
    params = list(inspect.signature(fn).parameters)
    assert params[: len(before) + 1] == before + ["key_padding_mask"], fn.__name__


def test_while_exporting_auto_takes_the_masked_kernel(monkeypatch):
    """A traced graph cannot branch on the spans' values: auto plans the masked SDPA while exporting (causal and
    encoder), and a kernel asked for by name is still honoured."""
    from dynaformer.kernels.plan import plan

    z = torch.full((1, 2, 1), 1e6)  # spans covering every key: eager auto takes dense
    assert plan("auto", z, 200, 200).kernel == "dense"
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert plan("auto", z, 200, 200).kernel == "masked"
    assert plan("auto", torch.full((1, 2, 200), 3.0), 200, 200, causal=False, ramp=4.0).kernel == "masked"
    assert plan("reference", z, 200, 200).kernel == "reference"
