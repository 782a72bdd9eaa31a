"""`compare --launcher slurm`: a grid's pending cells submitted to SLURM as job arrays, one cell per array task.

    OUT/slurm/array-N.sbatch   a plain sbatch script (kept, so it can be read and resubmitted by hand)
    OUT/slurm/array-N.json     its task index → cell folder map, read by the task (study/slurm_task.py)
    OUT/slurm/submitted.json   every array submitted from OUT: job id, script, dependency, cells by index
    OUT/slurm/logs/J_I.log     each task's output (appended to by a requeued task)

Dependencies wait in the scheduler, never on the login node. Cells whose input cell (kinds.py `needs`: the
learned-span cell a matched fixed window reads, the pretraining cell a fine-tuning cell starts from) is done or
absent form the first array; a cell whose input is still to run goes into a later array at its input's task
index, submitted with `--dependency=aftercorr:JOB` (task i starts when task i of JOB succeeded) and
`--kill-on-invalid-dep=yes` (it leaves the queue when its input failed, and the next `compare` submits both).

Rerunning the same command submits only the cells that have no result and are not queued (squeue, for the
arrays that submitted.json names). Before anything is written, the script is checked with `sbatch --test-only`:
no sbatch, an unknown partition or an option SLURM rejects is SLURM's own message, and nothing is submitted.
Preemption: each task asks for SIGUSR1 `signal_s` seconds before its time limit; its cell then checkpoints, and
the task requeues itself (slurm_task.py).
"""

from __future__ import annotations

import getpass
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DynaformerError
from ..files import write_json_strict
from .folder import depends_on, prepare
from .grid import Cell, Grid


@dataclass
class SlurmOptions:
    """What each array task asks SLURM for (None: the site's default); `extra` are lines added to the script
    (`#SBATCH --qos=high`, or the option alone)."""

    partition: str | None = None
    account: str | None = None
    time: str | None = None  # the time limit of one cell's task (sbatch --time: "MM", "HH:MM:SS", "D-HH")
    cpus_per_cell: int | None = None
    gpus_per_cell: int | None = None
    mem_per_cell: str | None = None  # sbatch --mem, e.g. 16G
    max_parallel: int | None = None  # tasks of one array running at once (--array=...%N)
    signal_s: int = 120  # SIGUSR1 this long before the time limit: checkpoint and requeue (0: none)
    extra: list[str] = field(default_factory=list)

    def check(self) -> None:
        for name in ("cpus_per_cell", "gpus_per_cell", "max_parallel"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise DynaformerError(f"--{name}: must be ≥ 1, got {v}")
        if self.signal_s < 0:
            raise DynaformerError(f"--signal_s: must be ≥ 0, got {self.signal_s}")
        for line in self.extra:
            if "\n" in line:
                raise DynaformerError(f"--sbatch_line: one line each, got {line!r}")

    def lines(self) -> list[str]:
        """The #SBATCH lines of these options (the array, output and requeue lines are the script's own)."""
        opts = [f"--partition={self.partition}" if self.partition else None,
                f"--account={self.account}" if self.account else None,
                f"--time={self.time}" if self.time else None,
                f"--cpus-per-task={self.cpus_per_cell}" if self.cpus_per_cell else None,
                f"--gres=gpu:{self.gpus_per_cell}" if self.gpus_per_cell else None,
                f"--mem={self.mem_per_cell}" if self.mem_per_cell else None,
                f"--signal=B:USR1@{self.signal_s}" if self.signal_s else None]
        out = [f"#SBATCH {o}" for o in opts if o]
        for line in self.extra:
            line = line.strip()
            out.append(line if line.startswith("#SBATCH") else f"#SBATCH {line}")
        return out


@dataclass
class Array:
    """One job array to submit: task index → cell, and the array whose task of the same index each waits for."""

    cells: dict[int, Cell]
    after: int | str | None = None  # an Array's place in this submission, or the job id of an earlier one
    number: int = 0  # its N in array-N.sbatch
    job: str | None = None

    def spec(self) -> str:
        return ",".join(str(i) for i in sorted(self.cells))


def script(grid_name: str, out: Path, manifest: Path, indices: str, opts: SlurmOptions) -> str:
    """A plain sbatch script: each task runs `python -m dynaformer.study.slurm_task MANIFEST INDEX`."""
    parallel = f"%{opts.max_parallel}" if opts.max_parallel else ""
    lines = ["#!/bin/bash",
             f"# dynaformer compare {grid_name}: one grid cell per array task (the map: {manifest.name}).",
             "# Resubmit by hand with `sbatch THIS_FILE` (a task whose cell is done exits at once); rerunning",
             "# the compare command instead submits only the cells without a result.",
             f"#SBATCH --job-name=dynaformer-{grid_name}",
             f"#SBATCH --array={indices}{parallel}",
             f"#SBATCH --output={out / 'slurm' / 'logs' / '%A_%a.log'}",
             "#SBATCH --open-mode=append",
             "#SBATCH --requeue",
             *opts.lines(),
             f"exec {shlex.quote(sys.executable)} -m dynaformer.study.slurm_task {shlex.quote(str(manifest))} "
             f"\"$SLURM_ARRAY_TASK_ID\""]
    return "\n".join(lines) + "\n"


def _sbatch(args: list[str], stdin: str | None = None) -> str:
    """Run sbatch; its own first error line as a DynaformerError when it refuses."""
    try:
        res = subprocess.run(["sbatch", *args], input=stdin, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise DynaformerError("--launcher slurm: sbatch is not on PATH (run compare on a SLURM login node)") from None
    except subprocess.TimeoutExpired:
        raise DynaformerError("--launcher slurm: sbatch did not answer in 120 s (is slurmctld up?)") from None
    if res.returncode != 0:
        lines = [ln.strip() for ln in (res.stderr + res.stdout).splitlines() if ln.strip()]
        raise DynaformerError(f"--launcher slurm: {lines[0] if lines else f'sbatch exited {res.returncode}'}")
    return res.stdout.strip()


def check_submission(grid_name: str, out: Path, opts: SlurmOptions) -> None:
    """Ask SLURM whether it would take the array (`sbatch --test-only`), before anything is written."""
    opts.check()
    if shutil.which("sbatch") is None:
        raise DynaformerError("--launcher slurm: sbatch is not on PATH (run compare on a SLURM login node)")
    _sbatch(["--test-only"], script(grid_name, out, out / "slurm" / "array-0.json", "0", opts))


def submitted(out: Path) -> list[dict]:
    """The arrays submitted from this grid folder so far (OUT/slurm/submitted.json)."""
    try:
        return json.loads((out / "slurm" / "submitted.json").read_text())["arrays"]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError) as e:
        raise DynaformerError(f"'{out / 'slurm' / 'submitted.json'}' is damaged ({e}); remove it") from None


def queued(out: Path) -> dict[str, str]:
    """Cell key → "JOB_INDEX" for the cells whose array task is still pending or running (squeue)."""
    arrays = submitted(out)
    if not arrays:
        return {}
    try:
        res = subprocess.run(["squeue", "--noheader", "--array", f"--user={getpass.getuser()}",
                              "--format=%F|%K"], capture_output=True, text=True, timeout=120)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        res = None
    if res is None or res.returncode != 0:
        why = (res.stderr.strip().splitlines() or ["?"])[0] if res is not None else "squeue did not answer"
        raise DynaformerError(f"--launcher slurm: cannot tell which cells are still queued: {why}")
    live = {tuple(ln.strip().split("|", 1)) for ln in res.stdout.splitlines() if "|" in ln}
    return {key: f"{a['job']}_{i}" for a in arrays for i, key in a["cells"].items() if (a["job"], i) in live}


def plan(out: Path, cells: list[Cell], pending: list[Cell], in_queue: dict[str, str]) -> tuple[list[Array], list[str]]:
    """The arrays that submit `pending`: their inputs' arrays first. Returns (arrays, held): held are cells whose
    input is neither done, nor queued, nor submitted now."""
    where: dict[str, tuple[int | str, int]] = {}  # cell key → (its array, its index there)
    for key, job in in_queue.items():
        j, i = job.rsplit("_", 1)
        where[key] = (j, int(i))
    arrays: list[Array] = []
    todo = list(pending)
    first = Array({})
    for c in list(todo):
        need = depends_on(out, c, cells)
        if need is None or (need / "result.json").exists():
            where[c.key] = (0, len(first.cells))
            first.cells[len(first.cells)] = c
            todo.remove(c)
    if first.cells:
        arrays.append(first)
    by_folder = {c.folder(out): c for c in cells}
    while todo:
        placed = False
        for c in list(todo):
            source = by_folder[depends_on(out, c, cells)]
            if source.key not in where:
                continue
            after, index = where[source.key]
            # the first array that waits on the same array and has this index free (several cells may need one)
            for a in arrays:
                if a.after == after and index not in a.cells:
                    break
            else:
                a = Array({}, after)
                arrays.append(a)
            a.cells[index] = c
            where[c.key] = (arrays.index(a), index)
            todo.remove(c)
            placed = True
        if not placed:
            break
    return arrays, [c.key for c in todo]


def submit_grid(grid: Grid, out: Path, opts: SlurmOptions, skip_invalid: bool = False, nproc_per_cell: int = 1,
                max_cells: int | None = None) -> dict:
    """Submit every pending cell. Returns {"done", "submitted": {key: JOB_INDEX}, "queued": {key: JOB_INDEX},
    "held", "skipped"}."""
    if nproc_per_cell < 1:
        raise DynaformerError(f"--nproc_per_cell: must be ≥ 1, got {nproc_per_cell}")
    out = out.resolve()
    check_submission(grid.name, out, opts)
    in_queue = queued(out) if out.is_dir() else {}
    cells = prepare(grid, out, skip_invalid)
    pending = [c for c in cells if not (c.folder(out) / "result.json").exists() and c.key not in in_queue]
    if max_cells is not None:
        pending = pending[:max_cells]
    arrays, held = plan(out, cells, pending, in_queue)
    folder = out / "slurm"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    records = submitted(out)
    number = 1 + max((int(Path(r["script"]).stem.split("-")[1]) for r in records), default=-1)
    done_now: list[Array] = []
    written: list[Path] = []
    try:
        for a in arrays:
            a.number, number = number, number + 1
            manifest = folder / f"array-{a.number}.json"
            write_json_strict(manifest, {"out": str(out), "nproc_per_cell": nproc_per_cell,
                                         "cells": {str(i): str(c.folder(out).relative_to(out))
                                                   for i, c in a.cells.items()}})
            path = folder / f"array-{a.number}.sbatch"
            path.write_text(script(grid.name, out, manifest, a.spec(), opts))
            written += [manifest, path]
            args = ["--parsable"]
            after = arrays[a.after].job if isinstance(a.after, int) else a.after
            if after is not None:
                args += [f"--dependency=aftercorr:{after}", "--kill-on-invalid-dep=yes"]
            a.job = _sbatch([*args, str(path)]).split(";")[0]
            done_now.append(a)
            records.append({"job": a.job, "script": path.name, "dependency": after,
                            "cells": {str(i): c.key for i, c in a.cells.items()}})
    except BaseException:
        if done_now:  # all of this submission or none of it
            subprocess.run(["scancel", *[a.job for a in done_now]], capture_output=True)
            records = records[:len(records) - len(done_now)]
        for path in written:
            path.unlink(missing_ok=True)
        raise
    finally:
        write_json_strict(folder / "submitted.json", {"arrays": records})
    return {"done": [c.key for c in cells if (c.folder(out) / "result.json").exists()],
            "submitted": {c.key: f"{a.job}_{i}" for a in arrays for i, c in a.cells.items()},
            "queued": in_queue, "held": held, "skipped": [c.key for c in grid.cells(True) if c.error]}

