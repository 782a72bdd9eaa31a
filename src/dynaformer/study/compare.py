"""`dynaformer compare`: train and evaluate every (variant, seed) cell of a grid.

    OUT/grid.json                    the resolved grid (a rerun must match it: resume, not mix)
    OUT/cells/VARIANT/seedS/         cell.json, run/, result.json (done), .lock (being run)
    OUT/skipped.json                 variants whose config does not validate on this build (skip_invalid)

Resumable: a cell with result.json is done; any other cell is (re)started, and its trainer resumes
from the newest complete checkpoint (`--resume auto`), bit-exactly. Parallel-safe: a cell is taken by
creating its .lock with O_EXCL; a lock whose process is gone (same host) is stale and taken over, so
several `compare` processes (or --workers) can share one grid. Matched tokens: every cell trains the
same steps × batch × context. Matched wall-clock: each variant's steps are set so that its measured
step time × steps ≈ wall_clock_s (calibrated once, recorded in grid.json, reused on resume).

Devices: worker slot i runs its cells on GPU i mod (visible GPUs), or on the GPUs of `--devices`, through
CUDA_VISIBLE_DEVICES; with `--nproc_per_cell K` a cell is a torchrun job on K GPUs of its own. Several nodes
share a grid on a shared filesystem by running the same command: cells are claimed through their lock files
(host:pid; another host's lock is never taken over).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from ..configtools import first_difference, to_dict
from ..errors import DynaformerError
from ..locks import holder, hostname, try_lock, unlock
from .cell import last_step, run_cell, write_json
from .grid import Cell, Grid


def cell_dir(out: Path, cell: Cell) -> Path:
    if cell.kind == "encoder":
        return out / "encoder" / cell.task / cell.variant / f"seed{cell.seed}"
    if cell.kind == "encoder_pretrain":
        return out / "encoder-pretrain" / cell.variant / f"seed{cell.seed}"
    return out / "cells" / cell.variant / f"seed{cell.seed}"


def depends_on(out: Path, cell: Cell, cells: list[Cell]) -> Path | None:
    """The cell folder whose result this cell needs first: an encoder cell's pretraining cell, or the
    learned-span cell (same seed) whose mean reach sets a matched fixed window."""
    if cell.kind == "lm" and cell.match_reach:
        want = ("lm", cell.match_reach, cell.seed)
    elif cell.kind == "encoder":
        want = ("encoder_pretrain", cell.variant, cell.seed)
    else:
        return None
    for c in cells:
        if (c.kind, c.variant, c.seed) == want:
            return cell_dir(out, c)
    return None


# --- wall-clock matching ------------------------------------------------------------------------

def calibrate_steps(grid: Grid, cells: list[Cell], repeats: int = 5) -> dict[str, int]:
    """Steps per variant so that steps × (median step time) ≈ wall_clock_s; step times of all
    variants are measured interleaved in this process (drifts in machine speed hit all alike)."""
    import torch

    from ..configtools import from_dict
    from ..model import ModelConfig, Transformer
    from ..timing import time_interleaved

    fns = {}
    first = {}
    for c in cells:
        if c.model is not None and c.kind == "lm" and c.variant not in first:
            first[c.variant] = c
    for name, c in first.items():
        mcfg = from_dict(ModelConfig, c.model, "model")
        torch.manual_seed(0)
        model = Transformer(mcfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randint(0, mcfg.vocab_size, (c.train["batch_size"], mcfg.context_len))

        def step(model=model, opt=opt, x=x):
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = step
    if not fns:
        return {}
    threads = next(iter(first.values())).train.get("threads") or 0
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        times = time_interleaved(fns, repeats, warmup=1)
    finally:
        torch.set_num_threads(old)
    return {v: max(1, int(grid.wall_clock_s / t)) for v, t in times.items()}


# --- the grid ------------------------------------------------------------------------------------

def _grid_steps(grid: Grid, out: Path, cells: list[Cell]) -> dict[str, int]:
    """Write grid.json, or check the existing one against this grid; calibrate wall-clock steps for variants
    that have none yet. Returns the steps per variant (wall-clock grids). Called under the grid's lock."""
    info_path = out / "grid.json"
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text())
        except ValueError:
            raise DynaformerError(f"'{info_path}' is damaged; remove it or choose another --out") from None
        if info.get("fingerprint") != grid.fingerprint():
            raise DynaformerError(f"'{out}' holds a different grid ({info.get('name')}); choose another --out")
        steps = info.get("steps", {})
        if grid.match == "wall_clock":
            new = [c for c in cells if c.model is not None and c.kind == "lm" and c.variant not in steps]
            if new:
                steps.update(calibrate_steps(grid, new))
                write_json(info_path, {**info, "steps": steps})
        info["grid"]["variants"] = {**info["grid"]["variants"], **grid.variants}
        info["grid"]["questions"] = grid.questions
        write_json(info_path, info)
    else:
        if any(p.name != ".lock" for p in out.iterdir()):
            raise DynaformerError(f"'{out}' exists and is not a dynaformer compare folder; choose another --out")
        steps = calibrate_steps(grid, cells) if grid.match == "wall_clock" else {}
        write_json(info_path, {"name": grid.name, "fingerprint": grid.fingerprint(), "grid": grid.to_dict(),
                               "steps": steps, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return steps


@contextlib.contextmanager
def _grid_lock(out: Path, timeout_s: float = 3600):
    """out/.lock while grid.json is read, calibrated and written: several compare processes may share a
    grid folder, and only one of them may calibrate it (the others wait, then read its steps)."""
    t0, told = time.monotonic(), False
    while not try_lock(out):
        if not told:
            print(f"compare: waiting for {holder(out)}, which is preparing '{out}'", file=sys.stderr)
            told = True
        if time.monotonic() - t0 > timeout_s:
            raise DynaformerError(f"'{out}' has been locked by {holder(out)} for {timeout_s:.0f} s")
        time.sleep(0.2)
    try:
        yield
    finally:
        unlock(out)


def prepare(grid: Grid, out: Path, skip_invalid: bool) -> list[Cell]:
    """Write grid.json (or check an existing one) and each cell's cell.json; return the cells."""
    cells = grid.cells(skip_invalid)
    from ..data.tasks import make_task
    from .cell import task_params

    for c in cells:
        if c.model is None or c.kind != "lm":
            continue
        C, params = c.model["context_len"], task_params(c.train["data"])
        for t in grid.eval["tasks"]:  # fail now, not after training
            task = make_task(t, **params.get(t, {}))
            task.generate(1, C, task.distance_range(C)[0])
    out.mkdir(parents=True, exist_ok=True)
    with _grid_lock(out):
        steps = _grid_steps(grid, out, cells)
    skipped = [{"cell": c.key, "reason": c.error} for c in cells if c.error]
    write_json(out / "skipped.json", {"skipped": skipped})
    for c in cells:
        if c.error:
            continue
        if c.kind == "lm" and c.variant in steps:
            c.train["max_steps"] = int(steps[c.variant])
        d = cell_dir(out, c)
        d.mkdir(parents=True, exist_ok=True)
        if c.kind == "lm":
            spec = {"variant": c.variant, "seed": c.seed, "model": c.model, "train": c.train, "eval": grid.eval}
            if c.match_reach:
                need = depends_on(out, c, cells)
                if need is None:
                    raise DynaformerError(f"cell {c.key}: match_reach needs variant '{c.match_reach}', which this "
                                          f"run leaves out")
                spec["match_reach"] = {"variant": c.match_reach, "cell": str(need)}
        elif c.kind == "encoder_pretrain":
            spec = {"kind": c.kind, "variant": c.variant, "seed": c.seed, "model": c.model, "train": c.train}
        else:
            pre = depends_on(out, c, cells)
            if pre is not None:  # fine-tune from the pretrained encoder of the same variant and seed
                c.finetune["init"] = str(pre / "run")
            spec = {"kind": c.kind, "variant": c.variant, "seed": c.seed, "task": c.task, "model": c.model,
                    "finetune": c.finetune, **({} if pre is None else {"needs": str(pre)})}
        if (d / "cell.json").exists():
            try:
                old = json.loads((d / "cell.json").read_text())
            except ValueError:
                old = None
            if old is not None and not same_cell(old, json.loads(json.dumps(spec))):
                raise DynaformerError(f"cell {c.key} in '{out}' was run with a different config; "
                                      f"rename the variant or choose another --out")
        write_json(d / "cell.json", spec)
    return [c for c in cells if not c.error]


def _config_defaults() -> dict[str, dict]:
    """Defaults of the config sections a cell.json holds (a field added after a cell ran has its default)."""
    from ..model.config import ModelConfig
    from ..train.config import TrainConfig
    from ..train.finetune import FinetuneConfig, flat_record

    return {"model": to_dict(ModelConfig()), "train": to_dict(TrainConfig()), "finetune": flat_record(FinetuneConfig())}


def same_cell(old: dict, new: dict) -> bool:
    """Whether a cell folder's cell.json describes the cell about to run (configtools.first_difference: a field
    that a newer dynaformer added counts as the same when the new value is its default)."""
    return first_difference(old, new, _config_defaults()) is None


# --- devices -------------------------------------------------------------------------------------

def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str | None, nproc_per_cell: int = 1) -> list[int]:
    """The GPU indices cells may use: `--devices 0,2,3`, checked against the visible GPUs, or all visible
    ones (none on a CPU machine: nothing is pinned)."""
    count = visible_gpus()
    if spec is None:
        ids = list(range(count))
    else:
        ids = []
        for part in spec.split(","):
            if not part.strip().isdigit():
                raise DynaformerError(f"--devices: '{part.strip()}' is not a GPU index (expected e.g. 0,1,2,3)")
            i = int(part)
            if i >= count:
                raise DynaformerError(f"--devices: GPU {i} does not exist (this machine has {count} visible GPU"
                                      f"{'' if count == 1 else 's'})")
            if i in ids:
                raise DynaformerError(f"--devices: GPU {i} is named twice")
            ids.append(i)
    if ids and nproc_per_cell > len(ids):
        raise DynaformerError(f"--nproc_per_cell {nproc_per_cell} needs that many GPUs, but only {len(ids)} "
                              f"are available to cells")
    return ids


def slot_env(slot: int, devices: list[int], nproc_per_cell: int = 1) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES for worker slot `slot`: its nproc_per_cell GPUs, slot by slot round the devices;
    indices are translated through this process's own CUDA_VISIBLE_DEVICES, if any. Empty without GPUs."""
    if not devices:
        return {}
    mine = [devices[(slot * nproc_per_cell + j) % len(devices)] for j in range(nproc_per_cell)]
    parent = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return {"CUDA_VISIBLE_DEVICES": ",".join(parent[i] if i < len(parent) else str(i) for i in mine)}


def cell_command(d: Path, nproc_per_cell: int, kind: str) -> list[str]:
    """A cell process: `python -m dynaformer.study.cell D`, or a torchrun job of nproc_per_cell ranks
    (fine-tuning cells run as one process)."""
    if nproc_per_cell > 1 and kind != "encoder":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(nproc_per_cell), "-m", "dynaformer.study.cell", str(d)]
    return [sys.executable, "-m", "dynaformer.study.cell", str(d)]


def run_grid(grid: Grid, out: Path, workers: int = 1, skip_invalid: bool = False, progress: bool = True,
             max_cells: int | None = None, devices: str | None = None, nproc_per_cell: int = 1) -> dict:
    """Run every pending cell. workers=0 runs cells in this process (tests); N ≥ 1 runs up to N cell
    processes at once, worker slot i pinned to its GPUs (slot_env). Returns {"done", "failed", "busy",
    "skipped"} cell keys."""
    if nproc_per_cell < 1:
        raise DynaformerError(f"--nproc_per_cell: must be ≥ 1, got {nproc_per_cell}")
    if nproc_per_cell > 1 and workers == 0:
        raise DynaformerError("--nproc_per_cell needs cell processes (--workers ≥ 1)")
    gpus = parse_devices(devices, nproc_per_cell)
    cells = prepare(grid, out, skip_invalid)
    pending = [c for c in cells if not (cell_dir(out, c) / "result.json").exists()]
    if max_cells is not None:
        pending = pending[:max_cells]
    report = {"done": [c.key for c in cells if c not in pending and (cell_dir(out, c) / "result.json").exists()],
              "failed": [], "busy": [], "skipped": [c.key for c in grid.cells(True) if c.error]}
    runner = _Runner(out, cells, workers, gpus, nproc_per_cell, report, _Progress(grid.name, out, cells, progress))

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
    _write_status(out, cells, report)
    return report


class _Progress:
    """Steps done over the grid: a live bar on a terminal; in a file (CI, nohup, > log) one plain line per
    cell started or ended."""

    def __init__(self, name: str, out: Path, cells: list[Cell], enabled: bool) -> None:
        self.name, self.enabled = name, enabled
        self.total = sum(c.steps for c in cells)
        self.done = {c.key: (c.steps if (cell_dir(out, c) / "result.json").exists() else 0) for c in cells}
        self.tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=self.total, initial=sum(self.done.values()), unit="step", desc=f"grid {name}",
                        disable=not self.tty, dynamic_ncols=True)
        self.t0 = time.perf_counter()

    def advance(self, key: str, step: int) -> None:
        self.bar.update(max(0, step - self.done[key]))
        self.done[key] = max(self.done[key], step)

    def show(self, running) -> None:
        self.bar.set_postfix_str(", ".join(running))

    def say(self, event: str, key: str) -> None:
        if self.enabled and not self.tty:
            frac = sum(self.done.values()) / max(1, self.total)
            print(f"compare {self.name}: {event} {key} | {frac:.0%} of steps | {time.perf_counter() - self.t0:.0f}s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


class _Runner:
    """Starts pending cells whose inputs are done (up to `workers` at once, or in this process with workers=0),
    polls the running cell processes, and records each cell's outcome in `report`."""

    def __init__(self, out: Path, cells: list[Cell], workers: int, gpus: list[int], nproc_per_cell: int,
                 report: dict, progress: _Progress) -> None:
        self.out, self.cells, self.workers, self.gpus = out, cells, workers, gpus
        self.nproc_per_cell, self.report, self.progress = nproc_per_cell, report, progress
        self.running: dict[str, tuple[subprocess.Popen, Cell, Path]] = {}
        self.slots: dict[str, int] = {}  # cell key → its worker slot (and so its GPUs)

    def run(self, pending: list[Cell]) -> None:
        while pending or self.running:
            waited = self._start_ready(pending)
            self._poll()
            if self.running:
                time.sleep(0.5)
            elif pending and waited >= len(pending):  # nothing runs and nothing can start: their inputs failed
                for c in pending:
                    what = "pretraining cell" if c.kind == "encoder" else f"match_reach cell ({c.match_reach})"
                    self.report["failed"].append(f"{c.key}: its {what} did not finish")
                pending.clear()

    def _start_ready(self, pending: list[Cell]) -> int:
        """Start pending cells while slots are free; returns how many were put back because what they need is
        not done yet."""
        waited = 0
        while pending and len(self.running) < max(1, self.workers) and waited < len(pending):
            c = pending.pop(0)
            d = cell_dir(self.out, c)
            if (d / "result.json").exists():
                self.report["done"].append(c.key)
                continue
            need = depends_on(self.out, c, self.cells)
            if need is not None and not (need / "result.json").exists():
                pending.append(c)
                waited += 1
                continue
            waited = 0
            if not try_lock(d):
                self.report["busy"].append(c.key)  # another compare process is on it
                continue
            self.progress.show([c.key])
            self.progress.say("start", c.key)
            if self.workers == 0:
                self._run_here(c, d)
            else:
                self._spawn(c, d)
        return waited

    def _run_here(self, c: Cell, d: Path) -> None:
        try:
            run_cell(d)
            self.report["done"].append(c.key)
        except DynaformerError as e:
            self.report["failed"].append(f"{c.key}: {e}")
        finally:
            unlock(d)
        self.progress.advance(c.key, c.steps)
        self.progress.say("end", c.key)

    def _spawn(self, c: Cell, d: Path) -> None:
        slot = min(set(range(max(1, self.workers))) - set(self.slots.values()))
        log = open(d / "cell.log", "a")
        proc = subprocess.Popen(cell_command(d, self.nproc_per_cell, c.kind), stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **slot_env(slot, self.gpus, self.nproc_per_cell)})
        log.close()
        self.slots[c.key] = slot
        (d / ".lock").write_text(f"{hostname()}:{proc.pid}")  # the lock lives as long as the cell
        self.running[c.key] = (proc, c, d)
        self.progress.show(self.running)

    def _poll(self) -> None:
        for key, (proc, c, d) in list(self.running.items()):
            self.progress.advance(key, c.steps if proc.poll() is not None else last_step(d))
            if proc.poll() is None:
                continue
            unlock(d)
            del self.running[key]
            self.slots.pop(key, None)
            self.progress.show(self.running)
            self.progress.say("done" if proc.returncode == 0 else f"exit {proc.returncode}:", key)
            if proc.returncode == 0 and (d / "result.json").exists():
                self.report["done"].append(key)
            elif proc.returncode == 130:
                raise KeyboardInterrupt
            else:
                tail = (d / "cell.log").read_text(errors="ignore").strip().splitlines()[-1:] or ["?"]
                self.report["failed"].append(f"{key}: exit {proc.returncode}: {tail[0]}")

    def stop(self) -> None:
        """Ctrl-C or SIGTERM: stop the cell processes (the trainer saves a checkpoint on SIGTERM)."""
        for proc, _, _d in self.running.values():
            proc.terminate()
        for proc, _, d in self.running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            unlock(d)


def _write_status(out: Path, cells: list[Cell], report: dict) -> None:
    """status.json describes the grid folder, not the last process to finish: several compare processes may
    share a folder, so it is rebuilt from the cells' own files under the grid lock, keeping failures that
    another process recorded for cells that are still not done."""
    with _grid_lock(out):
        try:
            old = json.loads((out / "status.json").read_text())
        except (OSError, ValueError):
            old = {}
        done = [c.key for c in cells if (cell_dir(out, c) / "result.json").exists()]
        failures = {}
        for f in [*(old.get("failed") or []), *report["failed"]]:
            if isinstance(f, str) and f.split(": ", 1)[0] not in done:
                failures[f.split(": ", 1)[0]] = f  # one line per cell: the latest failure
        busy = [c.key for c in cells if c.key not in done and c.key not in failures
                and (cell_dir(out, c) / ".lock").exists()]
        write_json(out / "status.json", {"done": done, "failed": list(failures.values()), "busy": busy,
                                         "skipped": report["skipped"]})
