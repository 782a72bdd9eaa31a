"""Training: loss falls, checkpoints round-trip, resume is bit-exact, damaged checkpoints are refused."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynaformer.errors import CheckpointError, DynaformerError, Interrupted
from dynaformer.model import ModelConfig
from dynaformer.runs import load_model
from dynaformer.train.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state, verify_checkpoint
from dynaformer.train.config import TrainConfig
from dynaformer.train.metrics import read_metrics
from dynaformer.train.rundir import open_run
from dynaformer.train.trainer import Trainer

from .conftest import interrupt_after


def _cfgs(out: Path, data: Path, **train) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(context_len=32, n_layer=2, n_head=2, d_model=32)
    base = dict(data=str(data), out=str(out), max_steps=8, batch_size=4, lr=3e-3, warmup_steps=2,
                log_interval=1, eval_interval=4, eval_tokens=256, progress_bar=False, seed=7)
    base.update(train)
    return model, TrainConfig(**base)


def _train(out: Path, data: Path, **train) -> dict:
    return Trainer(open_run(*_cfgs(out, data, **train))).fit()


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_loss_falls(tmp_path, text_file):
    _train(tmp_path / "run", text_file, max_steps=60, lr=1e-2, warmup_steps=5, log_interval=1, eval_interval=60)
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert abs(losses[0] - 5.545) < 0.3  # ln 256 at initialisation
    assert sum(losses[-5:]) / 5 < losses[0] - 2.0, losses


def test_resume_is_bit_exact(tmp_path, text_file, monkeypatch):
    _train(tmp_path / "a", text_file)

    model_cfg, train_cfg = _cfgs(tmp_path / "b", text_file)
    trainer = Trainer(open_run(model_cfg, train_cfg))
    interrupt_after(trainer, 3, monkeypatch)
    with pytest.raises(Interrupted, match="step 3"):
        trainer.fit()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step-3"]
    _train(tmp_path / "b", text_file, resume="auto")

    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert len(_losses(tmp_path / "a")) == 8
    wa = load_file(tmp_path / "a" / "step-8" / "model.safetensors")
    wb = load_file(tmp_path / "b" / "step-8" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    va = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "val_loss" in r]
    vb = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "val_loss" in r]
    assert [r["val_loss"] for r in va] == [r["val_loss"] for r in vb]


def test_checkpoint_contents_and_keep_last(tmp_path, text_file):
    _train(tmp_path / "r", text_file, ckpt_interval=2, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path / "r")] == ["step-6", "step-8"]
    ckpt = tmp_path / "r" / "step-8"
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "config.json", "trainer.pt", "manifest.json"}
    config = verify_checkpoint(ckpt)
    assert config["step"] == 8 and config["model"]["n_layer"] == 2
    state = load_trainer_state(ckpt)
    assert state["step"] == 8 and state["sampler"]["cursor"] == 8
    model, tok, _ = load_model(tmp_path / "r")
    assert tok.kind == "byte" and model.cfg.vocab_size == 256
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "r").iterdir())


def test_corrupt_newest_checkpoint_falls_back(tmp_path, text_file, capsys):
    _train(tmp_path / "r", text_file, ckpt_interval=4)
    newest = tmp_path / "r" / "step-8" / "model.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        verify_checkpoint(tmp_path / "r" / "step-8")
    assert latest_checkpoint(tmp_path / "r") == tmp_path / "r" / "step-4"
    assert "skipping" in capsys.readouterr().err


def test_truncated_checkpoint_is_refused(tmp_path, text_file):
    _train(tmp_path / "r", text_file)
    f = tmp_path / "r" / "step-8" / "trainer.pt"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "r" / "step-8")


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path, text_file):
    _train(tmp_path / "r", text_file)
    ckpt = tmp_path / "r" / "step-8"
    (ckpt / "trainer.pt").write_bytes(pickle.dumps({"step": _Exploit()}))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    from dynaformer.train.checkpoint import _sha256

    manifest["files"]["trainer.pt"] = _sha256(ckpt / "trainer.pt")  # even with a matching checksum
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="plain-data"):
        load_trainer_state(ckpt)


def test_existing_run_folder_is_protected(tmp_path, text_file):
    _train(tmp_path / "r", text_file)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")}
    with pytest.raises(DynaformerError, match="already holds this run"):
        open_run(*_cfgs(tmp_path / "r", text_file))
    with pytest.raises(DynaformerError, match="different config.*lr"):
        open_run(*_cfgs(tmp_path / "r", text_file, lr=1e-4))
    with pytest.raises(DynaformerError, match="cannot resume.*lr"):
        open_run(*_cfgs(tmp_path / "r", text_file, lr=1e-4, resume="auto"))
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "r").rglob("*")}


def test_a_relative_and_an_absolute_data_path_name_one_run(tmp_path, text_file, monkeypatch):
    """Resuming with the data given another way (relative vs absolute, through a symlink) is the same run."""
    _train(tmp_path / "r", text_file)
    monkeypatch.chdir(text_file.parent)
    run = open_run(*_cfgs(tmp_path / "r", Path(text_file.name), resume="auto"))
    assert run.resumed
    (tmp_path / "link.txt").symlink_to(text_file)
    assert open_run(*_cfgs(tmp_path / "r", tmp_path / "link.txt", resume="auto")).resumed
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text())
    with pytest.raises(DynaformerError, match="cannot resume.*data"):  # another file is another run
        open_run(*_cfgs(tmp_path / "r", other, resume="auto"))


def test_grad_accum_matches_big_batch(tmp_path, text_file):
    """Two micro-batches of 4 take the same step as one batch of 8 drawn from the same windows."""
    model_cfg, train_cfg = _cfgs(tmp_path / "a", text_file, batch_size=4, grad_accum=2, grad_clip=0.0)
    t = Trainer(open_run(model_cfg, train_cfg))
    x1, y1 = t.sampler.next()
    x2, y2 = t.sampler.next()
    t.sampler.cursor = 0
    ref = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.train_step()
    accum = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.model.load_state_dict(ref)
    t2 = Trainer(open_run(*_cfgs(tmp_path / "b", text_file, batch_size=8, grad_clip=0.0)))
    t2.model.load_state_dict(ref)
    t2.sampler.next = lambda: (torch.cat([x1, x2]), torch.cat([y1, y2]))
    t2.train_step()
    for k, v in t2.model.state_dict().items():
        torch.testing.assert_close(v, accum[k], rtol=1e-5, atol=1e-6)


def test_weight_decay_groups_survive_lost_tags():
    """Decay groups come from parameter names read before wrapping, so FSDP2 (which swaps parameters and
    drops their `no_weight_decay` tags) still leaves gates undecayed."""
    from dynaformer.model import Transformer
    from dynaformer.train.optim import make_optimizer, no_decay_names

    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, residual="dynamic"))
    names = no_decay_names(model)
    tagged = [n for n, p in model.named_parameters() if p.dim() >= 2 and getattr(p, "no_weight_decay", False)]
    assert tagged and set(tagged) <= names  # the dynamic residual's content projection is a tagged matrix
    for _, p in model.named_parameters():
        if hasattr(p, "no_weight_decay"):
            del p.no_weight_decay  # what sharding does to the tags
    opt = make_optimizer(model, TrainConfig(), names)
    undecayed = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    assert all(id(p) in undecayed for n, p in model.named_parameters() if n in names)
    assert len(opt.param_groups[0]["params"]) + len(opt.param_groups[1]["params"]) == len(list(model.parameters()))
