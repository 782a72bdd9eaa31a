"""Encoder mode: bidirectional attention, masked-LM pretraining, classification fine-tuning."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dynaformer.data.masking import mask_tokens
from dynaformer.data.nlu import generate_task, load_jsonl_task
from dynaformer.errors import DynaformerError
from dynaformer.eval.classification import classification_report, macro_f1
from dynaformer.kernels.span import span_log_mask
from dynaformer.model import Transformer
from dynaformer.model.classifier import SequenceClassifier
from dynaformer.runs import load_backbone
from dynaformer.train.finetune import FinetuneConfig, finetune, read_finetune

from .conftest import ENCODER_SPANS, RESIDUALS, cli_in_process, tiny_config


def _reference_hidden(model: Transformer, idx: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    """Bidirectional attention written out: softmax(q kᵀ/√d + symmetric span + padding mask) v."""
    from dynaformer.model.context import ForwardContext

    ctx = ForwardContext(start=0, length=idx.size(1), progress=model.progress, causal=False)

    def attn(block, h):
        a = block.attn
        B, T, C = h.shape
        qkv = a.qkv(h).view(B, T, 3, a.n_head, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = a.rotary(qkv[:2], 0).unbind(0)
        s = q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)
        if a.span is not None:
            d = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs().float()
            s = s + span_log_mask(d, a.span(h, ctx).unsqueeze(-1), a.span.ramp, a.span.hard)
        if pad is not None:  # padding keys hidden; each query keeps its own key (no empty rows)
            s = s.masked_fill(~(pad[:, None, None, :] | torch.eye(T, dtype=torch.bool)), float("-inf"))
        y = s.softmax(-1) @ qkv[2]
        return a.proj(y.transpose(1, 2).reshape(B, T, C))

    x = model.embed(idx)
    for block in model.blocks:
        x = block.attn_res(x, lambda h, b=block: attn(b, h), ctx)
        x = block.mlp_res(x, block.mlp, ctx)
    return model.norm(x)


@pytest.mark.parametrize("span", ENCODER_SPANS)
@pytest.mark.parametrize("padded", [False, True])
def test_bidirectional_matches_reference(padded, span):
    model = Transformer(tiny_config(causal=False, span=span, span_window=6, span_max=12, span_init=5, span_ramp=4))
    with torch.no_grad():  # move span parameters off their initialisation
        for name, p in model.named_parameters():
            if ".span." in name:
                p.add_(0.3 * torch.randn_like(p))
    idx = torch.randint(0, 64, (3, 21))
    pad = torch.ones(3, 21, dtype=torch.bool)
    if padded:
        pad[1, 15:] = False
        pad[2, 9:] = False
    mask = pad if padded else None
    fast = model.hidden(idx, key_padding_mask=mask)
    ref = _reference_hidden(model, idx, mask)
    assert (fast - ref).abs().max() < 1e-5
    # Gradients in float64, where both paths are exact to rounding (fp32 differs from the truth by ~3e-5
    # relative on this sum-of-squares loss, on both paths alike).
    model = model.double()
    fast, ref = model.hidden(idx, key_padding_mask=mask), _reference_hidden(model, idx, mask)
    g_fast = torch.autograd.grad(fast[pad].square().sum(), list(model.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad(ref[pad].square().sum(), list(model.parameters()), allow_unused=True)
    for a, b in zip(g_fast, g_ref, strict=True):
        if a is not None:
            assert (a - b).norm() <= 1e-10 * b.norm() + 1e-12


def test_encoder_sees_the_future_and_ignores_padding():
    model = Transformer(tiny_config(causal=False)).eval()
    x = torch.randint(0, 64, (1, 12))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 64
    with torch.no_grad():
        assert not torch.allclose(model.hidden(x)[0, 0], model.hidden(y)[0, 0])  # position 0 sees position 10
        pad = torch.ones(1, 12, dtype=torch.bool)
        pad[0, 10:] = False
        a = model.hidden(x, key_padding_mask=pad)[0, :10]
        b = model.hidden(y, key_padding_mask=pad)[0, :10]
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        model.hidden(x, cache=model.new_cache(1, 16))


def test_masking_statistics():
    x = torch.randint(0, 250, (64, 512))
    gen = torch.Generator().manual_seed(0)
    inputs, targets = mask_tokens(x, mask_id=256, vocab_size=256, generator=gen)
    chosen = targets != -100
    n = chosen.sum().item()
    assert abs(n / x.numel() - 0.15) < 0.005
    assert torch.equal(targets[chosen], x[chosen])
    masked = (inputs == 256) & chosen
    kept = (inputs == x) & chosen
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(kept.sum().item() / n - (0.1 + 0.1 / 256)) < 0.01  # 10% kept + random draws that hit x
    assert torch.equal(inputs[~chosen], x[~chosen])
    assert (inputs[chosen & ~masked] < 256).all()


def test_mlm_pretraining_runs_and_learns(tmp_path, text_file, capsys):
    out = tmp_path / "mlm"
    args = ["train", "--causal", "false", "--objective", "mlm", "--n_layer", "2", "--n_head", "2", "--d_model", "48",
            "--context_len", "64", "--batch_size", "16", "--max_steps", "120", "--lr", "3e-3", "--warmup_steps",
            "10", "--eval_interval", "120", "--eval_tokens", "4096", "--log_interval", "10", "--data", str(text_file),
            "--out", str(out), "--progress_bar", "false", "--threads", "1"]
    res = cli_in_process(capsys, *args)
    assert res.returncode == 0, res.stderr
    records = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert val and val[-1] < math.log(256) - 2.0  # far below a uniform guess over bytes
    model_vocab = json.loads((out / "run.json").read_text())["model"]["vocab_size"]
    assert model_vocab == 257  # 256 bytes + [MASK]


def test_finetune_beats_chance(tmp_path):
    # 240 steps reach 0.965–0.99 on AVX2 and AVX-512 CPUs alike (seeds 0, 1); 120 stopped at 0.625 on AVX-512.
    cfg = read_finetune(dict(task="keyword", n_train=800, n_val=200, distance=8, out=str(tmp_path / "ft"),
                             max_steps=240, batch_size=32, lr=2e-3, eval_interval=120, progress_bar=False, threads=1))
    result = finetune(cfg, tiny_config(causal=False, n_layer=2, d_model=64, context_len=64))
    assert result["accuracy"] > 0.7 and result["chance"] == 0.5, result
    assert set(result["accuracy_by_distance"]) <= {"0", "1-1", "2-3", "4-7", "8-15"}
    assert (tmp_path / "ft" / "step-240" / "model.safetensors").exists()


def test_finetune_from_pretrained_run(tmp_path, text_file, capsys):
    pre = tmp_path / "pre"
    res = cli_in_process(capsys, "train", "--causal", "false", "--objective", "mlm", "--n_layer", "1", "--n_head", "2",
                         "--d_model", "32", "--context_len", "32", "--max_steps", "5", "--data", str(text_file),
                         "--out", str(pre), "--progress_bar", "false", "--eval_tokens", "512")
    assert res.returncode == 0, res.stderr
    cfg = read_finetune(dict(task="keyword", n_train=64, n_val=32, init=str(pre), out=str(tmp_path / "ft"),
                             max_steps=3, batch_size=8, eval_interval=3, progress_bar=False))
    result = finetune(cfg, tiny_config(), load_backbone)
    assert 0 <= result["accuracy"] <= 1


def test_generated_tasks_are_consistent():
    data = generate_task("entail", 300, 50, seed=3, distance=6)
    assert set(data.labels) == {"yes", "no", "unknown"}
    for e in data.train:
        statement = e.text.split("Statement: ")[1]
        who, place = statement.split(" is in the ")
        place = place.rstrip(".")
        story = e.text.split(" Statement:")[0]
        sentences = [s.strip() + "." for s in story.split(".") if s.strip()]
        moves = [i for i, s in enumerate(sentences) if s.startswith(f"{who} went to")]
        if e.label == "unknown":
            assert not moves
        else:
            assert len(moves) == 1 and len(sentences) - 1 - moves[0] == e.distance
            assert (f"the {place}." in sentences[moves[0]]) == (e.label == "yes")
    assert generate_task("entail", 10, 5, seed=3).train[0].text == generate_task("entail", 10, 5, seed=3).train[0].text
    lo = generate_task("listops", 50, 5, seed=1, depth=1)
    for e in lo.train:
        op, *digits = e.text.strip("[] ").split()
        fn = {"MAX": max, "MIN": min, "MED": lambda v: sorted(v)[len(v) // 2], "SM": lambda v: sum(v) % 10}[op]
        assert str(fn([int(d) for d in digits])) == e.label


def test_metrics():
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1], 2) == pytest.approx((2 / 3 + 0.8) / 2)
    r = classification_report([0, 1, 1], [0, 1, 0], [0, 3, 9], 2)
    assert r["accuracy"] == pytest.approx(2 / 3) and r["accuracy_by_distance"] == {"0": 1.0, "2-3": 1.0, "8-15": 0.0}


def test_jsonl_errors(tmp_path, capsys):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    no_label = tmp_path / "bad.jsonl"
    no_label.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "z"}\n')
    with pytest.raises(DynaformerError, match=r'bad.jsonl:2 has no "label"'):
        load_jsonl_task(str(no_label), str(good))
    with pytest.raises(DynaformerError, match="label sets"):
        load_jsonl_task(str(good), str(other))
    res = cli_in_process(capsys, "finetune", "--task", "jsonl", "--train_file", str(good), "--val_file", str(no_label),
                  "--out", str(tmp_path / "ft"))
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no \"label\"" in res.stderr
    assert not (tmp_path / "ft").exists()


def test_classifier_causal_uses_last_real_token():
    model = SequenceClassifier(tiny_config(), 3).eval()
    torch.nn.init.normal_(model.classifier.weight)
    idx = torch.randint(0, 64, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        logits, _ = model(idx, mask)
        alone, _ = model(idx[1:, :6], mask[1:, :6])
    torch.testing.assert_close(logits[1:], alone, rtol=0, atol=1e-5)
    assert F.softmax(logits, -1).shape == (2, 3)


@pytest.mark.parametrize("span", [s for s in ENCODER_SPANS if s != "none"])
def test_encoder_spans_are_symmetric_and_trainable(span):
    """One layer, span ≤ 6 + ramp 2: tokens further than that on either side cannot reach position 10;
    nearer ones on either side can; the span parameters get gradients."""
    cfg = tiny_config(causal=False, n_layer=1, span=span, span_window=5, span_max=6, span_init=3, span_ramp=2)
    model = Transformer(cfg)
    x = torch.randint(0, 64, (1, 24))
    base = model.hidden(x)[0, 10]
    for j, reachable in ((1, False), (19, False), (9, True), (11, True)):
        y = x.clone()
        y[0, j] = (y[0, j] + 1) % 64
        changed = not torch.allclose(model.hidden(y)[0, 10], base, atol=1e-6)
        assert changed == reachable, (j, reachable)
    model.hidden(x).square().sum().backward()
    span_grads = [p.grad for n, p in model.named_parameters() if ".span." in n and p.requires_grad]
    if span != "fixed":
        assert span_grads and any(g is not None and g.abs().sum() > 0 for g in span_grads)


def _perturbed_encoder(residual: str, span: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(causal=False, residual=residual, span=span, span_window=6, span_max=12,
                                    span_init=5, span_ramp=4)).eval()
    with torch.no_grad():  # move gates and span parameters off their identity initialisation
        for name, p in model.named_parameters():
            if "_coef" in name or "content_proj" in name or ".span." in name or "alpha" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("residual", RESIDUALS)
@pytest.mark.parametrize("span", ["none", "dynamic"])
def test_padded_batch_equals_each_example_alone(residual, span):
    # Right padding changes nothing for the real tokens: attention hides padding keys, and the dynamic
    # residual's length signal counts real tokens only.
    model = _perturbed_encoder(residual, span)
    lengths = [13, 7, 10]
    idx = torch.randint(0, 64, (3, 13))
    pad = torch.arange(13)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        batch = model.hidden(idx, key_padding_mask=pad)
        for b, n in enumerate(lengths):
            alone = model.hidden(idx[b:b + 1, :n])
            torch.testing.assert_close(batch[b, :n], alone[0], rtol=0, atol=2e-5)


def test_encoder_residual_position_signal_is_the_sequence_length():
    model = Transformer(tiny_config(causal=False, residual="dynamic", dyn_content=False, dyn_gain=False,
                                    dyn_step=False, dyn_position=True))
    from dynaformer.model.context import ForwardContext

    res = model.blocks[0].attn_res
    with torch.no_grad():
        res.pos_coef.fill_(0.5)
    p0 = model.cfg.position_p0
    for T in (5, 40):
        ctx = ForwardContext(start=0, length=T, progress=model.progress, causal=False)
        h = torch.randn(2, T, model.cfg.d_model)
        m = res.multiplier(h, ctx)
        # one weight for every token of the example, set by its length: 1 + β·log(T/P0)
        assert torch.allclose(m.expand(2, T, 1), torch.full((2, T, 1), 1 + 0.5 * math.log(T / p0)))
    pad = torch.ones(2, 40, dtype=torch.bool)
    pad[1, 25:] = False
    ctx = ForwardContext(start=0, length=40, progress=model.progress, causal=False, key_padding_mask=pad)
    m = res.multiplier(torch.randn(2, 40, model.cfg.d_model), ctx)
    assert torch.allclose(m.view(2), torch.tensor([1 + 0.5 * math.log(40 / p0), 1 + 0.5 * math.log(25 / p0)]))


def _ft_cfg(out, **kw) -> FinetuneConfig:
    return read_finetune({**dict(task="keyword", n_train=200, n_val=50, out=str(out), max_steps=12, batch_size=8,
                                 eval_interval=4, progress_bar=False), **kw})


def _ft_model():
    return tiny_config(causal=False, n_layer=1, d_model=32, n_head=2, context_len=64, span="dynamic",
                       span_max=12, span_init=5, span_ramp=4)


def test_finetune_resumes_bit_exactly_after_an_interrupt(tmp_path, monkeypatch):
    import os
    import signal

    from safetensors.torch import load_file

    from dynaformer.errors import Interrupted
    from dynaformer.train.metrics import read_metrics

    finetune(_ft_cfg(tmp_path / "a"), _ft_model())
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def ctrl_c_at_step_7(*a, **kw):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)  # finetune's handler turns it into a clean stop
        return clip(*a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", ctrl_c_at_step_7)
    with pytest.raises(Interrupted, match="step 7"):
        finetune(_ft_cfg(tmp_path / "b"), _ft_model())
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*")) == ["step-4", "step-7"]
    result = finetune(_ft_cfg(tmp_path / "b"), _ft_model())  # the same command continues the run
    assert result["step"] == 12
    wa, wb = (load_file(tmp_path / r / "step-12" / "model.safetensors") for r in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (read_metrics(tmp_path / r / "metrics.jsonl") for r in ("a", "b"))
    assert [(r["step"], r["loss"], r["val_accuracy"]) for r in ma] == [(r["step"], r["loss"], r["val_accuracy"])
                                                                       for r in mb]
    # a finished run asked again: nothing to do, the same result
    assert finetune(_ft_cfg(tmp_path / "b"), _ft_model())["accuracy"] == result["accuracy"]


def test_finetune_refuses_a_folder_holding_another_run(tmp_path, capsys):
    finetune(_ft_cfg(tmp_path / "r", max_steps=2, eval_interval=2), _ft_model())
    with pytest.raises(DynaformerError, match=r"different run \(finetune.lr"):
        finetune(_ft_cfg(tmp_path / "r", max_steps=2, eval_interval=2, lr=5e-4), _ft_model())
    with pytest.raises(DynaformerError, match="already exists"):
        finetune(_ft_cfg(tmp_path / "r", max_steps=2, eval_interval=2, resume="none"), _ft_model())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    res = cli_in_process(capsys, "finetune", "--task", "keyword", "--out", str(tmp_path / "other"), "--max_steps", "2")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not a finetune run" in res.stderr
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
