"""One task of a `compare --launcher slurm` array: `python -m dynaformer.study.slurm_task MANIFEST INDEX` runs the
cell that the array's manifest (study/slurm.py) maps INDEX to, as the local runner does (runner.cell_command,
its output in the cell's cell.log), holding the cell's lock.

Signals. SLURM sends SIGUSR1 to this process (`--signal=B:USR1@S`) S seconds before the time limit: the cell
is asked to stop (SIGTERM: the trainer finishes its step and saves a checkpoint) and the task requeues itself
(`scontrol requeue`), so it resumes from that checkpoint when it runs again. `scancel` and the time limit send
SIGTERM to every process of the task, the cell's included, so it is not passed on (a second SIGTERM would stop
the trainer before its checkpoint); the cell is finished by the next `compare`.

CELL/slurm.json keeps each run of the cell under SLURM (job, host, pids, start, end, exit code). SLURM runs a
task once at a time and `compare` never submits a queued cell, so a lock that the cell's previous run left
behind (a node that died, a kill after the grace time) is stale even where its host is another machine, and is
taken over; any other holder (a `compare` without the scheduler) is respected.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..files import write_json_strict
from ..locks import holder, hostname, try_lock, unlock
from .kinds import kind_of
from .runner import process_command


def _runs(cell_dir: Path) -> list[dict]:
    try:
        return json.loads((cell_dir / "slurm.json").read_text())["runs"]
    except (OSError, ValueError, KeyError):
        return []


def _take_over_stale(cell_dir: Path, runs: list[dict]) -> None:
    """Remove the locks that this cell's previous SLURM run left (its process is gone: SLURM ran it before)."""
    if not runs:
        return
    last = runs[-1]
    mine = {f"{last.get('host')}:{last.get('pid')}", f"{last.get('host')}:{last.get('child')}"}
    if holder(cell_dir) in mine:
        unlock(cell_dir)


def _take_over_run_lock(cell_dir: Path, runs: list[dict]) -> None:
    """The run folder's lock, held by a process of the previous run's host (this task holds the cell's lock, so
    no one else trains this cell)."""
    if runs and holder(cell_dir / "run").rsplit(":", 1)[0] == runs[-1].get("host") != hostname():
        unlock(cell_dir / "run")


def run_task(manifest: Path, index: int) -> int:
    m = json.loads(manifest.read_text())
    rel = m["cells"].get(str(index))
    if rel is None:
        print(f"slurm task: index {index} is not in '{manifest}'", file=sys.stderr)
        return 2
    d = Path(m["out"]) / rel
    job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', '?')}_{os.environ.get('SLURM_ARRAY_TASK_ID', index)}"
    if (d / "result.json").exists():
        print(f"slurm task {job}: {rel} is done already", file=sys.stderr)
        return 0
    runs = _runs(d)
    _take_over_stale(d, runs)
    if not try_lock(d):
        print(f"slurm task {job}: {rel} is in use by {holder(d)}", file=sys.stderr)
        return 1
    _take_over_run_lock(d, runs)
    try:
        return _run_locked(d, rel, job, runs, int(m.get("nproc_per_cell", 1)))
    finally:
        unlock(d)


def _run_locked(d: Path, rel: str, job: str, runs: list[dict], nproc: int) -> int:
    requeue = []

    def _usr1(signum, frame):  # the time limit is near: checkpoint now, run again later
        if not requeue:
            requeue.append(True)
            print(f"slurm task {job}: SIGUSR1, stopping {rel} at a checkpoint to requeue", file=sys.stderr)
            proc.send_signal(signal.SIGTERM)

    spec = json.loads((d / "cell.json").read_text())
    print(f"slurm task {job}: {rel} on {hostname()} (log: {d / 'cell.log'})", file=sys.stderr, flush=True)
    with open(d / "cell.log", "a") as log:
        proc = subprocess.Popen(process_command(d, nproc, kind_of(spec).distributed), stdout=log,
                                stderr=subprocess.STDOUT)
    run = {"job": job, "host": hostname(), "pid": os.getpid(), "child": proc.pid, "start": time.time()}
    write_json_strict(d / "slurm.json", {"runs": [*runs, run]})
    previous = {signal.SIGUSR1: signal.signal(signal.SIGUSR1, _usr1),
                # scancel / the time limit signal the cell too: passed on, it would be its second SIGTERM
                signal.SIGTERM: signal.signal(signal.SIGTERM, lambda s, f: None)}
    try:
        rc = proc.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    run.update(end=time.time(), exit=rc, requeued=bool(requeue))
    write_json_strict(d / "slurm.json", {"runs": [*runs, run]})
    if rc != 0:
        tail = (d / "cell.log").read_text(errors="ignore").strip().splitlines()[-1:] or ["?"]
        print(f"slurm task {job}: {rel} exited {rc}: {tail[0]}", file=sys.stderr, flush=True)
    if requeue:
        unlock(d)
        # this task alone: an array's last task has the array's own SLURM_JOB_ID, which names every task
        task = os.environ.get("SLURM_ARRAY_TASK_ID")
        job_id = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{task}" if task else os.environ.get("SLURM_JOB_ID")
        if job_id:
            subprocess.run(["scontrol", "requeue", job_id], check=False)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m dynaformer.study.slurm_task MANIFEST INDEX", file=sys.stderr)
        return 2
    return run_task(Path(argv[0]), int(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
