"""A grid that cannot run here is refused before anything trains, in one line naming the task or length:
tasks longer than the context they train at (the staged short rows included), evaluated tasks that do not fit,
and sizes beyond this machine's memory (the long study's longest length)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dynaformer.errors import ConfigError
from dynaformer.study import cost
from dynaformer.study.grid import load_grid

from .conftest import ROOT, assert_user_error, cli_in_process

GRID = {"name": "g", "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_len": 128},
        "train": {"max_steps": 2, "batch_size": 2, "data": "task:passkey?text=builtin:stories&frac=0.5"},
        "variants": {"baseline": {}}, "seeds": 1, "eval": {"tasks": ["passkey"], "cost_lengths": [256]}}


def _write(tmp_path: Path, **change) -> Path:
    g = {**GRID, **change}
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(g))
    return p


@pytest.mark.parametrize("change, needles", [
    (dict(train={**GRID["train"], "data": "task:passkey?dist=500&text=builtin:stories&frac=0.5"}),
     ["grid variant 'baseline'", "task passkey", "distance range 500-500", "at length 128"]),
    (dict(variants={"baseline": {}, "wide": {"data": "task:storyqa,passkey?dist=200-300"}}),
     ["grid variant 'wide'", "task storyqa", "at length 128"]),
    (dict(train={**GRID["train"], "data": "task:storyqa?text=builtin:stories&frac=0.5", "short_context": 32,
                 "short_steps": 1}),
     ["grid variant 'baseline'", "task storyqa", "length 32 is too short"]),
    (dict(model={**GRID["model"], "context_len": 32}, train={**GRID["train"], "data": "builtin:stories"},
          eval={"tasks": ["storyqa"], "cost_lengths": [256]}),
     ["grid.eval.tasks", "task storyqa", "32 tokens"]),
])
def test_tasks_that_do_not_fit_are_one_line(tmp_path, capsys, change, needles):
    grid = _write(tmp_path, **change)
    res = cli_in_process(capsys, "compare", str(grid), "--out", str(tmp_path / "out"))
    assert_user_error(res, *needles)
    assert not (tmp_path / "out").exists()


def test_the_long_study_needs_memory_for_its_longest_length(tmp_path, capsys, monkeypatch):
    """--long on a machine without the memory: one line naming the length and the memory needed, exit 2."""
    long = ROOT / "configs" / "grid-cpu-long.yaml"
    assert load_grid(long).base["model"]["context_len"] >= 1024  # loads where the memory is there
    monkeypatch.setattr(cost, "available_memory", lambda: 90 * 2**20)  # 90 MiB
    res = cli_in_process(capsys, "compare", str(long), "--out", str(tmp_path / "out"))
    assert_user_error(res, "length 4096", "GiB")
    assert not (tmp_path / "out").exists()
    # with the cost lengths cut, the 4x-context text evaluation is what does not fit
    # (200 MiB: every variant's training fits, mHC's n streams and Sinkhorn rounds included, the 4x text does not)
    monkeypatch.setattr(cost, "available_memory", lambda: 200 * 2**20)
    raw = yaml.safe_load(long.read_text())
    raw["eval"]["cost_lengths"] = [1024]
    with pytest.raises(ConfigError, match=r"long-text evaluation at length 4096 \(4x the context\) needs about"):
        load_grid(_dump(tmp_path, raw))


def _dump(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "long.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_every_shipped_grid_loads(monkeypatch):
    monkeypatch.setattr(cost, "available_memory", lambda: 64 * 2**30)  # what they parse to, not this machine's memory
    for p in sorted((ROOT / "configs").glob("grid-*.yaml")):
        assert load_grid(p).cells(), p
