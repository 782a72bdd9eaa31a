"""One config style and one run identity: sections read through configtools (fine-tuning is a TrainConfig plus
a task section; a grid's eval, questions and encoder are dataclasses), errors that name the field, the shipped
grids parsed to the values (and fingerprints) they always had, and `first_difference`, the one "same run?" rule
that run folders, fine-tuning folders and grid cells share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynaformer.cli import build_finetune_configs, make_parser
from dynaformer.configtools import first_difference, from_dict, to_dict
from dynaformer.errors import ConfigError, DynaformerError
from dynaformer.study import cost
from dynaformer.study.grid import EVAL_DEFAULTS, grid_from_dict, load_grid
from dynaformer.train.config import TrainConfig
from dynaformer.train.finetune import TRAIN_DEFAULTS, FinetuneConfig, TaskConfig, finetune, flat_record, read_finetune

from .conftest import ROOT, tiny_config

# --- sections ----------------------------------------------------------------------------------------------


def test_a_section_given_in_part_keeps_the_section_defaults():
    cfg = from_dict(FinetuneConfig, {"train": {"lr": "2e-3"}, "task": {"task": "keyword"}})
    assert cfg.train.lr == 2e-3 and cfg.task.task == "keyword"
    assert cfg.train.max_steps == 500 != TrainConfig().max_steps  # fine-tuning's default, not pretraining's
    assert cfg.train.dtype == "fp32" and cfg.task.n_train == TaskConfig().n_train
    assert to_dict(cfg)["train"]["lr"] == 2e-3  # sections become mappings
    for data, needle in [({"train": {"max_steps": "x"}}, "train.max_steps: expected an integer"),
                         ({"train": {"max_steps": 0}}, "train.max_steps: must be > 0"),
                         ({"train": {"bogus": 1}}, "unknown config key 'train.bogus'"),
                         ({"task": {"n_val": -1}}, "task.n_val: must be > 0"),
                         ({"train": {"data": "builtin:stories"}}, "train.data: fine-tuning keeps"),
                         ({"train": {"resume": "restart"}}, "train.resume: auto or none"),
                         ({"train": 3}, "train: expected a mapping")]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
            from_dict(FinetuneConfig, data)


def test_the_flat_form_of_a_finetune_config_round_trips():
    """The flags, a grid's encoder.finetune and run.json's record are one flat mapping: every key goes to the
    section that owns it, and the record holds exactly the fields fine-tuning takes."""
    cfg = read_finetune({"task": "listops", "depth": 1, "max_steps": 7, "lr": 2e-3, "seed": 4})
    assert (cfg.task.task, cfg.task.depth, cfg.train.max_steps, cfg.train.lr, cfg.train.seed) == \
        ("listops", 1, 7, 2e-3, 4)
    record = flat_record(cfg)
    assert set(record) == set(TRAIN_DEFAULTS) | set(to_dict(TaskConfig()))
    assert read_finetune(record) == cfg
    with pytest.raises(ConfigError, match="unknown config key 'finetune.bogus'"):
        read_finetune({"bogus": 1})
    with pytest.raises(ConfigError, match="unknown config key 'finetune.data'"):  # not a fine-tuning field
        read_finetune({"data": "builtin:stories"})


def test_finetune_flags_keep_their_names():
    """--name, --train.name / --task.name, and the --finetune.name of before all set the same field."""
    args = make_parser().parse_args(["finetune", "--max_steps", "7", "--finetune.lr", "0.002", "--task", "listops",
                                     "--train.seed", "3", "--finetune.depth", "1", "--task.n_val", "9",
                                     "--n_layer", "1", "--progress_bar"])
    cfg, model_cfg = build_finetune_configs(args)
    assert (cfg.train.max_steps, cfg.train.lr, cfg.train.seed, cfg.train.progress_bar) == (7, 2e-3, 3, True)
    assert (cfg.task.task, cfg.task.depth, cfg.task.n_val) == ("listops", 1, 9)
    assert model_cfg.n_layer == 1 and model_cfg.causal is False  # from scratch: an encoder
    with pytest.raises(SystemExit):  # pretraining's fields that fine-tuning does not take are not flags
        make_parser().parse_args(["finetune", "--data", "builtin:stories"])


# --- one "same run?" rule ----------------------------------------------------------------------------------

DEFAULTS = {"train": {"lr": 1e-3, "optimizer": "adamw", "threads": 0}}


def test_first_difference():
    old = {"variant": "b", "train": {"lr": 1e-3, "threads": 1}}
    assert first_difference(old, old, DEFAULTS) is None
    # a field added since the folder was written counts as the same at its default, not otherwise
    assert first_difference(old, {**old, "train": {**old["train"], "optimizer": "adamw"}}, DEFAULTS) is None
    assert first_difference(old, {**old, "train": {**old["train"], "optimizer": "muon"}}, DEFAULTS) == \
        "train.optimizer: None in the folder, 'muon' now"
    assert first_difference(old, {**old, "train": {"lr": 2e-3, "threads": 1}}, DEFAULTS) == \
        "train.lr: 0.001 in the folder, 0.002 now"
    # fields that may change on resume are left out; keys that are not sections compare whole
    assert first_difference(old, {**old, "train": {"lr": 1e-3, "threads": 8}}, DEFAULTS,
                            may_change={"train": ["threads"]}) is None
    assert first_difference(old, {**old, "variant": "c"}, DEFAULTS) == "variant: 'b' in the folder, 'c' now"
    assert first_difference({**old, "needs": "x"}, old, DEFAULTS) == "needs: 'x' in the folder, None now"
    # `same` decides field equality (run folders compare paths by where they lead)
    assert first_difference(old, {**old, "train": {"lr": 1.0, "threads": 1}}, DEFAULTS,
                            same=lambda k, a, b: k == "lr" or a == b) is None


def _ft(out: Path, **kw) -> FinetuneConfig:
    return read_finetune({"task": "keyword", "n_train": 48, "n_val": 16, "out": str(out), "max_steps": 2,
                          "batch_size": 4, "eval_interval": 2, "progress_bar": False, **kw})


def _model():
    return tiny_config(causal=False, n_layer=1, context_len=64)


def test_a_finetune_folder_is_judged_by_the_shared_rule(tmp_path):
    """A fine-tuning folder written before a field existed continues when the field is at its default; a
    different value is refused naming it; bookkeeping fields may change."""
    out = tmp_path / "ft"
    first = finetune(_ft(out), _model())
    info = json.loads((out / "run.json").read_text())
    del info["finetune"]["depth"]  # as if written before `depth` existed (its default now: 2)
    (out / "run.json").write_text(json.dumps(info))
    assert finetune(_ft(out, keep_last=5, threads=1), _model())["accuracy"] == first["accuracy"]  # continued
    assert json.loads((out / "run.json").read_text())["finetune"]["depth"] == 2  # the record is rewritten whole
    with pytest.raises(DynaformerError, match=r"different run \(finetune.depth: 2 in the folder, 3 now\)"):
        finetune(_ft(out, depth=3), _model())
    with pytest.raises(DynaformerError, match=r"different run \(model.n_layer: 1 in the folder, 2 now\)"):
        finetune(_ft(out), tiny_config(causal=False, n_layer=2, context_len=64))
    with pytest.raises(ValueError, match="load_backbone"):  # a backbone is read by the caller's loader
        finetune(_ft(tmp_path / "other", init=str(out)), _model())


# --- grids -------------------------------------------------------------------------------------------------

# grid.json's fingerprint of each shipped grid (a grid folder is resumed only by the grid it was made with):
# these are the values before the grid's sections became dataclasses, and must not change by accident.
FINGERPRINTS = {"configs/grid-cpu-full.yaml": "6619824a1062313f", "configs/grid-cpu-long.yaml": "fb303a317c57415c",
                "configs/grid-cpu.yaml": "3b0ad491751b9ade", "configs/grid-gpu.yaml": "9d4e8f582846f269",
                # the main grid's fingerprint: its folder gains only the relatives' cells
                "configs/grid-cpu-relatives.yaml": "3b0ad491751b9ade",
                "tests/fixtures/grid-tiny.yaml": "bc18946ffc64016f"}


@pytest.fixture
def roomy(monkeypatch):
    monkeypatch.setattr(cost, "available_memory", lambda: 64 * 2**30)  # what grids parse to, not this machine


def test_shipped_grids_keep_their_fingerprints(roomy):
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("grid-*.yaml")}
    assert shipped <= set(FINGERPRINTS)
    assert {name: load_grid(ROOT / name).fingerprint() for name in FINGERPRINTS} == FINGERPRINTS


def test_shipped_grids_parse_to_the_same_values(roomy):
    cpu = load_grid(ROOT / "configs" / "grid-cpu.yaml")
    assert cpu.eval == {"tasks": ["passkey", "selcopy", "storyqa", "summary"], "n_per_distance": 40,
                        "fractions": [1 / 16, 1 / 8, 1 / 4, 1 / 2, 7 / 8], "text_tokens": 8192, "multiples": [1, 2, 4],
                        "diag_windows": 8, "batch_size": 16, "cost_lengths": [1024, 2048, 4096], "cost_repeats": 3}
    assert cpu.questions == {"reference": "baseline", "residual": "dyn_residual", "span": "dyn_span",
                             "size_matched": "baseline_large",
                             "controls": {"residual": ["static_residual"], "span": ["fixed_window", "per_head"]},
                             "relatives": {}}
    assert cpu.encoder is None
    full = load_grid(ROOT / "configs" / "grid-cpu-full.yaml")
    assert full.encoder == {"model": {"n_layer": 2, "d_model": 64, "n_head": 4, "context_len": 192},
                            "finetune": {"n_train": 2000, "n_val": 500, "max_steps": 600, "batch_size": 32,
                                         "lr": 2.0e-3, "eval_interval": 200, "max_len": 192, "threads": 1,
                                         "progress_bar": False},
                            "tasks": {"keyword": {"distance": 16}, "listops": {"depth": 2}},
                            "variants": ["baseline", "dyn_residual", "dyn_span", "both"]}  # no pretrain key
    gpu = load_grid(ROOT / "configs" / "grid-gpu.yaml")
    assert gpu.eval["tasks"] == EVAL_DEFAULTS["tasks"] and gpu.eval["cost_repeats"] == 3
    assert gpu.encoder["pretrain"]["max_steps"] == 3000
    cell = next(c for c in full.cells() if c.kind.name == "encoder")
    assert cell.finetune == {**flat_record(read_finetune({**full.encoder["finetune"], "task": cell.task,
                                                          **full.encoder["tasks"][cell.task]})), "seed": cell.seed}


GRID = {"model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_len": 64},
        "train": {"max_steps": 2, "batch_size": 2, "data": "task:passkey?text=builtin:stories&frac=0.5"},
        "variants": {"baseline": {}}, "seeds": 1, "eval": {"tasks": ["passkey"], "cost_lengths": [128]}}


@pytest.mark.parametrize("section, value, needle", [
    ("eval", {"n_per_distance": "many"}, "grid.eval.n_per_distance: expected an integer, got 'many'"),
    ("eval", {"batch_size": 0}, "grid.eval.batch_size: must be > 0, got 0"),
    ("eval", {"fractions": [0.5, 2]}, "grid.eval.fractions: expected fractions of the context in (0, 1]"),
    ("eval", {"multiples": []}, "grid.eval.multiples: must not be empty"),
    ("eval", {"cost_lengths": [True]}, "grid.eval.cost_lengths: expected an integer, got True"),
    ("eval", {"cost_length": [1024]}, "unknown config key 'grid.eval.cost_length'"),
    ("questions", {"reference": "baseline", "bogus": 1}, "unknown config key 'grid.questions.bogus'"),
    ("questions", {"controls": {"depth": ["baseline"]}}, "grid.questions.controls: expected {residual"),
    ("questions", {"controls": {"span": ["ghost"]}}, "grid.questions.controls.span: 'ghost' is not a variant"),
    ("questions", ["baseline"], "grid.questions: expected a mapping"),
    ("encoder", {"finetune": {"n_train": 8}, "bogus": 1}, "unknown config key 'grid.encoder.bogus'"),
    ("encoder", {"pretrain": 5}, "grid.encoder.pretrain: expected"),
    ("encoder", {"tasks": ["sentiment"]}, "grid.encoder.tasks: unknown task 'sentiment'"),
    ("encoder", {"variants": ["ghost"]}, "grid.encoder.variants: 'ghost' is not a variant"),
])
def test_grid_errors_name_their_field(section, value, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[").replace("{", r"\{")):
        grid_from_dict({**GRID, section: value})


def test_grid_sections_read_like_every_config():
    """Values are coerced as in every config (a comma-separated list, a number in a string); shorthand forms
    (a task list, one control) and empty sections take their defaults."""
    g = grid_from_dict({**GRID, "eval": {"tasks": "passkey", "n_per_distance": "8", "cost_lengths": [128]},
                        "questions": {"controls": {"span": "baseline", "residual": None}},
                        "encoder": {"tasks": ["keyword"], "model": None}})
    assert g.eval["tasks"] == ["passkey"] and g.eval["n_per_distance"] == 8
    assert g.questions["controls"] == {"span": ["baseline"], "residual": []}
    assert g.encoder == {"model": {}, "finetune": {}, "tasks": {"keyword": {}}, "variants": ["baseline"]}
    assert grid_from_dict(GRID).eval == {**EVAL_DEFAULTS, "tasks": ["passkey"], "cost_lengths": [128]}


def test_the_grids_top_level_and_variant_options_are_typed_fields():
    """match, wall_clock_s and a variant's seeds are read through configtools like every config: the error names
    the field; a whole number of seconds is kept as written (grid fingerprints hash it so)."""
    import pytest

    from dynaformer.errors import ConfigError
    from dynaformer.study.grid import grid_from_dict

    base = {"model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_len": 128},
            "train": {"max_steps": 2, "batch_size": 2, "data": "task:passkey?text=builtin:stories&frac=0.5"},
            "variants": {"baseline": {}}, "seeds": 1, "eval": {"tasks": ["passkey"], "cost_lengths": [256]}}
    for change, needle in (({"match": "steps"}, "grid.match: expected one of tokens, wall_clock"),
                           ({"match": "wall_clock", "wall_clock_s": "long"}, "grid.wall_clock_s: expected float"),
                           ({"variants": {"baseline": {"seeds": "two"}}}, "variant 'baseline'.seeds: expected int")):
        with pytest.raises(ConfigError, match=needle):
            grid_from_dict({**base, **change}, "g")
    grid = grid_from_dict({**base, "match": "wall_clock", "wall_clock_s": 30}, "g")
    assert grid.wall_clock_s == 30 and isinstance(grid.wall_clock_s, int)
