"""Optimizers: which parameters Muon takes, that our Muon step is torch.optim.Muon's update, that every optimizer
resumes bit-exactly from a checkpoint, and that an unknown optimizer is one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynaformer.errors import Interrupted
from dynaformer.model import ModelConfig, Transformer
from dynaformer.model.classifier import SequenceClassifier
from dynaformer.train.config import TrainConfig
from dynaformer.train.metrics import read_metrics
from dynaformer.train.optim import Muon, OptimizerChain, hidden_matrix_names, make_optimizer
from dynaformer.train.rundir import open_run
from dynaformer.train.trainer import Trainer

from .conftest import assert_user_error, cli_in_process, interrupt_after


def test_muon_takes_the_blocks_linear_weights_only():
    model = Transformer(ModelConfig(n_layer=2, n_head=2, d_model=32, residual="dynamic", span="dynamic",
                                    tie_embeddings=False))
    names = hidden_matrix_names(model)
    assert names == {f"blocks.{i}.{m}.weight" for i in range(2)
                     for m in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")}
    opt = make_optimizer(model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, OptimizerChain) and isinstance(opt.optimizers[1], Muon)
    by_id = {id(p): n for n, p in model.named_parameters()}
    muon = {by_id[id(p)] for g in opt.optimizers[1].param_groups for p in g["params"]}
    adamw = {by_id[id(p)] for g in opt.optimizers[0].param_groups for p in g["params"]}
    assert muon == names and not muon & adamw and muon | adamw == set(by_id.values())
    assert {"embed.weight", "head.weight", "norm.weight", "blocks.0.attn.span.v",
            "blocks.0.attn_res.content_proj"} <= adamw  # embeddings, head, norms, gates
    clf = SequenceClassifier(ModelConfig(n_layer=1, n_head=2, d_model=32, causal=False), 3)
    assert "classifier.weight" not in hidden_matrix_names(clf) and "backbone.blocks.0.mlp.up.weight" in \
        hidden_matrix_names(clf)
    assert make_optimizer(model, TrainConfig()).__class__ is torch.optim.AdamW  # the default is unchanged


def test_our_muon_step_is_torch_muon_in_fp32():
    """Same momentum, Nesterov, decoupled decay and per-shape lr as torch.optim.Muon; only the Newton–Schulz
    precision (fp32 on CPU, torch's is bf16) and batching differ."""
    torch.manual_seed(0)
    shapes = [(64, 32), (64, 32), (32, 96)]  # two of one shape (one batch), one wide
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    a, b = Muon(ours, **kw), torch.optim.Muon(ref, **kw)
    start = [p.detach().clone() for p in ours]
    for _ in range(3):
        for p, q in zip(ours, ref, strict=True):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    with torch.no_grad():
        for p, q, p0 in zip(ours, ref, start, strict=True):
            moved = (q - p0).norm()
            # bf16 rounding in torch's iteration is ≈ 1% of the update; a different step would be far off
            assert moved > 0.1 and (p - q).norm() < 0.03 * moved, ((p - q).norm() / moved)


def _cfgs(out: Path, data: Path, **train) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(context_len=32, n_layer=2, n_head=2, d_model=32)
    base = dict(data=str(data), out=str(out), max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2,
                log_interval=1, eval_interval=4, eval_tokens=256, progress_bar=False, seed=7)
    return model, TrainConfig(**{**base, **train})


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_optimizer_resumes_bit_exactly(optimizer, tmp_path, text_file, monkeypatch):
    extra = {"optimizer": optimizer, "muon_lr_ratio": 2.0}
    straight = Trainer(open_run(*_cfgs(tmp_path / "a", text_file, **extra)))
    straight.fit()
    lrs = [g["lr"] for g in straight.optimizer.param_groups]  # the last step's: AdamW's groups, then Muon's
    assert lrs == ([lrs[0]] * 2 + [2 * lrs[0]] if optimizer == "muon" else [lrs[0]] * 2) and lrs[0] > 0
    trainer = Trainer(open_run(*_cfgs(tmp_path / "b", text_file, **extra)))
    interrupt_after(trainer, 4, monkeypatch)
    with pytest.raises(Interrupted, match="step 4"):
        trainer.fit()
    Trainer(open_run(*_cfgs(tmp_path / "b", text_file, **extra, resume="auto"))).fit()
    la, lb = ([(r["step"], r["loss"]) for r in read_metrics(tmp_path / r / "metrics.jsonl") if "loss" in r]
              for r in ("a", "b"))
    assert la == lb and len(la) == 8
    wa, wb = (load_file(tmp_path / r / "step-8" / "model.safetensors") for r in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    first = load_file(tmp_path / "b" / "step-4" / "model.safetensors")
    assert not all(torch.equal(first[k], wb[k]) for k in wb)  # it did train after the resume


def test_unknown_optimizer_is_one_line(tmp_path, capsys):
    res = cli_in_process(capsys, "train", "--optimizer", "lion", "--out", str(tmp_path / "r"))
    assert_user_error(res, "train.optimizer", "adamw", "muon")
    assert not (tmp_path / "r").exists()
