"""A catalogue of bad inputs across the command line: each is one line on stderr naming the problem, exit
code 2, no traceback, and no file created or changed anywhere in the workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from .conftest import assert_user_error, cli_in_process

TINY = ["--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "32", "--batch_size", "2",
        "--eval_tokens", "64", "--progress_bar", "false", "--warmup_steps", "0"]
GRID = {"name": "g", "model": {"n_layer": 1, "n_head": 2, "d_model": 32, "context_len": 128},
        "train": {"max_steps": 2, "batch_size": 2, "data": "task:passkey?text=builtin:stories&frac=0.5"},
        "variants": {"baseline": {}}, "seeds": 1, "eval": {"tasks": ["passkey"], "cost_lengths": [256]}}


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a trained run, a text file, a JSONL file, grids and odd files."""
    from dynaformer.cli import main
    from dynaformer.data.corpus import generated_stories

    w = tmp_path_factory.mktemp("ws")
    (w / "text.txt").write_text(generated_stories(20_000, seed=3))
    assert main(["train", *TINY, "--data", str(w / "text.txt"), "--out", str(w / "run"), "--max_steps", "2",
                 "--tokenizer", "char"]) == 0
    (w / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 200)
    (w / "bad_utf8.yaml").write_bytes(b"model:\n  n_layer: \xff\xfe\n")
    (w / "list.yaml").write_text("- 1\n- 2\n")
    (w / "empty.txt").write_text("")
    (w / "ok.jsonl").write_text("\n".join(json.dumps({"text": f"a b {i}", "label": i % 2}) for i in range(40)))
    (w / "bad.jsonl").write_text('{"text": "a", "label": 0}\nnot json\n')
    (w / "strdist.jsonl").write_text("\n".join(json.dumps({"text": "x y", "label": 0, "distance": "far"})
                                               for _ in range(20)))
    (w / "ok.yaml").write_text(yaml.safe_dump(GRID))
    # Checkpoints whose config.json asks for sizes the weights do not have (checksums rewritten to match).
    for name, change in {"huge_vocab": {"vocab_size": 10**12}, "wide": {"d_model": 4096, "n_head": 2}}.items():
        _crafted(w / "run" / "step-2", w / name / "step-2", change)
    for name, change in {
        "seeds_abc": {"seeds": "abc"}, "seeds_float": {"seeds": 1.5}, "seeds_zero": {"seeds": 0},
        "seeds_huge": {"seeds": 10**9},
        "eval_tasks_map": {"eval": {"tasks": {"passkey": 1}}}, "eval_nper": {"eval": {"n_per_distance": "many"}},
        "eval_batch": {"eval": {"batch_size": 0}}, "eval_fractions": {"eval": {"fractions": [0, 2]}},
        "eval_multiples": {"eval": {"multiples": [1.5]}}, "cost_neg": {"eval": {"cost_lengths": [-4]}},
        "cost_huge": {"eval": {"cost_lengths": [10**11]}}, "eval_key": {"eval": {"taskz": ["passkey"]}},
        "unknown_key": {"bogus": 1}, "match": {"match": "steps"}, "wall": {"match": "wall_clock"},
        "variant_field": {"variants": {"baseline": {"n_layerz": 2}}},
        "variant_name": {"variants": {"bad name!": {}}},
        "variant_value": {"variants": {"baseline": {"residual": "nope"}}},
        "match_reach": {"variants": {"baseline": {}, "f": {"span": "fixed", "match_reach": "ghost"}}},
        "controls": {"questions": {"controls": {"span": ["ghost"]}}},
        "questions_key": {"questions": {"answer": "baseline"}},
        "task_len": {"train": {**GRID["train"], "data": "task:passkey?len=-5"}},
        "task_huge": {"train": {**GRID["train"], "data": "task:passkey?len=100000000"}},
        "encoder_task": {"encoder": {"tasks": ["nope"]}},
    }.items():
        (w / f"{name}.yaml").write_text(yaml.safe_dump({**GRID, **change}))
    return w


def _crafted(src: Path, dst: Path, model_change: dict) -> None:
    import shutil

    from dynaformer.train.checkpoint import _sha256

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["model"].update(model_change)
    (dst / "config.json").write_text(json.dumps(cfg))
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["files"]["config.json"] = _sha256(dst / "config.json")
    (dst / "manifest.json").write_text(json.dumps(manifest))


def _snapshot(root: Path) -> dict:
    """Every path, and each file's size and modification time (a folder's own time changes when a lock file
    comes and goes inside it, which writes nothing)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else "dir"
            for p in root.rglob("*")}


def _cases(w: Path) -> list[tuple[list[str], str]]:
    run, text, out = str(w / "run"), str(w / "text.txt"), str(w / "new")
    train = ["train", *TINY, "--data", text, "--out", out]
    cases = [
        # train: values
        (train + ["--lr", "inf"], "train.lr"), (train + ["--lr", "nan"], "train.lr"),
        (train + ["--lr", "-1e-3"], "train.lr"), (train + ["--lr", "0"], "train.lr"),
        (train + ["--weight_decay", "nan"], "weight_decay"), (train + ["--grad_clip", "nan"], "grad_clip"),
        (train + ["--init_std", "inf"], "init_std"), (train + ["--norm_eps", "nan"], "norm_eps"),
        (train + ["--rope_base", "inf"], "rope_base"), (train + ["--seed", "1e23"], "train.seed"),
        (train + ["--seed", "abc"], "train.seed"), (train + ["--max_steps", "0"], "max_steps"),
        (train + ["--max_steps", "1.5"], "max_steps"), (train + ["--batch_size", "-2"], "batch_size"),
        (train + ["--grad_accum", "0"], "grad_accum"), (train + ["--val_fraction", "1"], "val_fraction"),
        (train + ["--val_fraction", "0"], "val_fraction"), (train + ["--min_lr_ratio", "2"], "min_lr_ratio"),
        (train + ["--beta1", "1"], "beta1"), (train + ["--beta2", "-0.1"], "beta2"),
        (train + ["--warmup_steps", "-1"], "warmup_steps"), (train + ["--keep_last", "-1"], "keep_last"),
        (train + ["--dtype", "fp8"], "dtype"), (train + ["--tokenizer", "word"], "tokenizer"),
        (train + ["--tokenizer", "bpe"], "tokenizer_file"), (train + ["--objective", "mlm"], "objective"),
        (train + ["--tokenizer", "bpe", "--tokenizer_file", str(w / "latin1.txt")], "not UTF-8"),
        (train + ["--lr", "-1e-3"], "train.lr: must be > 0"), (train + ["--lr", "-inf"], "train.lr"),
        # sizes refused before anything is allocated or created
        (train + ["--batch_size", "1000000000"], "GiB available"), (train + ["--d_model", "1000000"], "GiB available"),
        (train + ["--n_layer", "1000000"], "GiB available"),
        (train + ["--device", "tpu"], "device"), (train + ["--device", "cuda"], "CUDA"),
        (train + ["--parallel", "zero"], "parallel"), (train + ["--resume", "yes-please"], "train.resume"),
        (train + ["--optimizer", "lion"], "muon"), (train + ["--muon_lr_ratio", "0"], "muon_lr_ratio"),
        (train + ["--resume", str(w / "nothing" / "step-3")], "train.resume"),
        (train + ["--resume", f"{run}/step-2"], "another run folder"),
        (train + ["--compile", "maybe"], "compile"), (train + ["--progress_bar", "2"], "progress_bar"),
        # train: model values
        (train + ["--n_head", "3"], "n_head"), (train + ["--n_layer", "0"], "n_layer"),
        (train + ["--context_len", "0"], "context_len"), (train + ["--d_model", "-32"], "d_model"),
        (train + ["--residual", "skip"], "residual"), (train + ["--span", "wide"], "span"),
        (train + ["--span_window", "0"], "span_window"), (train + ["--span_max", "0"], "span_max"),
        (train + ["--span_init", "0"], "span_init"), (train + ["--span_penalty", "-1"], "span_penalty"),
        (train + ["--span_ramp", "0"], "span_ramp"), (train + ["--dyn_rank", "9"], "dyn_rank"),
        (train + ["--dyn_p0", "0"], "dyn_p0"), (train + ["--dyn_gamma_init", "0"], "dyn_gamma_init"),
        (train + ["--mlp", "relu2"], "mlp"), (train + ["--dropout", "nan"], "dropout"),
        # train: the span relatives (fox, sink_window)
        (train + ["--span", "forgetting"], "model.span"),
        (train + ["--span", "sink_window", "--span_window", "8", "--sink_tokens", "8"], "sink_tokens"),
        (train + ["--span", "sink_window", "--span_window", "0"], "span_window"),
        (train + ["--span", "sink_window", "--sink_tokens", "-1"], "sink_tokens"),
        (train + ["--span", "fox", "--span_impl", "flex"], "model.span_impl: fox"),
        (train + ["--span", "sink_window", "--span_impl", "flex"], "model.span_impl: sink_window"),
        (train + ["--span", "fox", "--fox_prune", "-1"], "fox_prune"),
        (train + ["--span", "fox", "--fox_prune", "inf"], "fox_prune"),
        (train + ["--span", "fox", "--causal", "false"], "model.span: fox is a causal mechanism"),
        # train: the residual relatives (hyper, hyper_static, mhc, attnres, value residual)
        (train + ["--residual", "hyperconnection"], "residual"), (train + ["--hc_streams", "0"], "hc_streams"),
        (train + ["--residual", "mhc", "--hc_streams", "-4"], "hc_streams"),
        (train + ["--residual", "mhc", "--mhc_sinkhorn_iters", "0"], "mhc_sinkhorn_iters"),
        (train + ["--value_residual", "true", "--n_layer", "1"], "value_residual"),
        # train: data and files
        (["train", *TINY, "--data", str(w / "missing.txt"), "--out", out], "does not exist"),
        (["train", *TINY, "--data", str(w / "empty.txt"), "--out", out], "is empty"),
        (["train", *TINY, "--data", "builtin:nope", "--out", out], "builtin:nope"),
        (["train", *TINY, "--data", "task:nope", "--out", out], "unknown task"),
        (["train", *TINY, "--data", "task:passkey?len=-5", "--out", out], "len"),
        (["train", *TINY, "--data", "task:passkey?len=100000000", "--out", out], "len"),
        (["train", *TINY, "--data", "task:passkey?dist=5000", "--out", out], "impossible"),
        (["train", *TINY, "--data", "task:passkey?frac=2", "--out", out], "frac"),
        (["train", *TINY, "--data", "task:passkey?digits=0", "--out", out], "digits"),
        (["train", *TINY, "--data", "task:summary?visits=13", "--out", out], "visits"),
        (["train", *TINY, "--data", "task:passkey?colour=red", "--out", out], "colour"),
        (train + ["--config", str(w / "bad_utf8.yaml")], "bad_utf8.yaml"),
        (train + ["--config", str(w / "list.yaml")], "list.yaml"),
        (train + ["--config", str(w / "missing.yaml")], "missing.yaml"),
        (train + ["--no_such_flag", "1"], "no_such_flag"),
        (["train", *TINY, "--data", text, "--out", run, "--max_steps", "2", "--tokenizer", "char"],
         "already holds this run"),
        (["train", *TINY, "--data", text, "--out", run, "--max_steps", "3", "--tokenizer", "char", "--resume",
          "auto"], "config differs"),
        (["train", *TINY, "--data", text, "--out", text], "not a folder"),
        # eval
        (["eval", str(w / "missing")], "does not exist"), (["eval", text], "no complete checkpoint"),
        (["eval", run, "--tokens", "0"], "tokens"), (["eval", run, "--batch_size", "-1"], "batch_size"),
        (["eval", run, "--data", str(w / "missing.txt")], "does not exist"),
        (["eval", run, "--data", str(w / "latin1.txt")], "latin1.txt"),
        (["eval", str(w / "empty_dir")], "does not exist"),
        # generate
        (["generate", run, "--temperature", "nan"], "temperature"),
        (["generate", run, "--temperature", "-1"], "temperature"),
        (["generate", run, "--top_k", "0"], "top_k"), (["generate", run, "--top_p", "0"], "top_p"),
        (["generate", run, "--top_p", "1.5"], "top_p"), (["generate", run, "--max_new_tokens", "-1"],
                                                        "max_new_tokens"),
        (["generate", run, "--max_len", "-3"], "max_len must be a positive"),
        (["generate", run, "--temperature", "inf"], "finite temperature"),
        (["generate", run, "--max_new_tokens", "1000000000000"], "GiB available"),
        (["generate", run, "--temperature", "-1e-2"], "finite temperature"),
        (["generate", run, "--prompt", "ZZZ€"], "vocabulary"),
        (["generate", str(w / "missing")], "does not exist"),
        (["eval", str(w / "huge_vocab")], "GiB available"), (["generate", str(w / "huge_vocab")], "GiB available"),
        (["eval", str(w / "wide")], "does not fit"), (["export-hf", str(w / "huge_vocab"), out], "GiB available"),
        (train + ["--threads", "100000"], "train.threads"),
        (["finetune", "--task", "keyword", "--threads", "100000", "--out", out], "train.threads"),
        # export-hf
        (["export-hf", run, run, "--force"], "run folder"), (["export-hf", run, str(w), "--force"], "run folder"),
        (["export-hf", run, f"{run}/hf"], "run folder"), (["export-hf", run, text], "not a folder"),
        (["export-hf", str(w / "missing"), out], "does not exist"),
        (["export-hf", run, out, "--tokenizer", str(w / "missing.json")], "missing.json"),
        (["export-hf", run, out, "--tokenizer", str(w / "latin1.txt")], "not UTF-8"),
        # finetune
        (["finetune", "--task", "nope", "--out", out], "task"),
        (["finetune", "--task", "keyword", "--max_steps", "0", "--out", out], "max_steps"),
        (["finetune", "--task", "keyword", "--lr", "nan", "--out", out], "lr"),
        (["finetune", "--task", "keyword", "--min_lr_ratio", "1.5", "--out", out], "min_lr_ratio"),
        (["finetune", "--task", "jsonl", "--out", out], "train_file"),
        (["finetune", "--task", "jsonl", "--train_file", str(w / "bad.jsonl"), "--val_file",
          str(w / "ok.jsonl"), "--out", out], "bad.jsonl"),
        (["finetune", "--task", "jsonl", "--train_file", str(w / "strdist.jsonl"), "--val_file",
          str(w / "ok.jsonl"), "--out", out], "distance"),
        (["finetune", "--task", "keyword", "--init", str(w / "missing"), "--out", out], "does not exist"),
        (["finetune", "--task", "keyword", "--out", run], "run"),
        # data
        (["data", "tokenizer", "--vocab", "100", text, "--out", str(w / "tok.json")], "vocab"),
        (["data", "tokenizer", "--vocab", "1000000000000", text, "--out", str(w / "tok.json")], "must be ≤"),
        (["data", "tokenizer", "/dev/zero", "--out", str(w / "tok.json")], "not a regular file"),
        (train + ["--data", "/dev/zero"], "not a regular file"),
        (["data", "tokenizer", str(w / "missing.txt"), "--out", str(w / "tok.json")], "does not exist"),
        (["data", "tokenizer", text, "--out", text], "exists"),
        # compare and report
        (["compare", str(w / "missing.yaml"), "--out", out], "missing.yaml"),
        (["compare", str(w / "ok.yaml"), "--variants", "ghost", "--out", out], "ghost"),
        (["compare", str(w / "unknown_key.yaml"), "--out", out], "bogus"),
        (["report", str(w / "missing")], "does not exist"), (["report", run], "training run folder"),
        (["report", run, "--cost_lengths", "a,b"], "cost_lengths"),
        (["report", run, "--cost_lengths", "0"], "cost_lengths"),
    ]
    for name, needle in [("seeds_abc", "seeds"), ("seeds_float", "seeds"), ("seeds_zero", "seeds"),
                         ("seeds_huge", "at most 1,000 seeds"),
                         ("eval_tasks_map", "grid.eval.tasks"), ("eval_nper", "n_per_distance"),
                         ("eval_batch", "batch_size"), ("eval_fractions", "fractions"), ("eval_multiples", "multiples"),
                         ("cost_neg", "cost_lengths"), ("cost_huge", "cost_lengths"), ("eval_key", "taskz"),
                         ("match", "match"), ("wall", "wall_clock_s"), ("variant_field", "n_layerz"),
                         ("variant_name", "bad name"), ("variant_value", "residual"), ("match_reach", "ghost"),
                         ("controls", "ghost"), ("questions_key", "answer"), ("task_len", "len"),
                         ("task_huge", "len"), ("encoder_task", "nope")]:
        cases.append((["compare", str(w / f"{name}.yaml"), "--out", out], needle))
    return cases + _typed_flag_cases(train)


def _typed_flag_cases(train: list[str]) -> list[tuple[list[str], str]]:
    """Every typed field of the model and training configs given a value of the wrong kind: one line naming
    `section.field`, whatever the field (generated, so a new field is covered the day it is added)."""
    import typing

    from dynaformer.configtools import field_types
    from dynaformer.model import ModelConfig
    from dynaformer.train.config import TrainConfig

    wrong = {int: "twelve", float: "one-half", bool: "maybe"}
    cases = []
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        for name, tp in field_types(cls).items():
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if typing.get_origin(tp) is typing.Literal:
                value = "no-such-choice"
            elif args[0] in wrong:
                value = wrong[args[0]]
            else:
                continue  # free text (paths, data sources): checked where it is used
            cases.append((train + [f"--{name}", value], f"{section}.{name}"))
    # Fine-tuning: its task section and the training fields it takes, by the same rule.
    from dynaformer.train.finetune import TRAIN_DEFAULTS, TaskConfig

    ft = ["finetune", "--task", "keyword", "--out", train[train.index("--out") + 1]]
    kinds = {"task": field_types(TaskConfig), "train": {k: field_types(TrainConfig)[k] for k in TRAIN_DEFAULTS}}
    for section, types_ in kinds.items():
        for name, tp in types_.items():
            args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if args[0] in wrong and name != "seed":
                cases.append((ft + [f"--{name}", wrong[args[0]]], f"{section}.{name}"))
    # Numbers of the other commands (argparse's own check: one line naming the flag).
    run = train[train.index("--data") + 1].replace("text.txt", "run")
    for flag in ("--max_len", "--max_new_tokens", "--seed", "--temperature", "--top_k", "--top_p"):
        cases.append((["generate", run, flag, "twelve"], flag))
    for flag in ("--batch_size", "--tokens", "--limit", "--num_fewshot"):
        cases.append((["eval", run, flag, "twelve"], flag))
    return cases


N_CASES = 266


def test_the_catalogue_is_complete():
    assert len(_cases(Path("ws"))) == N_CASES >= 100  # every case below is one parametrised test


@pytest.mark.parametrize("i", range(N_CASES))
def test_bad_input(ws, capsys, i):
    argv, needle = _cases(ws)[i]
    before = _snapshot(ws)
    res = cli_in_process(capsys, *argv)
    assert_user_error(res, needle)
    assert _snapshot(ws) == before, argv  # nothing created, nothing changed


def test_a_huge_context_is_not_allocated_by_generate(ws, capsys):
    """A checkpoint whose context_len is 10⁹ decodes a few tokens: the KV cache holds what the call needs
    (prompt + new tokens), not the context (which would be ≈ 250 GB here and fail to allocate)."""
    _crafted(ws / "run" / "step-2", ws / "long" / "step-2", {"context_len": 10**9})
    res = cli_in_process(capsys, "generate", str(ws / "long"), "--prompt", "The", "--max_new_tokens", "5",
                         "--seed", "0")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The") and len(res.stdout) >= len("The") + 5


# --- fuzz: whatever a checkpoint's config.json or safetensors header says, loading it is quick and either
# works or is one checkpoint error (a size the machine cannot hold is refused before it is allocated) -------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_SIZES = st.one_of(st.integers(-3, 4), st.integers(1, 64), st.integers(10**6, 10**15),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4), st.none())


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(change=st.dictionaries(st.sampled_from(["vocab_size", "d_model", "n_layer", "n_head", "context_len",
                                               "span_max", "dyn_rank", "mlp", "span"]), _SIZES, max_size=3))
def test_fuzz_checkpoint_config(ws, change):
    import shutil

    from dynaformer.errors import DynaformerError
    from dynaformer.runs import load_model

    target = ws / "fuzz"
    shutil.rmtree(target, ignore_errors=True)
    _crafted(ws / "run" / "step-2", target / "step-2", change)
    try:
        model, _, _ = load_model(target)
    except DynaformerError:
        return
    assert model.num_params() < 10**7  # loaded: it is the small model the weights describe


@settings(max_examples=40, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(0, 2**40), min_size=0, max_size=3), dtype=st.sampled_from(["F32", "F16", "I64",
                                                                                             "X9"]))
def test_fuzz_safetensors_header(ws, shape, dtype):
    """A header that lies about a tensor's shape or type: refused without reading gigabytes."""
    import shutil
    import struct

    from dynaformer.errors import DynaformerError
    from dynaformer.runs import load_model
    from dynaformer.train.checkpoint import _sha256

    target = ws / "fuzzh" / "step-2"
    shutil.rmtree(ws / "fuzzh", ignore_errors=True)
    shutil.copytree(ws / "run" / "step-2", target)
    path = target / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    from hypothesis import assume

    assume(shape != header[name]["shape"] or dtype != header[name]["dtype"])  # a lie, not the truth
    header[name] = {**header[name], "shape": shape, "dtype": dtype}
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = _sha256(path)
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DynaformerError):
        load_model(ws / "fuzzh")
