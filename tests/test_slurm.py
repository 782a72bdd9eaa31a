"""`compare --launcher slurm`. Everywhere: no sbatch on PATH and SLURM's refusal are one line with nothing written,
the arrays' dependency plan, the scripts and the resubmission of only what is neither done nor queued (against
stand-in sbatch/squeue commands), and `compare DIR --status` read from the folder alone. Marked slow, on a real
single-node SLURM started for the test (tests/slurm_local.py; skipped with the reason where it cannot start): a
tiny grid with a cancelled and a preempted task, the fixed window after its span cell, the report; SLURM's own
refusals; and the multi-node training template as a 2-process gloo job resumed from its DCP checkpoint."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from dynaformer.study.grid import grid_from_dict
from dynaformer.study.slurm import plan
from dynaformer.train.metrics import read_metrics

from .conftest import ROOT, assert_user_error, cli_in_process
from .slurm_local import LocalSlurm, unavailable

# The fixture grid (tests/fixtures/grid-tiny.yaml) cut to the span question's three cells; long enough to stop a
# cell between two checkpoints.
GRID = yaml.safe_load((ROOT / "tests" / "fixtures" / "grid-tiny.yaml").read_text())
GRID.update(seeds=1, variants={k: GRID["variants"][k] for k in ("baseline", "dyn_span", "fixed_window")},
            questions={"reference": "baseline", "span": "dyn_span", "controls": {"span": ["fixed_window"]}})
GRID["train"].update(max_steps=400, ckpt_interval=20, log_interval=20, eval_interval=400)
KEYS = ["baseline/seed0", "dyn_span/seed0", "fixed_window/seed0"]


def _grid_file(tmp_path: Path, **train) -> Path:
    g = json.loads(json.dumps(GRID))
    g["train"].update(train)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(g))
    return path


def _listing(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def _fake(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/bash\necho \"{name} $*\" >> {bin_dir / 'calls'}\n{body}\n")
    (bin_dir / name).chmod(0o755)


# --- everywhere ----------------------------------------------------------------------------------------------

def test_no_sbatch_on_path_is_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    res = cli_in_process(capsys, "compare", str(_grid_file(tmp_path)), "--out", str(tmp_path / "out"),
                         "--launcher", "slurm")
    assert_user_error(res, "sbatch is not on PATH")
    assert not (tmp_path / "out").exists()


def test_slurm_refusal_is_its_own_line_and_nothing_is_submitted(tmp_path, monkeypatch, capsys):
    _fake(tmp_path / "bin", "sbatch", 'echo "sbatch: error: invalid partition specified: nope" >&2\n'
                                      'echo "allocation failure: Invalid partition name specified" >&2\nexit 1')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _listing(out)
    res = cli_in_process(capsys, "compare", str(_grid_file(tmp_path)), "--out", str(out), "--launcher", "slurm",
                         "--partition", "nope")
    assert_user_error(res, "sbatch: error: invalid partition specified: nope")
    assert _listing(out) == before
    calls = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert calls == ["sbatch --test-only"]  # asked, never submitted


def test_submission_plan_scripts_and_resubmission(tmp_path, monkeypatch, capsys):
    """Against stand-in sbatch and squeue: the span cell's array first, the fixed window at the same index of a
    second array that waits on it; a rerun submits only the cells that are neither done nor queued."""
    bin_dir = tmp_path / "bin"
    _fake(bin_dir, "sbatch", f'[ "$1" = --test-only ] && exit 0\nn=$(grep -c "^sbatch --parsable" {bin_dir / "calls"})'
                             '\necho $((100 + n))')
    _fake(bin_dir, "squeue", f'cat {bin_dir / "queue"} 2>/dev/null; exit 0')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    out, grid = tmp_path / "out", _grid_file(tmp_path)
    args = ["compare", str(grid), "--out", str(out), "--launcher", "slurm", "--json", "--partition", "gpu",
            "--time", "1:00:00", "--mem_per_cell", "4G", "--max_parallel", "2", "--sbatch_line=--qos=low"]
    res = cli_in_process(capsys, *args)
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["submitted"] == {"baseline/seed0": "101_0", "dyn_span/seed0": "101_1", "fixed_window/seed0": "102_1"}
    arrays = json.loads((out / "slurm" / "submitted.json").read_text())["arrays"]
    assert [(a["job"], a["dependency"], a["cells"]) for a in arrays] == [
        ("101", None, {"0": "baseline/seed0", "1": "dyn_span/seed0"}), ("102", "101", {"1": "fixed_window/seed0"})]
    calls = (bin_dir / "calls").read_text().splitlines()
    assert calls[-1] == (f"sbatch --parsable --dependency=aftercorr:101 --kill-on-invalid-dep=yes "
                         f"{out.resolve() / 'slurm' / 'array-1.sbatch'}")
    script = (out / "slurm" / "array-0.sbatch").read_text()
    for line in ("#SBATCH --array=0,1%2", "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00", "#SBATCH --mem=4G",
                 "#SBATCH --qos=low", "#SBATCH --signal=B:USR1@120", "#SBATCH --requeue"):
        assert line in script.splitlines(), line
    manifest = json.loads((out / "slurm" / "array-1.json").read_text())
    assert manifest["cells"] == {"1": "cells/fixed_window/seed0"} and manifest["out"] == str(out.resolve())

    # baseline finished, the span cell is still queued (its dependent too): nothing to submit
    (out / "cells" / "baseline" / "seed0" / "result.json").write_text("{}")
    (bin_dir / "queue").write_text("101|1\n102|1\n")
    rep = json.loads(cli_in_process(capsys, *args).stdout)
    assert rep["submitted"] == {} and rep["queued"] == {"dyn_span/seed0": "101_1", "fixed_window/seed0": "102_1"}
    # the span cell left the queue without a result, its dependent was killed with it: both go again, in order
    (bin_dir / "queue").write_text("")
    rep = json.loads(cli_in_process(capsys, *args).stdout)
    assert rep["submitted"] == {"dyn_span/seed0": "103_0", "fixed_window/seed0": "104_0"}
    assert json.loads((out / "slurm" / "submitted.json").read_text())["arrays"][-1]["dependency"] == "103"
    assert (out / "slurm" / "array-3.sbatch").is_file()


def test_plan_puts_each_dependent_at_its_inputs_index(tmp_path):
    g = json.loads(json.dumps(GRID))
    g["variants"]["window2"] = {"span": "fixed", "match_reach": "dyn_span"}  # a second control of the same cell
    g["seeds"] = 2
    grid = grid_from_dict(g)
    cells = grid.cells()
    out = tmp_path / "out"
    arrays, held = plan(out, cells, list(cells), {})
    assert not held
    first = {c.key: i for i, c in arrays[0].cells.items()}
    assert set(first) == {"baseline/seed0", "baseline/seed1", "dyn_span/seed0", "dyn_span/seed1"}
    later = [(a.after, {i: c.key for i, c in a.cells.items()}) for a in arrays[1:]]
    for variant in ("fixed_window", "window2"):  # one array each: both need the same span cells
        assert (0, {first[f"dyn_span/seed{s}"]: f"{variant}/seed{s}" for s in (0, 1)}) in later
    assert len(later) == 2
    # an input already done: the dependent goes in the first array; one queued earlier: wait on that job's task
    done = out / "cells" / "dyn_span" / "seed0"
    done.mkdir(parents=True)
    (done / "result.json").write_text("{}")
    pending = [c for c in cells if c.key in ("fixed_window/seed0", "fixed_window/seed1")]
    arrays, held = plan(out, cells, pending, {"dyn_span/seed1": "77_5"})
    assert [(a.after, {i: c.key for i, c in a.cells.items()}) for a in arrays] == [
        (None, {0: "fixed_window/seed0"}), ("77", {5: "fixed_window/seed1"})]
    # an input that is neither done, nor queued, nor submitted now: held back
    arrays, held = plan(out, cells, [c for c in cells if c.key == "fixed_window/seed1"], {})
    assert arrays == [] and held == ["fixed_window/seed1"]


def test_status_is_read_from_the_folder(tmp_path, capsys):
    from dynaformer.study.folder import prepare

    out = tmp_path / "out"
    prepare(grid_from_dict(GRID), out, False)
    cells = out / "cells"
    (cells / "baseline" / "seed0" / "result.json").write_text("{}")
    (cells / "dyn_span" / "seed0" / "run").mkdir()
    (cells / "dyn_span" / "seed0" / "run" / "metrics.jsonl").write_text('{"step": 40, "loss": 1.0}\n')
    (cells / "fixed_window" / "seed0" / "slurm.json").write_text(json.dumps(
        {"runs": [{"job": "9_1", "host": "h", "pid": 1, "start": 0, "end": 1, "exit": 1, "requeued": False}]}))
    res = cli_in_process(capsys, "compare", str(out), "--status", "--json")
    assert res.returncode == 0, res.stderr
    st = json.loads(res.stdout)
    assert [(r["cell"], r["state"], r["step"]) for r in st["cells"]] == [
        ("baseline/seed0", "done", 400), ("dyn_span/seed0", "stopped", 40), ("fixed_window/seed0", "failed", 0)]
    assert st["cells"][2]["job"] == "9_1" and st["counts"]["done"] == 1
    (cells / "dyn_span" / "seed0" / ".lock").write_text("h:1")
    lines = cli_in_process(capsys, "compare", str(out), "--status").stdout.splitlines()
    assert re.match(r"dyn_span/seed0\s+running\s+40/400 steps$", lines[1]), lines
    assert lines[-1].endswith("1 done, 1 running, 0 stopped, 1 failed, 0 waiting")
    assert_user_error(cli_in_process(capsys, "compare", str(tmp_path), "--status"), "not a compare folder")


def test_task_takes_over_its_previous_runs_locks_only(tmp_path, monkeypatch):
    """A task's cell left locked by the cell's previous SLURM run (a node that died) is taken over, on any host;
    a lock held by anyone else is respected; a done cell is not run again."""
    from dynaformer.locks import hostname
    from dynaformer.study import slurm_task
    from dynaformer.study.folder import prepare

    out = tmp_path / "out"
    prepare(grid_from_dict(GRID), out, False)
    manifest = tmp_path / "array-0.json"
    manifest.write_text(json.dumps({"out": str(out), "nproc_per_cell": 1,
                                    "cells": {"0": "cells/baseline/seed0", "3": "cells/dyn_span/seed0"}}))
    ran = []

    def fake_cell(d, nproc, distributed):  # the cell process: write its result
        ran.append(d.name if d.name != "seed0" else d.parent.name)
        return [sys.executable, "-c", f"open({str(d / 'result.json')!r}, 'w').write('{{}}')"]

    monkeypatch.setattr(slurm_task, "process_command", fake_cell)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    cell = out / "cells" / "baseline" / "seed0"
    (cell / "run").mkdir()
    (cell / "slurm.json").write_text(json.dumps({"runs": [{"job": "11_0", "host": "deadnode", "pid": 7,
                                                            "child": 8, "start": 0}]}))
    (cell / ".lock").write_text("deadnode:7")
    (cell / "run" / ".lock").write_text("deadnode:8")
    assert slurm_task.run_task(manifest, 0) == 0 and ran == ["baseline"]
    assert not (cell / ".lock").exists() and not (cell / "run" / ".lock").exists()
    runs = json.loads((cell / "slurm.json").read_text())["runs"]
    assert [(r["job"], r["host"], r.get("exit")) for r in runs] == [("11_0", "deadnode", None),
                                                                     ("12_0", hostname(), 0)]
    assert slurm_task.run_task(manifest, 0) == 0 and ran == ["baseline"]  # done: not run again
    other = out / "cells" / "dyn_span" / "seed0"
    (other / ".lock").write_text("elsewhere:99")  # a compare without the scheduler holds it
    assert slurm_task.run_task(manifest, 3) == 1 and ran == ["baseline"]
    assert (other / ".lock").read_text() == "elsewhere:99"
    assert slurm_task.main([str(manifest), "5"]) == 2  # not in the array


# --- on a real single-node SLURM -----------------------------------------------------------------------------

def _wait(cond, timeout_s: float, what: str):
    t0 = time.monotonic()
    while not (got := cond()):
        if time.monotonic() - t0 > timeout_s:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)
    return got


@pytest.fixture
def slurm(tmp_path_factory):
    """A single-node SLURM in its own folder under /tmp (munged must reach it, which pytest's 0700 basetemp
    does not allow), one at a time per machine; stopped and removed afterwards."""
    why = unavailable()
    if why:
        pytest.skip(why)
    lock_path = tmp_path_factory.getbasetemp().parent / "local-slurm.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        base = Path(tempfile.mkdtemp(prefix="dynaformer-slurm-"))
        cluster = LocalSlurm(base)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.stop()
            shutil.rmtree(base, ignore_errors=True)


def _env(slurm, monkeypatch) -> None:
    for k, v in slurm.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DYNAFORMER_NATIVE", "0")  # no compiled kernel build inside the cells: this tests the launcher
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH"))
                                                     if p))


def _task_state(slurm, job: str) -> str | None:
    for line in slurm.queue():
        if line.split()[0] == job:
            return line.split(None, 1)[1]
    return None


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}


def _restarts(slurm, job: str) -> int:
    """How many times SLURM requeued this job (array task) so far."""
    text = slurm.run("scontrol", "show", "job", "--oneliner", job, check=False).stdout
    return int(m.group(1)) if (m := re.search(r"Restarts=(\d+)", text)) else 0


def _ended(slurm, *jobs: str) -> bool:
    """Every task of these jobs has ended for good (scontrol keeps ended jobs for MinJobAge, 600 s here)."""
    for job in jobs:
        text = slurm.run("scontrol", "show", "job", "--oneliner", job, check=False).stdout
        states = re.findall(r"JobState=(\S+)", text)
        if not states or not set(states) <= FINAL:
            return False
    return True


def _why(slurm, *jobs: str) -> str:
    """What SLURM says of these jobs and the tails of its daemons' logs, for a failing assertion."""
    logs = slurm.base / "slurm" / "log"
    parts = [slurm.run("scontrol", "show", "job", "--oneliner", j, check=False).stdout for j in jobs]
    parts += [f"--- {f.name}\n" + f.read_text(errors="ignore")[-4000:] for f in sorted(logs.glob("*.log"))]
    return "\n".join(parts)


def _runs(cell: Path) -> list[dict]:
    return json.loads((cell / "slurm.json").read_text())["runs"]


def _cell_logs(cells: dict[str, Path]) -> str:
    return "".join(f"\n--- {k}\n" + ((c / "cell.log").read_text(errors="ignore")[-1500:] if (c / "cell.log").exists()
                                      else "(no cell.log)") for k, c in cells.items())


def _stop_step(log: str) -> int:
    return int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", log).group(1))


@pytest.mark.slow
def test_grid_on_a_real_slurm(slurm, tmp_path, monkeypatch, capsys):
    _env(slurm, monkeypatch)
    grid, out = _grid_file(tmp_path), tmp_path / "out"
    base = ["compare", str(grid), "--out", str(out), "--launcher", "slurm", "--time", "20", "--signal_s", "60"]

    # SLURM's own refusals: one line each, nothing submitted, the folder as it was
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _listing(out)
    for bad, says in ((["--partition", "nope"], "invalid partition specified: nope"),
                      (["--mem_per_cell", "999999G"], "Requested node configuration is not available"),
                      (["--sbatch_line=--no-such-option"], "unrecognized option")):
        assert_user_error(cli_in_process(capsys, *base, *bad), says)
        assert _listing(out) == before and slurm.queue() == []
    (out / "notes.txt").unlink()

    res = cli_in_process(capsys, *base, "--json")
    assert res.returncode == 0, res.stderr
    jobs = json.loads(res.stdout)["submitted"]
    assert sorted(jobs) == KEYS
    cells = {k: out / "cells" / k for k in KEYS}
    # the fixed window waits in the scheduler for the span cell of its seed (same index, second array)
    assert jobs["fixed_window/seed0"].split("_")[1] == jobs["dyn_span/seed0"].split("_")[1]
    _wait(lambda: _task_state(slurm, jobs["fixed_window/seed0"]) == "PENDING Dependency", 30, "the dependency")

    # once each has a checkpoint: cancel the baseline, preempt the span cell (SIGUSR1, as --signal sends it)
    for k in ("baseline/seed0", "dyn_span/seed0"):
        _wait(lambda k=k: any((cells[k] / "run").glob("step-*")), 120, f"a checkpoint of {k}")
    slurm.run("scancel", jobs["baseline/seed0"])
    slurm.run("scancel", "--batch", "--signal=USR1", jobs["dyn_span/seed0"])
    # requeued: it starts again once its old credential expired (6 s here); starting it sooner fails the task
    _wait(lambda: _restarts(slurm, jobs["dyn_span/seed0"]) == 1, 60, "the requeue")
    _wait(lambda: _task_state(slurm, jobs["baseline/seed0"]) is None, 60, "the cancelled task to leave")
    assert not (cells["baseline/seed0"] / "result.json").exists()
    assert _task_state(slurm, jobs["fixed_window/seed0"]) == "PENDING Dependency", (
        _why(slurm, *jobs.values()) + _cell_logs(cells))

    # the rerun submits the cancelled cell alone; the others are queued
    rep = json.loads(cli_in_process(capsys, *base, "--json").stdout)
    assert list(rep["submitted"]) == ["baseline/seed0"], _why(slurm, jobs["dyn_span/seed0"]) + _cell_logs(cells)
    assert sorted(rep["queued"]) == ["dyn_span/seed0", "fixed_window/seed0"]
    all_jobs = {j.split("_")[0] for j in [*jobs.values(), *rep["submitted"].values()]}
    _wait(lambda: _ended(slurm, *all_jobs), 300, "the grid to finish")

    for k, cell in cells.items():
        assert (cell / "result.json").is_file(), (cell / "cell.log").read_text()[-2000:]
        runs = _runs(cell)
        assert [r["exit"] for r in runs] == ([0] if k == "fixed_window/seed0" else [130, 0]), runs
        steps = [r["step"] for r in read_metrics(cell / "run" / "metrics.jsonl") if "loss" in r]
        assert steps == list(range(20, 401, 20)), k  # every step trained once
    for k in ("baseline/seed0", "dyn_span/seed0"):  # stopped at a checkpoint, finished from it
        log = (cells[k] / "cell.log").read_text()
        n = _stop_step(log)
        assert f"resumed from {cells[k] / 'run' / f'step-{n}'} (step {n})" in log
    assert _runs(cells["dyn_span/seed0"])[0]["requeued"]
    assert _runs(cells["fixed_window/seed0"])[0]["start"] >= _runs(cells["dyn_span/seed0"])[-1]["end"]
    fixed = json.loads((cells["fixed_window/seed0"] / "result.json").read_text())
    assert fixed["model"]["span_window"] == fixed["matched_window"]["window"]

    st = json.loads(cli_in_process(capsys, "compare", str(out), "--status", "--json").stdout)
    assert st["counts"]["done"] == 3
    res = cli_in_process(capsys, "report", str(out), "--no_cost")
    assert res.returncode == 0, res.stderr
    assert (out / "report" / "report.md").is_file()


@pytest.mark.slow
def test_multinode_template_resumes_from_its_dcp_checkpoint(slurm, tmp_path, monkeypatch):
    """scripts/slurm-train.sbatch on one node with 2 gloo processes: SIGUSR1 (as --signal sends it) stops both
    ranks at a DCP checkpoint, the job requeues itself and resumes from it."""
    _env(slurm, monkeypatch)
    run = tmp_path / "run"
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    monkeypatch.setenv("PYTHON", sys.executable)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    job = slurm.run("sbatch", "--parsable", "--nodes=1", "--cpus-per-task=2", f"--output={tmp_path}/%j.log",
                    str(ROOT / "scripts" / "slurm-train.sbatch"), "--n_layer", "2", "--n_head", "2",
                    "--d_model", "32", "--context_len", "32", "--batch_size", "4", "--max_steps", "300",
                    "--ckpt_interval", "20", "--log_interval", "20", "--eval_interval", "300",
                    "--eval_tokens", "512", "--progress_bar", "false", "--threads", "1",
                    "--data", "builtin:default", "--out", str(run)).stdout.strip()
    _wait(lambda: any(run.glob("step-*/dcp/.metadata")), 120, "a DCP checkpoint")
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    _wait(lambda: _restarts(slurm, job) == 1, 60, "the requeue")
    _wait(lambda: _ended(slurm, job), 240, "the job to finish")
    log = (tmp_path / f"{job}.log").read_text()
    assert "JobState=COMPLETED" in slurm.run("scontrol", "show", "job", job).stdout, log[-3000:] + _why(slurm, job)
    n = _stop_step(log)
    assert log.count(f"stopped by SIGTERM at step {n}; checkpoint saved") == 2  # both ranks, one step
    assert f"resumed from {run / f'step-{n}'} (step {n})" in log, log[-3000:]
    assert (run / "step-300" / "dcp" / ".metadata").is_file()
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(20, 301, 20))
