"""The compiled decoding step (kernels/decode.py): each call against a float64 reference of what it replaces
(rotary, the cache write, span-masked attention, RMSNorm, the dynamic residual's update), and the model's decoding
with it against decoding with tensor ops only, over every residual × span kind, fp32 and bf16 caches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dynaformer.kernels import (
    SpanPredictor,
    compiled_decode,
    decode_attention,
    decode_dyn_residual,
    decode_native,
    decode_rms_norm,
    decode_with_tensor_ops,
    reference_span_attention,
)
from dynaformer.model import Transformer
from dynaformer.model.generate import generate
from dynaformer.model.residual import residual_modules

from .conftest import MATRIX, tiny_config

pytestmark = pytest.mark.skipif(not decode_native.available(),
                                reason=f"compiled decoding step: {decode_native.unavailable_reason()}")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


@pytest.mark.parametrize("D", [16, 32, 24])  # 24: the generic loops (not a multiple of the vector width)
@pytest.mark.parametrize("mode", ["dense", "soft", "hard", "predicted"])
@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16])
def test_decode_attention_matches_a_float64_reference(D, mode, kv):
    """Two groups of heads (one not contiguous) with their own buffers and slots, two batch rows, spans per row;
    the new key and value land in each group's slot, rotated, and attention sees keys 0 .. slot only."""
    torch.manual_seed(0)
    B, H, pos, ramp = 2, 4, 40, 8.0
    heads, caps, slots = [[0, 2], [1, 3]], [70, 30], [53, 19]  # slots beyond 16 keys, tails not whole vectors
    qkv = torch.randn(B, 3 * H * D)
    ang = torch.rand(64, D // 2) * 6
    cos, sin = ang.cos(), ang.sin()
    k_bufs = [torch.randn(B, 2, c, D).to(kv) for c in caps]
    v_bufs = [torch.randn(B, 2, c, D).to(kv) for c in caps]
    before = [(k.clone(), v.clone()) for k, v in zip(k_bufs, v_bufs, strict=True)]
    z = predictor = x = None
    if mode in ("soft", "hard"):
        z = torch.tensor([[3.5, 12.0, 0.0, 40.0], [7.2, 2.9, 18.0, 1.0]])  # one span beyond the keys, one zero
    if mode == "predicted":
        x = torch.randn(B, 32)
        predictor = SpanPredictor(torch.randn(H, 32) * 0.3, torch.randn(H), 24.0)
    y, z_used = decode_attention(qkv, cos, sin, pos, k_bufs, v_bufs, heads, slots, z, ramp, mode == "hard",
                                 predictor=predictor, x=x)
    if mode == "predicted":
        z = predictor.s_max * torch.sigmoid(predictor.a.double() + x.double() @ predictor.v.double().T)
        torch.testing.assert_close(z_used.double(), z, atol=1e-5, rtol=1e-5)
        z = z_used
    qkv64 = qkv.double().view(B, 3, H, D)
    q = _rotate(qkv64[:, 0], cos[pos].double(), sin[pos].double())
    k = _rotate(qkv64[:, 1], cos[pos].double(), sin[pos].double())
    out = torch.empty(B, H, D, dtype=torch.float64)
    for g, hs in enumerate(heads):
        kb, vb = before[g][0].double().clone(), before[g][1].double().clone()
        kb[:, :, slots[g]] = k[:, hs].to(kv).double()  # what the cache holds
        vb[:, :, slots[g]] = qkv64[:, 2, hs].to(kv).double()
        torch.testing.assert_close(k_bufs[g].double(), kb, atol=1e-6, rtol=1e-6)  # written in place, the rest kept
        torch.testing.assert_close(v_bufs[g].double(), vb, atol=1e-6, rtol=1e-6)
        L = slots[g] + 1
        zg = None if z is None else z[:, hs].double().unsqueeze(-1)
        for i, h in enumerate(hs):
            qh, kh, vh = q[:, h, None, None], kb[:, i, None, :L], vb[:, i, None, :L]
            if zg is None:
                ref = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(D), -1) @ vh
            else:
                ref = reference_span_attention(qh, kh, vh, zg[:, i, None], ramp, hard=mode == "hard")
            out[:, h] = ref[:, 0, 0]
    torch.testing.assert_close(y.double(), out.view(B, H * D), atol=2e-5, rtol=1e-4)


def test_rms_norm_and_dyn_residual_match_their_tensor_formulas():
    torch.manual_seed(0)
    x, w = torch.randn(3, 1, 96), torch.rand(96) + 0.5
    torch.testing.assert_close(decode_rms_norm(x, w, 1e-6), F.rms_norm(x, (96,), w, 1e-6), atol=1e-6, rtol=1e-6)
    y, h, w_t, gamma = torch.randn(3, 1, 96), torch.randn(3, 1, 96), torch.randn(96, 4) * 0.2, torch.randn(4)
    m = 0.7 + torch.tanh(h @ w_t) @ gamma  # (3, 1)
    torch.testing.assert_close(decode_dyn_residual(x, y, h, w_t, gamma, 0.7), x + m.unsqueeze(-1) * y,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(decode_dyn_residual(x, y, None, None, None, 1.3), x + 1.3 * y)


def _live_gates(model: Transformer) -> None:
    with torch.no_grad():
        for mod in residual_modules(model):
            for p in getattr(mod, "_gates", []):
                p.normal_(0.0, 0.3)
    model.progress.fill_(0.4)


@pytest.mark.parametrize("residual,span", MATRIX)
def test_compiled_decoding_gives_the_logits_of_tensor_ops(residual, span, monkeypatch):
    """Token by token through a bounded cache that compacts, with a prefill between steps: the compiled path's
    logits are those of the tensor-op path to float rounding, and it did run (for every kind that offers
    `decode_spans`; the span relatives attend themselves)."""
    torch.manual_seed(3)
    model = Transformer(tiny_config(residual=residual, span=span, span_max=12, span_init=6.0, span_window=6)).eval()
    _live_gates(model)
    x = torch.randint(0, 64, (2, 40))
    calls = []
    import dynaformer.model.attention as attention_mod

    real = attention_mod.decode_attention
    monkeypatch.setattr(attention_mod, "decode_attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    def run():
        cache = model.new_cache(2, 40)
        with torch.no_grad():
            out = [model(x[:, :5], cache=cache)[0]]
            out += [model(x[:, i : i + 1], cache=cache)[0] for i in range(5, 20)]
            out.append(model(x[:, 20:27], cache=cache)[0])
            out += [model(x[:, i : i + 1], cache=cache)[0] for i in range(27, 40)]
        return torch.cat(out, 1)

    compiled = run()
    steps = 28 * model.cfg.n_layer if model._compiled_decoding else 0  # span relatives, value residual: tensor ops
    assert len(calls) == steps
    with decode_with_tensor_ops():
        plain = run()
    assert len(calls) == steps  # not called again
    assert (compiled - plain).abs().max().item() <= 1e-5


@pytest.mark.parametrize("span", ["none", "dynamic", "per_head"])
def test_a_bf16_cache_holds_bf16_and_decodes_alike_compiled_or_not(span):
    """A bf16 KV cache under an fp32 model (opt-in: half the bytes read per token): the compiled and the tensor-op
    paths read the same rounded keys, so they agree to float rounding; against the fp32 cache the logits move
    by the keys' rounding only."""
    torch.manual_seed(4)
    model = Transformer(tiny_config(span=span, span_max=12, span_init=6.0)).eval()
    prompt = torch.randint(0, 64, (2, 6))

    def logits(dtype):
        cache = model.new_cache(2, 30, dtype=dtype)
        with torch.no_grad():
            out = [model(prompt, cache=cache)[0][:, -1]]
            tok = out[-1].argmax(-1, keepdim=True)
            for _ in range(15):
                out.append(model(tok, cache=cache)[0][:, -1])
                tok = out[-1].argmax(-1, keepdim=True)
        assert all(L.k_bufs[0].dtype == dtype for L in cache.layers)
        return torch.stack(out, 1)

    compiled = logits(torch.bfloat16)
    with decode_with_tensor_ops():
        plain = logits(torch.bfloat16)
    assert (compiled - plain).abs().max().item() <= 1e-4
    assert 0 < (compiled - logits(torch.float32)).abs().max().item() <= 0.05
    fp32 = generate(model, prompt, 10, temperature=0.0)
    assert generate(model, prompt, 10, temperature=0.0, cache_dtype=torch.bfloat16).shape == fp32.shape


def test_where_the_compiled_step_runs(monkeypatch):
    assert compiled_decode(torch.float32, torch.float32, torch.device("cpu"))
    assert compiled_decode(torch.float32, torch.bfloat16, "cpu")
    assert not compiled_decode(torch.bfloat16, torch.bfloat16, "cpu")  # a bf16 model decodes with tensor ops
    assert not compiled_decode(torch.float64, torch.float64, "cpu")
    assert not compiled_decode(torch.float32, torch.float32, "meta")
    with decode_with_tensor_ops():
        assert not compiled_decode(torch.float32, torch.float32, "cpu")
    assert compiled_decode(torch.float32, torch.float32, "cpu")
    monkeypatch.setenv("DYNAFORMER_NATIVE", "0")
    monkeypatch.setattr(decode_native, "_module", None)
    monkeypatch.setattr(decode_native, "_reason", None)
    assert not compiled_decode(torch.float32, torch.float32, "cpu")
    assert decode_native.unavailable_reason() == "disabled by DYNAFORMER_NATIVE=0"
    torch.manual_seed(0)
    model = Transformer(tiny_config())
    out = generate(model, torch.randint(0, 64, (1, 4)), 5, temperature=0.0)  # the tensor-op path still decodes
    assert out.shape == (1, 9)


def test_the_build_follows_atens_vector_width(monkeypatch):
    """An emulated AVX2 run (ATEN_CPU_CAPABILITY=avx2) gets AVX2 code here too, in a build of its own."""
    import platform

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    avx2 = decode_native._isa_flags()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    avx512 = decode_native._isa_flags()
    assert "-mno-avx512f" in avx2 and "-mno-avx512f" not in avx512
    assert decode_native._build_name(avx2) != decode_native._build_name(avx512)


@pytest.mark.parametrize("span", ["fixed", "per_head", "dynamic"])
def test_every_span_kind_gives_a_decoding_step_its_forward_spans(span):
    """`decode_spans` (kept between steps, or a predictor the compiled step applies) is the forward's z for one
    token, and follows the parameters when they change in place."""
    from dynaformer.model.context import ForwardContext

    model = Transformer(tiny_config(span=span, span_max=24, span_init=8.0, span_max_start=12, span_window=10))
    mod = model.blocks[0].attn.span
    with torch.no_grad():
        for p in mod.parameters():
            p.normal_(0.0, 0.5)
    model.progress.fill_(0.3)
    x = torch.randn(2, 1, model.cfg.d_model)
    ctx = ForwardContext(start=5, length=1, progress=model.progress)
    for _ in range(2):
        with torch.no_grad():
            z = mod(x, ctx)[..., 0]  # (1|B, H)
            got = mod.decode_spans(ctx)
        if isinstance(got, SpanPredictor):
            got = got.s_max * torch.sigmoid(got.a + x[:, 0] @ got.v.T)
        torch.testing.assert_close(got.expand_as(z), z, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # an optimizer step or a loaded checkpoint: in place
            for p in mod.parameters():
                p.add_(0.25)
            model.progress.fill_(0.8)
