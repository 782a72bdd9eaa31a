"""One study everywhere: `builtin:default` is the packaged corpus, whatever lies beside the checkout."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynaformer.data import corpus
from dynaformer.errors import DynaformerError

ROOT = Path(__file__).resolve().parents[1]
MAIN_DATA = "task:passkey,storyqa?text=builtin:default&frac=0.875&digits=1"


def _train_one_step(checkout: Path) -> dict:
    """`dynaformer train` for one step from `checkout` (its own src/ on the path, run from inside it);
    returns the data summary of run.json."""
    env = {**os.environ, "PYTHONPATH": str(checkout / "src")}
    cmd = [sys.executable, "-m", "dynaformer.cli", "train", "--out", "runs/x", "--data", MAIN_DATA,
           "--tokenizer", "byte", "--n_layer", "1", "--d_model", "16", "--n_head", "2", "--context_len", "128",
           "--batch_size", "2", "--max_steps", "1", "--eval_interval", "0", "--dtype", "fp32", "--threads", "1",
           "--progress_bar", "false"]
    res = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    code = subprocess.run([sys.executable, "-c", "import dynaformer; print(dynaformer.__file__)"], cwd=checkout,
                          env=env, capture_output=True, text=True, check=True).stdout
    assert code.startswith(str(checkout / "src")), code  # the checkout's own code ran
    return json.loads((checkout / "runs/x/run.json").read_text())["data"]


def test_clone_with_and_without_shared_trains_on_identical_data(tmp_path):
    """A checkout with nothing beside it and one with a ../shared/data/tinyshakespeare beside it (holding other
    text, so that reading it would show) train the main job's data on the same bytes."""
    fingerprints = []
    for name, beside in (("alone", None), ("with-shared", "Other text that must never be trained on.\n" * 3000)):
        checkout = tmp_path / name / "p"
        shutil.copytree(ROOT / "src", checkout / "src", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        if beside is not None:
            f = tmp_path / name / "shared" / "data" / "tinyshakespeare" / "input.txt"
            f.parent.mkdir(parents=True)
            f.write_text(beside)
        meta = _train_one_step(checkout)
        assert "tiny-shakespeare, packaged" in meta["source"]
        fingerprints.append((meta["sha256"], meta["train_sha256"], meta["val_sha256"], meta["n_bytes"]))
    assert fingerprints[0] == fingerprints[1]


def test_packaged_corpus_is_checked(tmp_path, monkeypatch):
    text = corpus.shakespeare()
    assert len(text) == 1_115_394 and text.startswith("First Citizen:")
    assert corpus.read_text("builtin:default")[0] is text and corpus.read_text("builtin:shakespeare")[0] is text
    damaged = tmp_path / "t.xz"
    damaged.write_bytes(lzma.compress(text.replace("ROMEO", "ROMEX").encode()))
    corpus.shakespeare.cache_clear()
    monkeypatch.setattr(corpus, "_SHAKESPEARE_XZ", damaged)
    try:
        with pytest.raises(DynaformerError, match="damaged"):
            corpus.read_text("builtin:default")
        damaged.write_bytes(b"not xz")
        with pytest.raises(DynaformerError, match="cannot be read"):
            corpus.read_text("builtin:default")
    finally:
        corpus.shakespeare.cache_clear()


def test_unknown_builtin_names_the_known_ones():
    with pytest.raises(DynaformerError, match="builtin:default, builtin:shakespeare, builtin:stories"):
        corpus.read_text("builtin:nope")
