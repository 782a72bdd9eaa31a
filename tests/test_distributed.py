"""Two-rank gloo training on CPU under torchrun: DDP equals one process with the same global batch,
and an FSDP2 checkpoint resumes in one process with identical losses (a different world size)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynaformer.train.metrics import read_metrics

from .conftest import ROOT, run_cli

ARGS = ["--n_layer", "2", "--n_head", "2", "--d_model", "32", "--context_len", "32", "--max_steps", "20",
        "--log_interval", "1", "--eval_interval", "10", "--eval_tokens", "512", "--progress_bar", "false",
        "--threads", "1", "--ckpt_interval", "10"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dynaformer.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory, ) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("dist")
    data = tmp / "text.txt"
    from dynaformer.data.corpus import generated_stories

    data.write_text(generated_stories(50_000))
    res = run_cli("train", *ARGS, "--data", str(data), "--batch_size", "8", "--out", str(tmp / "single"))
    assert res.returncode == 0, res.stderr
    return data, tmp / "single"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_process(single, tmp_path, mode):
    data, one = single
    res = _torchrun("train", *ARGS, "--data", str(data), "--batch_size", "4", "--parallel", mode,
                    "--out", str(tmp_path / mode))
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = _losses(one), _losses(tmp_path / mode)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5
    if mode == "fsdp":
        # The sharded run's checkpoint resumes in one process (world size 1, same global batch).
        import shutil

        shutil.rmtree(tmp_path / mode / "step-20")
        res = run_cli("train", *ARGS, "--data", str(data), "--batch_size", "8", "--parallel", mode,
                      "--out", str(tmp_path / mode), "--resume", "auto")
        assert res.returncode == 0, res.stderr
        c = _losses(tmp_path / mode)
        assert max(abs(a[s] - c[s]) for s in range(11, 21)) < 1e-5
