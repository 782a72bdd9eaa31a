"""Two-rank gloo training on CPU under torchrun: DDP equals one process with the same global batch; an
FSDP2 run writes sharded DCP checkpoints that resume on one and on two ranks with the same losses, load
into one process for eval, and are skipped with a warning when a shard is missing, corrupt or misshapen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dynaformer.train.metrics import read_metrics

from .conftest import ROOT, shared_dir

ARGS = ["--n_layer", "2", "--n_head", "2", "--d_model", "32", "--context_len", "32", "--max_steps", "20",
        "--log_interval", "1", "--eval_interval", "10", "--eval_tokens", "512", "--progress_bar", "false",
        "--threads", "1", "--ckpt_interval", "10"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dynaformer.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


def _one_process(*args: str) -> subprocess.CompletedProcess:
    """`train` on one process, in this one (its exit paths are a subprocess's; only torchrun needs new ones)."""
    import contextlib
    import io

    from dynaformer.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return subprocess.CompletedProcess(args, rc, "", err.getvalue())


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, Path]:
    """(text file, the one-process run of batch 8 on it), built once per session."""

    def build(tmp: Path) -> None:
        from dynaformer.data.corpus import generated_stories

        (tmp / "text.txt").write_text(generated_stories(50_000))
        res = _one_process("train", *ARGS, "--data", str(tmp / "text.txt"), "--batch_size", "8", "--out",
                           str(tmp / "single"))
        assert res.returncode == 0, res.stderr

    tmp = shared_dir(tmp_path_factory, "dist-single", build)
    return tmp / "text.txt", tmp / "single"


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
        _check_dcp_resume(data, a, tmp_path / mode)


def _check_dcp_resume(data: Path, want: dict[int, float], run: Path) -> None:
    import shutil

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from dynaformer.runs import load_model
    from dynaformer.train.checkpoint import checkpoint_layout, read_model_tensors

    ckpt = run / "step-10"
    assert checkpoint_layout(ckpt) == "dcp" and (ckpt / "dcp" / ".metadata").is_file()
    assert not (ckpt / "model.safetensors").exists() and len(list((ckpt / "dcp").glob("*.distcp"))) == 2
    # One process reads the shards through DCP: the same tensors as DCP's own converter gives.
    dcp_to_torch_save(ckpt / "dcp", run / "full.pt")
    ref = torch.load(run / "full.pt", weights_only=True)["model"]
    mine = read_model_tensors(ckpt)
    assert mine.keys() <= ref.keys() and all(torch.equal(mine[k], ref[k]) for k in mine)
    model, _, _ = load_model(ckpt)
    assert torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], ref["blocks.0.attn.qkv.weight"])
    # Resume from step-10 on one rank (same global batch) and on two: the uninterrupted run's losses.
    for ranks, where in ((1, run.parent / "resume1"), (2, run.parent / "resume2")):
        shutil.copytree(run, where)
        shutil.rmtree(where / "step-20")
        args = [*ARGS, "--data", str(data), "--parallel", "fsdp", "--out", str(where), "--resume", "auto"]
        res = (_one_process("train", *args, "--batch_size", "8") if ranks == 1
               else _torchrun("train", *args, "--batch_size", "4"))
        assert res.returncode == 0, res.stderr[-3000:]
        assert "resumed from" in res.stderr and "step-10" in res.stderr
        got = _losses(where)
        assert max(abs(want[s] - got[s]) for s in range(11, 21)) < 1e-5, ranks
    assert checkpoint_layout(run.parent / "resume1" / "step-20") == "safetensors"  # one process: its own layout
    assert checkpoint_layout(run.parent / "resume2" / "step-20") == "dcp"
    _check_damaged_shards(data, run)


def _rehash(ckpt: Path) -> None:
    """A manifest that matches the files again (a shard rewritten consistently, yet wrong)."""
    import json

    from dynaformer.files import sha256_file

    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"] = {n: sha256_file(ckpt / n) for n in m["files"] if (ckpt / n).exists()}
    (ckpt / "manifest.json").write_text(json.dumps(m))


def _check_damaged_shards(data: Path, run: Path) -> None:
    import shutil

    import torch
    import torch.distributed.checkpoint as dcp

    from dynaformer.train.checkpoint import latest_checkpoint

    def damaged(name: str, harm) -> Path:
        where = run.parent / f"damaged-{name}"
        shutil.copytree(run, where)
        harm(where / "step-20")
        return where

    def flip(ckpt: Path) -> None:
        shard = ckpt / "dcp" / "__1_0.distcp"
        raw = bytearray(shard.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        shard.write_bytes(bytes(raw))

    def misshape(ckpt: Path) -> None:  # a shard whose tensor has the wrong shape, checksums made to match
        state = torch.load(run / "full.pt", weights_only=True)
        state["model"]["blocks.0.attn.qkv.weight"] = state["model"]["blocks.0.attn.qkv.weight"][:-1]
        shutil.rmtree(ckpt / "dcp")
        dcp.save(state, checkpoint_id=ckpt / "dcp", no_dist=True)
        _rehash(ckpt)

    def outside(ckpt: Path) -> None:  # .metadata naming a shard outside the checkpoint, checksums made to match
        import dataclasses
        import pickle

        meta_file = ckpt / "dcp" / ".metadata"
        meta = pickle.loads(meta_file.read_bytes())  # noqa: S301 (our own file, in a test)
        meta.storage_data = {k: dataclasses.replace(v, relative_path="../../../outside.distcp")
                             for k, v in meta.storage_data.items()}
        meta_file.write_bytes(pickle.dumps(meta))
        _rehash(ckpt)

    cases = {"missing": lambda c: (c / "dcp" / "__0_0.distcp").unlink(), "corrupt": flip, "misshapen": misshape,
             "outside": outside}
    for name, harm in cases.items():
        where = damaged(name, harm)
        if name == "outside":  # refused before any read: readers fall back, resuming under torchrun rewrites it
            assert latest_checkpoint(where, warn=False) == where / "step-10"
            res = _one_process("eval", str(where))
            assert res.returncode == 0 and "outside its folder" in res.stderr, res.stderr[-2000:]
            res = _torchrun("train", *ARGS, "--data", str(data), "--batch_size", "4", "--parallel", "fsdp",
                            "--out", str(where), "--resume", "auto")
            assert res.returncode == 0, res.stderr[-3000:]
            assert f"resumed from {where / 'step-10'}" in res.stderr, res.stderr[-2000:]
            assert latest_checkpoint(where, warn=False) == where / "step-20"  # rewritten whole
            continue
        if name != "misshapen":  # checksums catch it before anything is read (the trainer resumes the same way)
            assert latest_checkpoint(where, warn=False) == where / "step-10"
            continue
        res = _one_process("train", *ARGS, "--data", str(data), "--batch_size", "8", "--out", str(where),
                           "--resume", "auto")
        assert res.returncode == 0, (name, res.stderr[-2000:])
        assert "warning: skipping" in res.stderr and "step-20" in res.stderr, (name, res.stderr[-2000:])
        assert f"resumed from {where / 'step-10'}" in res.stderr, (name, res.stderr[-2000:])


def test_fsdp_with_muon_matches_one_process_and_resumes(single, tmp_path):
    """Muon under FSDP2: each sharded matrix is gathered, orthogonalised whole and re-sliced (train/optim.py), so
    two ranks take one process's steps; its momentum goes through the DCP checkpoint and resumes on 1 or 2 ranks."""
    import shutil

    data, _ = single
    args = [*ARGS, "--data", str(data), "--optimizer", "muon"]
    res = _one_process("train", *args, "--batch_size", "8", "--out", str(tmp_path / "one"))
    assert res.returncode == 0, res.stderr[-3000:]
    res = _torchrun("train", *args, "--batch_size", "4", "--parallel", "fsdp", "--out", str(tmp_path / "fsdp"))
    assert res.returncode == 0, res.stderr[-3000:]
    want = _losses(tmp_path / "one")
    got = _losses(tmp_path / "fsdp")
    assert sorted(want) == sorted(got) == list(range(1, 21))
    assert max(abs(want[s] - got[s]) for s in want) < 1e-5
    for ranks in (1, 2):
        where = tmp_path / f"resume{ranks}"
        shutil.copytree(tmp_path / "fsdp", where)
        shutil.rmtree(where / "step-20")
        again = [*args, "--parallel", "fsdp", "--out", str(where), "--resume", "auto"]
        res = (_one_process("train", *again, "--batch_size", "8") if ranks == 1
               else _torchrun("train", *again, "--batch_size", "4"))
        assert res.returncode == 0 and "step-10" in res.stderr, res.stderr[-3000:]
        resumed = _losses(where)
        assert max(abs(want[s] - resumed[s]) for s in range(11, 21)) < 1e-5, ranks
