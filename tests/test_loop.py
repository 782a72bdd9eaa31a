"""The one training loop, for both of its uses (pretraining and fine-tuning a classifier): Ctrl-C saves a
checkpoint and exits 130, the same command continues bit-exactly, and the learning rate follows warm-up +
cosine to lr · min_lr_ratio (docs/design.md §6) across the interruption."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dynaformer.train.metrics import read_metrics

from .conftest import cli_in_process

STEPS, WARMUP, LR, MIN_RATIO, STOP_AT = 8, 3, 3e-3, 0.1, 5


def expected_lr(step: int) -> float:
    """Written out here, not taken from optim.lr_at, so that a drifted schedule fails."""
    if step < WARMUP:
        return LR * (step + 1) / WARMUP
    t = (step - WARMUP) / (STEPS - WARMUP)
    return LR * MIN_RATIO + 0.5 * LR * (1 - MIN_RATIO) * (1 + math.cos(math.pi * t))


def command(use: str, out, text_file) -> list[str]:
    shared = ["--max_steps", str(STEPS), "--lr", str(LR), "--warmup_steps", str(WARMUP), "--min_lr_ratio",
              str(MIN_RATIO), "--eval_interval", "4", "--progress_bar", "false", "--n_layer", "1", "--n_head", "2",
              "--d_model", "32", "--out", str(out)]
    if use == "pretrain":
        return ["train", *shared, "--data", str(text_file), "--context_len", "32", "--batch_size", "4",
                "--log_interval", "1", "--eval_tokens", "256"]
    return ["finetune", *shared, "--task", "keyword", "--n_train", "64", "--n_val", "32", "--batch_size", "8",
            "--context_len", "64"]


def records(use: str, out) -> list[tuple]:
    rows = read_metrics(out / "metrics.jsonl")
    if use == "pretrain":
        return [(r["step"], r["loss"]) for r in rows if "loss" in r]
    return [(r["step"], r["loss"], r["val_accuracy"]) for r in rows]


@pytest.mark.parametrize("use", ["pretrain", "finetune"])
def test_ctrl_c_resume_and_schedule(use, tmp_path, text_file, monkeypatch, capsys):
    lrs: list[float] = []
    step_fn = torch.optim.AdamW.step

    def recording_step(self, *a, **kw):  # the learning rate each update really used
        lrs.append(self.param_groups[0]["lr"])
        return step_fn(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli_in_process(capsys, *command(use, a, text_file)).returncode == 0
    straight, lrs[:] = list(lrs), []
    assert straight == pytest.approx([expected_lr(s) for s in range(STEPS)], rel=1e-12)

    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def ctrl_c(*args, **kw):  # a real SIGINT during step STOP_AT, as a user's Ctrl-C
        calls.append(1)
        if len(calls) == STOP_AT:
            os.kill(os.getpid(), signal.SIGINT)
        return clip(*args, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", ctrl_c)
    res = cli_in_process(capsys, *command(use, b, text_file))
    assert res.returncode == 130 and f"stopped by SIGINT at step {STOP_AT}" in res.stderr, res.stderr
    assert (b / f"step-{STOP_AT}" / "manifest.json").is_file()
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    again = command(use, b, text_file) + (["--resume", "auto"] if use == "pretrain" else [])  # finetune: as is
    res = cli_in_process(capsys, *again)
    assert res.returncode == 0 and f"resumed from {b / f'step-{STOP_AT}'}" in res.stderr, res.stderr

    assert lrs == straight  # the schedule continues where it stopped
    assert records(use, a) == records(use, b) and len(records(use, a)) >= 2
    wa, wb = (load_file(r / f"step-{STEPS}" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
