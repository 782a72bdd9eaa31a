"""The command line as a user meets it: each bad input is one line on stderr with exit code 2 and
leaves nothing behind; Ctrl-C saves a checkpoint; train → eval → generate works end to end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import ROOT, run_cli, shared_dir
from .conftest import assert_user_error as _assert_user_error
from .conftest import cli_in_process as _run_in_process

TINY = ["--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "32", "--batch_size", "4",
        "--eval_tokens", "256", "--progress_bar", "false"]




@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A 20-step run trained by the CLI in its own process, as a user starts it (built once per session)."""

    def build(tmp: Path) -> None:
        from dynaformer.data.corpus import generated_stories

        data = tmp / "text.txt"
        data.write_text(generated_stories(30_000))
        res = run_cli("train", *TINY, "--data", str(data), "--out", str(tmp / "run"), "--max_steps", "20",
                      "--tokenizer", "char", "--log_interval", "10")
        assert res.returncode == 0, res.stderr
        assert "step     10/20 | loss" in res.stdout and "done: step 20" in res.stdout

    return shared_dir(tmp_path_factory, "cli-run", build) / "run"


def test_train_outputs(trained_run):
    records = [json.loads(ln) for ln in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "elapsed_s", "loss", "tok_s", "ms_step"} <= set(records[0])
    assert any("val_loss" in r for r in records)
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed)
    info = json.loads((trained_run / "run.json").read_text())
    assert info["tokenizer"] == "char" and info["env"]["torch"]


def test_eval_and_generate(trained_run, capsys):
    res = _run_in_process(capsys, "eval", str(trained_run), "--json")
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)
    assert result["loss"] > 0 and result["bpb"] > 0 and result["tokens"] > 0
    res = _run_in_process(capsys, "generate", str(trained_run), "--prompt", "Ada went", "--max_new_tokens", "40",
                          "--seed", "1")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Ada went") and len(res.stdout) >= 40
    res2 = _run_in_process(capsys, "generate", str(trained_run), "--prompt", "Ada went", "--max_new_tokens", "40",
                           "--seed", "1", "--no_cache")
    assert res2.stdout == res.stdout


def test_help_on_each_verb(capsys):
    for verb in ("train", "eval", "generate", "bench"):
        res = _run_in_process(capsys, verb, "--help")
        assert res.returncode == 0 and "usage:" in res.stdout


def test_top_level_help_and_version(capsys):
    import platform

    import torch

    from dynaformer import __version__

    res = _run_in_process(capsys, "--help")
    assert res.returncode == 0 and "attention span" in res.stdout and "examples:" in res.stdout
    for verb in ("train", "compare", "report", "generate", "export-hf"):
        assert verb in res.stdout
    res = _run_in_process(capsys, "--version")
    assert res.returncode == 0
    want = f"dynaformer {__version__} (torch {torch.__version__}, Python {platform.python_version()})"
    assert res.stdout.strip() == want




def test_bad_train_inputs(tmp_path, text_file, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    small = tmp_path / "small.txt"
    small.write_text("hello world")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model:\n  n_layers: 4\n")
    out = tmp_path / "out"
    cases = [
        (["--data", str(tmp_path / "missing.txt")], "does not exist"),
        (["--data", str(empty)], "is empty"),
        (["--data", str(small)], "context_len + 1"),
        (["--config", str(bad_yaml)], "n_layers"),
        (["--lr", "-1"], "train.lr"),
        (["--n_head", "3"], "n_head"),
        (["--context_len", "0"], "context_len"),
        (["--batch_size", "two"], "batch_size"),
        (["--tokenizer", "bpe9"], "tokenizer"),
        (["--no_such_flag", "1"], "no_such_flag"),
        (["--config", str(tmp_path / "nope.yaml")], "nope.yaml"),
        # Non-finite numbers and out-of-range integers never reach training.
        (["--lr", "inf"], "train.lr: must be a finite number"),
        (["--weight_decay", "nan"], "train.weight_decay: must be a finite number"),
        (["--grad_clip", "nan"], "train.grad_clip: must be a finite number"),
        (["--init_std", "inf"], "model.init_std: must be a finite number"),
        (["--norm_eps", "nan"], "model.norm_eps: must be a finite number"),
        (["--rope_base", "inf"], "model.rope_base: must be a finite number"),
        (["--seed", "1e23"], "train.seed"),
        # --resume: none, auto, restart or a checkpoint folder; anything else was silently a fresh run.
        (["--resume", "yes-please"], "train.resume"),
        (["--resume", str(tmp_path / "no_such_run" / "step-3")], "train.resume"),
    ]
    for extra, needle in cases:
        res = _run_in_process(capsys, "train", *TINY, "--data", str(text_file), "--out", str(out), *extra)
        _assert_user_error(res, needle)
        assert not out.exists(), extra


def test_resume_from_a_checkpoint_of_another_shape(trained_run, tmp_path, text_file, capsys):
    ckpt = sorted(trained_run.glob("step-*"))[-1]
    out = tmp_path / "other"
    res = _run_in_process(capsys, "train", *TINY, "--d_model", "48", "--data", str(text_file), "--out", str(out),
                          "--tokenizer", "char", "--max_steps", "30", "--resume", str(ckpt))
    _assert_user_error(res, "is a checkpoint of another run folder")
    assert not out.exists()


def test_existing_run_with_other_config(trained_run, capsys):
    before = sorted(p.name for p in trained_run.iterdir())
    res = _run_in_process(capsys, "train", *TINY, "--out", str(trained_run), "--max_steps", "30", "--tokenizer", "char")
    _assert_user_error(res, "different config")
    assert sorted(p.name for p in trained_run.iterdir()) == before


def test_bad_checkpoint_and_prompt(trained_run, tmp_path, capsys):
    res = _run_in_process(capsys, "generate", str(trained_run), "--prompt", "a" * 40, "--max_new_tokens", "1")
    _assert_user_error(res, "prompt has 40 tokens")
    not_ours = tmp_path / "step-5"
    not_ours.mkdir()
    (not_ours / "model.safetensors").write_bytes(b"garbage")
    _assert_user_error(_run_in_process(capsys, "eval", str(not_ours)), "not a dynaformer checkpoint")
    (tmp_path / "empty_run").mkdir()
    _assert_user_error(_run_in_process(capsys, "eval", str(tmp_path / "empty_run")), "no complete checkpoint")
    _assert_user_error(_run_in_process(capsys, "eval", str(tmp_path / "missing")), "does not exist")


def test_ctrl_c_saves_and_resumes(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "dynaformer.cli", "train", *TINY, "--data", str(text_file), "--out", str(out),
           "--max_steps", "400", "--log_interval", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    ckpts = sorted(out.glob("step-*"))
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("-")[1])
    assert 0 < step < 400
    res = _run_in_process(capsys, "train", *TINY, "--data", str(text_file), "--out", str(out), "--max_steps", "400",
                          "--log_interval", "5", "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert f"resumed from {ckpts[0]} (step {step})" in res.stderr
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 400 and steps == sorted(steps)


def test_bench_prints_json_lines(capsys):
    res = _run_in_process(capsys, "bench", "generate", "--config", "tiny-cpu", "--prompt_len", "4", "--new_tokens", "4",
                          "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert {"cached_tok_s", "uncached_tok_s", "cache_speedup"} <= set(record)
    res = _run_in_process(capsys, "bench", "train", "--config", "tiny-cpu", "--batch_size", "2", "--context", "16",
                          "--steps", "1", "--json")
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert record["fp32_ms"] > 0 and record["bf16_ms"] > 0


@pytest.mark.parametrize("extra", [[], ["--encoder"]])
def test_bench_attention_reports_the_issue_fields(extra, capsys):
    res = _run_in_process(capsys, "bench", "attention", "--seq", "300", "--span", "40", "--repeats", "1", "--json",
                          *extra)
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert record["dense_ms"] > 0 and record["span_ms"] > 0
    assert record["speedup"] == pytest.approx(record["dense_ms"] / record["span_ms"], rel=0.01)


@pytest.mark.slow
def test_readme_commands_without_shared_data(tmp_path):
    """The README's two main commands from a fresh clone with nothing beside it, as a user gets them: the
    experiment (on a seconds-long grid) and the quickstart. They reuse this interpreter's environment."""
    import os

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    for f in ("scripts/experiment.sh", "scripts/quickstart.sh", "tests/fixtures/grid-tiny.yaml", "pyproject.toml"):
        (clone / f).parent.mkdir(parents=True, exist_ok=True)
        (clone / f).write_bytes((ROOT / f).read_bytes())  # the working tree's version, committed or not
    # This interpreter's environment as it is: a reinstall would point its editable install at the clone.
    env = {**os.environ, "DYNAFORMER_VENV": sys.prefix, "DYNAFORMER_NO_INSTALL": "1"}
    # WORKERS=0: the script's compare trains the 12 cells in its own process instead of 12 new ones (≈ 4 s of
    # start-up each; cell processes are tested in test_grid.py).
    res = subprocess.run(["bash", "scripts/experiment.sh", "tests/fixtures/grid-tiny.yaml", "runs/e"], cwd=clone,
                         env={**env, "WORKERS": "0"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads((clone / "runs/e/report/report.json").read_text())
    assert len(data["verdicts"]) == 10 and data["cost"]["lengths"] == [128, 256]
    meta = json.loads((clone / "runs/e/cells/baseline/seed0/run/data/meta.json").read_text())
    assert "text: builtin:default (tiny-shakespeare, packaged" in meta["source"]
    res = subprocess.run(["bash", "scripts/quickstart.sh", "runs/q"], cwd=clone, env={**env, "QUICKSTART_STEPS": "60"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (clone / "runs/q/sample.txt").read_text().startswith("The ")


def test_the_disk_full_line_names_resume_only_for_training(monkeypatch, capsys):
    """ENOSPC anywhere in a command is one line, exit 2; only train and finetune are told about --resume auto."""
    import errno

    from dynaformer import cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/x/out")

    for command, resume in (("export-hf", False), ("train", True)):
        parser = cli.make_parser()
        real = parser.parse_args

        def parse(argv, real=real, command=command):
            ns = real(["eval", "r"])
            ns.command, ns.func = command, full
            return ns

        monkeypatch.setattr(parser, "parse_args", parse)
        monkeypatch.setattr(cli, "make_parser", lambda parser=parser: parser)
        assert cli.main([command]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the disk is full writing '/x/out'" in err[0]
        assert ("--resume auto" in err[0]) == resume, err


def test_a_vocab_size_the_tokenizer_overrides_is_said(tmp_path, capsys):
    """--vocab_size with a char tokenizer: the tokenizer decides the vocabulary, and the command says so."""
    data = tmp_path / "t.txt"
    data.write_text("abcab cab bca " * 300)
    res = _run_in_process(capsys, "train", "--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "32",
                         "--batch_size", "2", "--max_steps", "1", "--eval_tokens", "64", "--progress_bar", "false",
                         "--tokenizer", "char", "--vocab_size", "77", "--data", str(data), "--out", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr
    assert "--vocab_size 77 is not used: the char tokenizer gives this model 4 tokens" in res.stderr
