"""Staged context (train/config.py short_context, short_steps; data/dataset.py StagedSampler): short rows first
with as many tokens per step, then the full context; resumes bit-exactly across the switch; bad settings refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dynaformer.errors import ConfigError, Interrupted
from dynaformer.model import ModelConfig
from dynaformer.train.config import TrainConfig
from dynaformer.train.metrics import read_metrics
from dynaformer.train.rundir import open_run
from dynaformer.train.trainer import Trainer

from .conftest import interrupt_after

TASKS = "task:passkey,storyqa?text={}&frac=0.5&digits=1"


def _cfgs(out: Path, data: str, **train) -> tuple[ModelConfig, TrainConfig]:
    model = ModelConfig(context_len=256, n_layer=1, n_head=2, d_model=16)
    base = dict(data=data, out=str(out), max_steps=6, batch_size=2, lr=3e-3, warmup_steps=1, log_interval=1,
                eval_interval=3, eval_tokens=512, progress_bar=False, seed=3, short_context=128, short_steps=3)
    base.update(train)
    return model, TrainConfig(**base)


@pytest.mark.parametrize("tasks", [False, True], ids=["text", "tasks+text"])
def test_short_rows_first_then_full_rows_with_equal_tokens(tmp_path, text_file, tasks):
    data = TASKS.format(text_file) if tasks else str(text_file)
    trainer = Trainer(open_run(*_cfgs(tmp_path / "r", data)))
    shapes, weights = [], []
    for _ in range(6):
        x, y = trainer.workload.next_batch()
        shapes.append(tuple(x.shape))
        w = trainer.workload.sampler.loss_weights(y)
        weights.append(None if w is None else float(w.sum()))
    assert shapes == [(4, 128)] * 3 + [(2, 256)] * 3  # 512 tokens per step in both stages
    if tasks:  # each source averaged on its own, in either stage: the weights sum to 1
        assert weights == pytest.approx([1.0] * 6)


def test_stages_draw_different_text(tmp_path, text_file):
    """The full stage does not replay the short stage's windows (each stage drawn at the global cursor)."""
    trainer = Trainer(open_run(*_cfgs(tmp_path / "r", str(text_file), short_steps=1)))
    x0, _ = trainer.workload.next_batch()
    x1, _ = trainer.workload.next_batch()
    assert not torch.equal(x0[0, :64], x1[0, :64])


def test_resume_across_the_switch_is_bit_exact(tmp_path, text_file, monkeypatch):
    data = TASKS.format(text_file)
    Trainer(open_run(*_cfgs(tmp_path / "a", data))).fit()
    trainer = Trainer(open_run(*_cfgs(tmp_path / "b", data)))
    interrupt_after(trainer, 2, monkeypatch)  # stopped inside the short stage
    with pytest.raises(Interrupted):
        trainer.fit()
    Trainer(open_run(*_cfgs(tmp_path / "b", data, resume="auto"))).fit()

    def losses(d):
        return [(r["step"], r["loss"]) for r in read_metrics(d / "metrics.jsonl") if "loss" in r]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6


@pytest.mark.parametrize("train, message", [
    (dict(short_context=128, short_steps=0), "needs both > 0"),
    (dict(short_context=0, short_steps=3), "needs both > 0"),
    (dict(short_steps=7), "must be ≤ max_steps"),
    (dict(short_context=100), "must divide model.context_len=256"),
    (dict(short_context=256), "must divide model.context_len=256 and be smaller"),
])
def test_bad_staged_settings_are_refused_before_anything_is_written(tmp_path, text_file, train, message):
    model, cfg = _cfgs(tmp_path / "r", str(text_file), **train)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
        open_run(model, cfg)
    assert not (tmp_path / "r").exists()
