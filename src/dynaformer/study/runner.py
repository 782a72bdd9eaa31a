"""The cell runner of `compare`: starts pending cells whose inputs are done, up to `workers` cell processes at
once (each pinned to its slot's GPUs, study/slots.py) or one by one in this process (workers=0), polls the
running processes, and records each cell's outcome. A cell is taken by creating its .lock (host:pid), so
several compare processes share a grid folder; the lock of a cell process lives as long as the process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ..errors import DynaformerError
from ..locks import hostname, try_lock, unlock
from .cell import last_step, run_cell
from .folder import depends_on
from .grid import Cell
from .progress import Progress
from .slots import slot_env


def cell_command(d: Path, nproc_per_cell: int, cell: Cell) -> list[str]:
    """A cell process: `python -m dynaformer.study.cell D`, or a torchrun job of nproc_per_cell ranks where the
    cell's kind can be one."""
    return process_command(d, nproc_per_cell, cell.kind.distributed)


def process_command(d: Path, nproc_per_cell: int, distributed: bool) -> list[str]:
    """`cell_command` for a cell known by its folder (a SLURM task reads the kind from cell.json)."""
    if nproc_per_cell > 1 and distributed:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(nproc_per_cell), "-m", "dynaformer.study.cell", str(d)]
    return [sys.executable, "-m", "dynaformer.study.cell", str(d)]


class Runner:
    """Starts pending cells whose inputs are done (up to `workers` at once, or in this process with workers=0),
    polls the running cell processes, and records each cell's outcome in `report`."""

    def __init__(self, out: Path, cells: list[Cell], workers: int, gpus: list[int], nproc_per_cell: int,
                 report: dict, progress: Progress) -> None:
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
                    self.report["failed"].append(f"{c.key}: its {c.kind.waits_for(c)} did not finish")
                pending.clear()

    def _start_ready(self, pending: list[Cell]) -> int:
        """Start pending cells while slots are free; returns how many were put back because what they need is
        not done yet."""
        waited = 0
        while pending and len(self.running) < max(1, self.workers) and waited < len(pending):
            c = pending.pop(0)
            d = c.folder(self.out)
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
        proc = subprocess.Popen(cell_command(d, self.nproc_per_cell, c), stdout=log, stderr=subprocess.STDOUT,
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
