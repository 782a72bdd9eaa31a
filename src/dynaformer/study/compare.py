"""`dynaformer compare`: train and evaluate every cell of a grid — each (variant, seed) language model, and the
encoder cells of an `encoder:` section.

    OUT/grid.json                    the resolved grid (a rerun must match it: resume, not mix)
    OUT/cells/VARIANT/seedS/         cell.json, run/, result.json (done), .lock (being run)
    OUT/skipped.json                 variants whose config does not validate on this build (skip_invalid)
    OUT/status.json                  done, failed, busy and skipped cells when the last compare stopped

Resumable: a cell with result.json is done; any other cell is (re)started, and its trainer resumes
from the newest complete checkpoint (`--resume auto`), bit-exactly. Parallel-safe: a cell is taken by
creating its .lock with O_EXCL; a lock whose process is gone (same host) is stale and taken over, so
several `compare` processes (or --workers) can share one grid. Matched tokens: every cell trains the
same steps × batch × context. Matched wall-clock: each variant's steps are set so that its measured
step time × steps ≈ wall_clock_s (calibrated once, recorded in grid.json, reused on resume).

Devices: worker slot i runs its cells on GPU i mod (visible GPUs), or on the GPUs of `--devices`, through
CUDA_VISIBLE_DEVICES; with `--nproc_per_cell K` a cell is a torchrun job on K GPUs of its own. Several nodes
share a grid on a shared filesystem by running the same command: cells are claimed through their lock files
(host:pid; another host's lock is never taken over). On a SLURM cluster `compare --launcher slurm` submits the
pending cells as job arrays instead of running them (study/slurm.py, study/slurm_task.py).

The parts, one concern each: the cell kinds (kinds.py), the grid folder, grid.json and each cell.json
(folder.py), wall-clock calibration (calibrate.py), GPU slots (slots.py), the cell runner (runner.py), the
progress bar and status.json (progress.py); this module puts them in order.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from ..errors import DynaformerError
from .folder import prepare, same_cell
from .grid import Grid
from .progress import Progress, write_status
from .runner import Runner
from .slots import parse_devices, slot_env

__all__ = ["parse_devices", "prepare", "run_grid", "same_cell", "slot_env"]


def run_grid(grid: Grid, out: Path, workers: int = 1, skip_invalid: bool = False, progress: bool = True,
             max_cells: int | None = None, devices: str | None = None, nproc_per_cell: int = 1) -> dict:
    """Run every pending cell. workers=0 runs cells in this process (tests); N ≥ 1 runs up to N cell
    processes at once, worker slot i pinned to its GPUs (slots.slot_env). Returns {"done", "failed", "busy",
    "skipped"} cell keys."""
    if nproc_per_cell < 1:
        raise DynaformerError(f"--nproc_per_cell: must be ≥ 1, got {nproc_per_cell}")
    if nproc_per_cell > 1 and workers == 0:
        raise DynaformerError("--nproc_per_cell needs cell processes (--workers ≥ 1)")
    gpus = parse_devices(devices, nproc_per_cell)
    cells = prepare(grid, out, skip_invalid)
    pending = [c for c in cells if not (c.folder(out) / "result.json").exists()]
    if max_cells is not None:
        pending = pending[:max_cells]
    report = {"done": [c.key for c in cells if c not in pending and (c.folder(out) / "result.json").exists()],
              "failed": [], "busy": [], "skipped": [c.key for c in grid.cells(True) if c.error]}
    runner = Runner(out, cells, workers, gpus, nproc_per_cell, report, Progress(grid.name, out, cells, progress))

    def _term(signum, frame):
        raise KeyboardInterrupt

    old_term = signal.signal(signal.SIGTERM, _term) if threading.current_thread() is threading.main_thread() else None
    try:
        runner.run(pending)
    except KeyboardInterrupt:
        runner.stop()
        raise
    finally:
        runner.progress.close()
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    write_status(out, cells, report)
    return report
