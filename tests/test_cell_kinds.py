"""The study's cell kinds (study/kinds.py) give every cell the key, folder, steps, dependency and process it had when
the kind was a string compared in four files: checked against those rules, written out here, for every shipped
grid, and pinned for the fixture grid. Also: cell.json as `compare` writes it, grid.json's variant options (read
from folders that still call them "harness"), the study's strict JSON writer, and the default evaluated tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynaformer.errors import DynaformerError
from dynaformer.files import write_json_strict
from dynaformer.study import cost
from dynaformer.study.folder import depends_on, prepare
from dynaformer.study.grid import GridEval, grid_from_dict, load_grid
from dynaformer.study.kinds import ENCODER, ENCODER_PRETRAIN, KINDS, LM, kind_of
from dynaformer.study.runner import cell_command

from .conftest import ROOT

GRIDS = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("grid-*.yaml")) + [
    "tests/fixtures/grid-tiny.yaml"]


@pytest.fixture
def roomy(monkeypatch):
    monkeypatch.setattr(cost, "available_memory", lambda: 64 * 2**30)  # what grids parse to, not this machine


def string_rules(cell, cells, out: Path) -> tuple[str, Path, int, Path | None, bool]:
    """(key, folder, steps, the folder it waits for, may be a torchrun job) by the rules the kinds replaced."""
    kind = cell.kind.name
    key = {"lm": "", "encoder_pretrain": "encoder-pretrain/", "encoder": f"encoder-{cell.task}/"}[kind]
    key += f"{cell.variant}/seed{cell.seed}"

    def folder(c):
        if c.kind.name == "encoder":
            return out / "encoder" / c.task / c.variant / f"seed{c.seed}"
        if c.kind.name == "encoder_pretrain":
            return out / "encoder-pretrain" / c.variant / f"seed{c.seed}"
        return out / "cells" / c.variant / f"seed{c.seed}"

    steps = int((cell.finetune if kind == "encoder" else cell.train)["max_steps"])
    if kind == "lm" and cell.match_reach:
        want = ("lm", cell.match_reach, cell.seed)
    elif kind == "encoder":
        want = ("encoder_pretrain", cell.variant, cell.seed)
    else:
        want = None
    need = next((folder(c) for c in cells if (c.kind.name, c.variant, c.seed) == want), None)
    return key, folder(cell), steps, need, kind != "encoder"


@pytest.mark.parametrize("name", GRIDS)
def test_each_kind_keeps_the_cells_keys_folders_steps_and_dependencies(name, roomy, tmp_path):
    grid = load_grid(ROOT / name)
    cells = grid.cells()
    kinds = {c.kind for c in cells}
    assert kinds <= set(KINDS) and LM in kinds
    assert (ENCODER in kinds) == (grid.encoder is not None)
    assert (ENCODER_PRETRAIN in kinds) == (grid.encoder is not None and "pretrain" in grid.encoder)
    for c in cells:
        torchrun = "torch.distributed.run" in cell_command(tmp_path / "d", 2, c)
        mine = (c.key, c.folder(tmp_path), c.steps, depends_on(tmp_path, c, cells), torchrun)
        assert mine == string_rules(c, cells, tmp_path), c.key
    assert len({c.key for c in cells}) == len(cells)  # keys (and so folders) name one cell each


def test_the_fixture_grid_cells_pinned(roomy, tmp_path):
    cells = load_grid(ROOT / "tests" / "fixtures" / "grid-tiny.yaml").cells()
    variants = ["baseline", "dyn_span", "dyn_residual", "static_residual", "fixed_window", "per_head"]
    assert [(c.key, c.steps) for c in cells] == [(f"{v}/seed{s}", 6) for v in variants for s in (0, 1)]
    needs = {c.key: depends_on(tmp_path, c, cells) for c in cells}
    assert {k: v.relative_to(tmp_path).as_posix() for k, v in needs.items() if v} == {
        "fixed_window/seed0": "cells/dyn_span/seed0", "fixed_window/seed1": "cells/dyn_span/seed1"}


def test_encoder_kinds_pinned(roomy, tmp_path):
    """grid-gpu.yaml pretrains: each fine-tuning cell waits for its variant and seed's pretraining cell."""
    cells = load_grid(ROOT / "configs" / "grid-gpu.yaml").cells()
    pre = next(c for c in cells if c.kind is ENCODER_PRETRAIN and c.variant == "dyn_span" and c.seed == 1)
    enc = next(c for c in cells if c.kind is ENCODER and c.variant == "dyn_span" and c.seed == 1)
    assert pre.key == "encoder-pretrain/dyn_span/seed1" and pre.steps == 3000
    assert depends_on(tmp_path, pre, cells) is None
    assert enc.key == f"encoder-{enc.task}/dyn_span/seed1" and enc.steps == enc.finetune["max_steps"]
    assert enc.folder(tmp_path) == tmp_path / "encoder" / enc.task / "dyn_span" / "seed1"
    assert depends_on(tmp_path, enc, cells) == tmp_path / "encoder-pretrain" / "dyn_span" / "seed1"
    assert cell_command(tmp_path, 4, enc)[1:] == ["-m", "dynaformer.study.cell", str(tmp_path)]  # one process


def test_a_record_names_its_kind():
    assert kind_of({}) is LM and kind_of({"variant": "a"}) is LM  # language-model records carry no kind
    assert kind_of({"kind": "encoder"}) is ENCODER and kind_of({"kind": "encoder_pretrain"}) is ENCODER_PRETRAIN
    with pytest.raises(DynaformerError, match="unknown cell kind 'probe'"):
        kind_of({"kind": "probe"})
    assert LM.spec_steps({"train": {"max_steps": 7}}) == 7 and ENCODER.spec_steps({"finetune": {"max_steps": 5}}) == 5


ENC = {"name": "kinds", "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_len": 128},
       "train": {"max_steps": 3, "batch_size": 2, "data": "task:passkey?text=builtin:stories&frac=0.5"},
       "variants": {"baseline": {}, "dyn_span": {"span": "dynamic"},
                    "fixed_window": {"span": "fixed", "match_reach": "dyn_span", "seeds": 1}},
       "seeds": 2, "eval": {"tasks": ["passkey"], "cost_lengths": [128]},
       "encoder": {"model": {"context_len": 64}, "finetune": {"max_steps": 4}, "tasks": ["keyword"],
                   "variants": ["baseline"], "pretrain": {"data": "builtin:stories", "max_steps": 2}}}


def test_compare_writes_each_kinds_cell_json(tmp_path):
    out = tmp_path / "o"
    cells = prepare(grid_from_dict(ENC), out, skip_invalid=False)
    assert [c.key for c in cells] == ["baseline/seed0", "baseline/seed1", "dyn_span/seed0", "dyn_span/seed1",
                                      "fixed_window/seed0", "encoder-pretrain/baseline/seed0",
                                      "encoder-pretrain/baseline/seed1", "encoder-keyword/baseline/seed0",
                                      "encoder-keyword/baseline/seed1"]

    def spec(rel):
        return json.loads((out / rel / "cell.json").read_text())

    lm = spec("cells/fixed_window/seed0")
    assert list(lm) == ["variant", "seed", "model", "train", "eval", "match_reach"]
    assert lm["match_reach"] == {"variant": "dyn_span", "cell": str(out / "cells" / "dyn_span" / "seed0")}
    assert list(spec("cells/baseline/seed1")) == ["variant", "seed", "model", "train", "eval"]
    pre = spec("encoder-pretrain/baseline/seed1")
    assert list(pre) == ["kind", "variant", "seed", "model", "train"] and pre["kind"] == "encoder_pretrain"
    assert pre["train"]["objective"] == "mlm" and pre["model"]["causal"] is False
    enc = spec("encoder/keyword/baseline/seed1")
    assert list(enc) == ["kind", "variant", "seed", "task", "model", "finetune", "needs"]
    assert enc["needs"] == str(out / "encoder-pretrain" / "baseline" / "seed1")
    assert enc["finetune"]["init"] == str(out / "encoder-pretrain" / "baseline" / "seed1" / "run")
    # Without pretraining an encoder cell starts from scratch: no `needs`, no `init`.
    scratch = {**ENC, "encoder": {k: v for k, v in ENC["encoder"].items() if k != "pretrain"}}
    prepare(grid_from_dict(scratch), tmp_path / "s", skip_invalid=False)
    enc = json.loads((tmp_path / "s" / "encoder" / "keyword" / "baseline" / "seed0" / "cell.json").read_text())
    assert "needs" not in enc and enc["finetune"]["init"] is None


def test_grid_json_keeps_the_variant_options_and_reads_the_old_name(tmp_path):
    out = tmp_path / "o"
    prepare(grid_from_dict(ENC), out, skip_invalid=False)
    info = json.loads((out / "grid.json").read_text())
    options = {"fixed_window": {"match_reach": "dyn_span", "seeds": 1}}
    assert info["grid"]["variant_options"] == options and "harness" not in info["grid"]
    info["grid"]["harness"] = info["grid"].pop("variant_options")  # a folder written before the rename
    (out / "grid.json").write_text(json.dumps(info))
    prepare(grid_from_dict(ENC), out, skip_invalid=False)  # resumes: the fingerprint leaves the options out
    again = json.loads((out / "grid.json").read_text())
    assert again["grid"]["variant_options"] == options and "harness" not in again["grid"]
    assert again["fingerprint"] == info["fingerprint"]


def test_the_study_json_writer(tmp_path):
    p = tmp_path / "r.json"
    write_json_strict(p, {"a": np.float32(1.5), "b": [np.int64(2), 3.0]})
    assert p.read_text() == '{\n "a": 1.5,\n "b": [\n  2,\n  3.0\n ]\n}'  # indent 1, numpy scalars as numbers
    with pytest.raises(ValueError):
        write_json_strict(p, {"loss": float("nan")})  # a NaN is refused: the report would read it as a number
    with pytest.raises(TypeError):
        write_json_strict(p, {"x": object()})
    assert json.loads(p.read_text())["a"] == 1.5  # a refused write leaves the old file


def test_default_eval_tasks_come_from_the_task_registry(monkeypatch):
    from dynaformer.data import tasks

    assert GridEval().tasks == ["passkey", "mqar", "selcopy", "storyqa", "summary"]
    monkeypatch.setitem(tasks.TASKS, "passkey2", tasks.Passkey)  # a newly registered long-range task
    assert GridEval().tasks[-1] == "passkey2"


def test_a_grid_folder_moved_elsewhere_resumes(tmp_path):
    """cell.json names other cells' folders (match_reach, the pretraining cell): in a copied grid folder they lead
    to the same cells of the copy, so it resumes and names the new place; a changed config still stops it."""
    import shutil

    prepare(grid_from_dict(ENC), tmp_path / "o", skip_invalid=False)
    shutil.copytree(tmp_path / "o", tmp_path / "copy")
    prepare(grid_from_dict(ENC), tmp_path / "copy", skip_invalid=False)
    lm = json.loads((tmp_path / "copy" / "cells" / "fixed_window" / "seed0" / "cell.json").read_text())
    assert lm["match_reach"]["cell"] == str(tmp_path / "copy" / "cells" / "dyn_span" / "seed0")
    enc = json.loads((tmp_path / "copy" / "encoder" / "keyword" / "baseline" / "seed0" / "cell.json").read_text())
    assert enc["finetune"]["init"] == str(tmp_path / "copy" / "encoder-pretrain" / "baseline" / "seed0" / "run")
    # A link to another cell is a different config, moved or not.
    cell_json = tmp_path / "copy" / "cells" / "fixed_window" / "seed0" / "cell.json"
    elsewhere = str(tmp_path / "o" / "cells" / "dyn_span" / "seed1")
    cell_json.write_text(json.dumps({**lm, "match_reach": {**lm["match_reach"], "cell": elsewhere}}))
    with pytest.raises(DynaformerError, match="fixed_window/seed0 .* was run with a different config"):
        prepare(grid_from_dict(ENC), tmp_path / "copy", skip_invalid=False)
    changed = {**ENC, "variants": {**ENC["variants"], "dyn_span": {"span": "dynamic", "d_model": 48}}}
    with pytest.raises(DynaformerError, match="dyn_span/seed0 .* was run with a different config"):
        prepare(grid_from_dict(changed), tmp_path / "o", skip_invalid=False)
