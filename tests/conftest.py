"""Shared fixtures. `MATRIX` lists every (residual kind, span kind) pair the config accepts (`MATRIX_PAIRS` as plain
tuples), so parity and cache tests cover each mechanism as soon as it is added to `ModelConfig`.

The suite runs on parallel workers (pytest-xdist, `-n auto` in pyproject.toml). Tests share no mutable state:
each writes under its own `tmp_path`; what several tests read (a trained run, a trained grid) is built once per
session by `shared_dir`, whichever worker asks first, and only ever copied, never changed. Tests marked `slow`
are deselected unless `--slow` (or an explicit `-m`) is given; `.ci/run` gives it."""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

import pytest
import torch

from dynaformer.data.corpus import generated_stories
from dynaformer.model import ModelConfig, Transformer
from dynaformer.model.config import ResidualKind, SpanKind
from dynaformer.model.span import causal_only

RESIDUALS = list(get_args(ResidualKind))
SPANS = list(get_args(SpanKind))
MATRIX_PAIRS = list(itertools.product(RESIDUALS, SPANS))
# The relatives (docs/mechanisms.md) cross the other axis's plain kind and its seed mechanism in the default loop;
# their other pairs (a relative with every control kind, two relatives together) are marked slow, which CI runs,
# so the loop's time does not grow with the product of the two lists.
RELATIVES = {"hyper", "hyper_static", "mhc", "attnres", "fox", "sink_window"}
_FAST_PARTNERS = {"prenorm", "none", "dynamic"}


def _in_default_loop(residual: str, span: str) -> bool:
    return (residual not in RELATIVES and span not in RELATIVES) or bool(
        (residual in RELATIVES) != (span in RELATIVES) and ({residual, span} & _FAST_PARTNERS))


MATRIX = [pytest.param(r, s, marks=() if _in_default_loop(r, s) else pytest.mark.slow)
          for r, s in MATRIX_PAIRS]  # for @pytest.mark.parametrize("residual,span", MATRIX)
# The same split for a test that loops over the pairs itself (one costly setup for many kinds):
# @pytest.mark.parametrize("pairs", MATRIX_SETS) runs the default loop's pairs, and the others where slow tests run.
MATRIX_SETS = [pytest.param([p for p in MATRIX_PAIRS if _in_default_loop(*p)], id="default-pairs"),
               pytest.param([p for p in MATRIX_PAIRS if not _in_default_loop(*p)], id="other-pairs",
                            marks=pytest.mark.slow)]
ENCODER_SPANS = [s for s in SPANS if not causal_only(s)]  # fox and sink_window are causal mechanisms
ROOT = Path(__file__).resolve().parents[1]

# `dtype: auto` picks bf16 on CPUs where it pays; the suite's tolerances (DDP vs one process within 1e-5, ...)
# are fp32's, so every test and every CLI it starts trains in fp32 unless it sets this itself (tests/test_dtype.py).
os.environ.setdefault("DYNAFORMER_DTYPE_PROBE", "fp32")
# One thread in every process a test starts (the CLI's `threads: 0` is torch's default, which reads this): the
# workers already fill the cores, and a process whose threads wait for a busy core runs several times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (.ci/run does)")


def pytest_collection_modifyitems(config, items):
    """Deselect `slow` tests unless asked for, then start the tests that take longest first (each starts
    processes): with parallel workers, a long test begun last would finish alone."""
    if not config.getoption("--slow") and not config.option.markexpr:
        slow = [it for it in items if it.get_closest_marker("slow")]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [it for it in items if not it.get_closest_marker("slow")]
            config._dynaformer_slow_deselected = len(slow)
    first = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # Stable: the rest keep their order. The scheduler hands out one test at a time (--maxschedchunk 1 in
    # pyproject.toml), so these spread over the workers instead of queuing on the first.
    items.sort(key=lambda it: (not it.get_closest_marker("slow"), first.get(it.nodeid.split("[")[0], len(first))))


def pytest_terminal_summary(terminalreporter, config):
    n = getattr(config, "_dynaformer_slow_deselected", 0)
    if n:
        terminalreporter.write_line(f"{n} slow test(s) deselected; `--slow` runs them too (as .ci/run does)")


# The tests that take longest (5-20 s of CPU each on a 2-core AVX-512 machine), longest first, after any slow
# ones; `--durations` shows the current figures. A name no longer here is ignored.
LONGEST_FIRST = (
    "tests/test_lm_eval.py::test_lm_eval_chain_offline",
    "tests/test_distributed.py::test_fsdp_with_muon_matches_one_process_and_resumes",
    "tests/test_distributed.py::test_two_ranks_match_one_process",
    "tests/test_grid.py::test_encoder_pretraining_feeds_fine_tuning_across_workers",
    "tests/test_grid.py::test_two_hosts_share_one_grid",
    "tests/test_hf.py::test_export_loads_without_dynaformer",
    "tests/test_grid.py::test_two_compares_on_one_wall_clock_grid_agree",
    "tests/test_study.py::test_report_json_schema_and_rendering",
    "tests/test_data_fingerprint.py::test_clone_with_and_without_shared_trains_on_identical_data",
    "tests/test_grid.py::test_encoder_cells_run_resume_and_reach_the_report",
    "tests/test_faults.py::test_kill_9_ten_times_then_resume_matches",
    "tests/test_encoder.py::test_finetune_beats_chance",
    "tests/test_lm_eval.py::test_bundled_task_offline",
    "tests/test_grid.py::test_report_has_every_plot_and_full_verdict_table",
    "tests/test_residual.py::test_depth_48_layers",
)


def shared_dir(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder built by `build(folder)` once per test session and shared by every worker: the first to ask
    builds it under a file lock, the others wait and reuse it. Tests must treat it as read-only (copy it to
    change it)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each worker's own
    folder = base / f"shared-{name}"
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / f"shared-{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
            folder.mkdir()
            build(folder)
            (base / f"shared-{name}.done").touch()
    return folder


def output_and_grads(fn, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> list[torch.Tensor]:
    """[fn(), then the gradient of each input that requires one] for the loss <fn(), grad_out>."""
    for t in inputs:
        t.grad = None
    out = fn()
    out.backward(grad_out)
    return [out.detach()] + [t.grad.clone() for t in inputs if t.requires_grad]


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, context_len=32, n_layer=2, n_head=2, d_model=32)
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def trained_like(residual: str, span: str, **overrides) -> Transformer:
    """A tiny model in eval mode whose every parameter and buffer is off its initial value (mechanism gates start
    at 0, so a save/load or a cache that dropped them would go unnoticed on a fresh model)."""
    model = Transformer(tiny_config(residual=residual, span=span, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        model.progress.fill_(0.37)
    return model.eval()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tests compare floats exactly; keep reductions in one order
    yield


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text(generated_stories(40_000, seed=1))
    return p


def run_cli(*args: str, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a subprocess (as a user would) and capture its output."""
    return subprocess.run([sys.executable, "-m", "dynaformer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd or ROOT)


def cli_in_process(capsys, *argv: str) -> subprocess.CompletedProcess:
    """Same as run_cli, without paying for a new interpreter (the CLI's exit paths are the same)."""
    from dynaformer.cli import main

    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, rc, out.out, out.err)


def assert_user_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2 and exactly one line on stderr that names the problem; no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def interrupt_after(trainer, step: int, monkeypatch) -> None:
    """Make `trainer` behave as if Ctrl-C arrived during training step `step`."""
    train_step = trainer.train_step

    def stepping():
        out = train_step()
        if trainer.step == step:
            trainer._stop_signal = 2
        return out

    monkeypatch.setattr(trainer, "train_step", stepping)
