"""What `compare` shows and leaves behind: the steps done over the grid while it runs (`Progress`), and
status.json, which describes the grid folder when it stops (`write_status`)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm import tqdm

from ..files import write_json_strict
from .folder import grid_lock
from .grid import Cell


class Progress:
    """Steps done over the grid: a live bar on a terminal; in a file (CI, nohup, > log) one plain line per
    cell started or ended."""

    def __init__(self, name: str, out: Path, cells: list[Cell], enabled: bool) -> None:
        self.name, self.enabled = name, enabled
        self.total = sum(c.steps for c in cells)
        self.done = {c.key: (c.steps if (c.folder(out) / "result.json").exists() else 0) for c in cells}
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


def write_status(out: Path, cells: list[Cell], report: dict) -> None:
    """status.json describes the grid folder, not the last process to finish: several compare processes may
    share a folder, so it is rebuilt from the cells' own files under the grid lock, keeping failures that
    another process recorded for cells that are still not done."""
    with grid_lock(out):
        try:
            old = json.loads((out / "status.json").read_text())
        except (OSError, ValueError):
            old = {}
        done = [c.key for c in cells if (c.folder(out) / "result.json").exists()]
        failures = {}
        for f in [*(old.get("failed") or []), *report["failed"]]:
            if isinstance(f, str) and f.split(": ", 1)[0] not in done:
                failures[f.split(": ", 1)[0]] = f  # one line per cell: the latest failure
        busy = [c.key for c in cells if c.key not in done and c.key not in failures
                and (c.folder(out) / ".lock").exists()]
        write_json_strict(out / "status.json", {"done": done, "failed": list(failures.values()), "busy": busy,
                                                "skipped": report["skipped"]})


def folder_status(out: Path) -> dict:
    """Where each cell of a grid folder stands, read from the folder alone (no scheduler, no compare process):
    done (result.json), running (its lock is held), stopped (trained part-way: a checkpoint or a logged step),
    failed (its last run under SLURM exited with an error, or status.json names it), or waiting. Steps are
    those its run logged; `job` is the SLURM task that last ran it, or else the one it was submitted as."""
    from ..errors import DynaformerError
    from .cell import last_step
    from .kinds import KINDS

    if not (out / "grid.json").is_file():
        raise DynaformerError(f"'{out}' is not a compare folder (it has no grid.json)")
    try:
        failed = {f.split(": ", 1)[0]: f for f in json.loads((out / "status.json").read_text()).get("failed", [])}
    except (OSError, ValueError, AttributeError):
        failed = {}
    try:
        arrays = json.loads((out / "slurm" / "submitted.json").read_text())["arrays"]
    except (OSError, ValueError, KeyError):
        arrays = []
    submitted = {key: f"{a['job']}_{i}" for a in arrays for i, key in a["cells"].items()}
    cells = []
    for kind in KINDS:
        for spec_path in sorted(out.glob(kind.pattern())):
            d = spec_path.parent
            try:
                spec = json.loads(spec_path.read_text())
            except ValueError:
                continue
            key = Cell(spec["variant"], spec["seed"], None, None, task=spec.get("task"), kind=kind).key
            total = kind.spec_steps(spec)
            try:
                runs = json.loads((d / "slurm.json").read_text())["runs"]
            except (OSError, ValueError, KeyError):
                runs = []
            last = runs[-1] if runs else {}
            if (d / "result.json").exists():
                state, step = "done", total
            elif (d / ".lock").exists():
                state, step = "running", last_step(d)
            elif last.get("exit") not in (None, 0, 130) and not last.get("requeued"):
                state, step = "failed", last_step(d)
            elif key in failed:
                state, step = "failed", last_step(d)
            else:
                step = last_step(d)
                state = "stopped" if step or any((d / "run").glob("step-*")) else "waiting"
            row = {"cell": key, "state": state, "step": step, "steps": total}
            job = submitted.get(key) or last.get("job")
            if job:
                row["job"] = job
            cells.append(row)
    counts = {s: sum(r["state"] == s for r in cells) for s in ("done", "running", "stopped", "failed", "waiting")}
    return {"cells": cells, "counts": counts}

