"""A grid folder: grid.json (the grid a rerun must match, and its calibrated wall-clock steps), each cell's folder
and cell.json, and the grid lock that several `compare` processes take in turn to prepare it.

    OUT/grid.json                         the resolved grid, its fingerprint and steps per variant (wall_clock)
    OUT/cells/VARIANT/seedS/              a language-model cell: cell.json, run/, result.json (done), .lock
    OUT/encoder-pretrain/VARIANT/seedS/   a masked-LM pretraining cell
    OUT/encoder/TASK/VARIANT/seedS/       a fine-tuning cell
    OUT/skipped.json                      variants whose config does not validate on this build (skip_invalid)

A cell folder that holds a cell.json already must describe the same cell (`same_cell`), or the grid stops:
resuming it would mix two configs in one result. Where a cell.json names another cell's folder (its kind's
`links`), the path counts as the same when it leads to the same cell of its own grid folder, so a grid folder
copied or moved elsewhere resumes (its cell.json files then name the new place).
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path

from ..configtools import first_difference, to_dict
from ..errors import DynaformerError
from ..files import write_json_strict
from ..locks import holder, try_lock, unlock
from .calibrate import calibrate_steps
from .grid import Cell, Grid


def depends_on(out: Path, cell: Cell, cells: list[Cell]) -> Path | None:
    """The folder of the cell whose result this cell needs first (its kind's `needs`), when that cell is among
    `cells`: an encoder cell's pretraining cell, or the learned-span cell (same seed) whose mean reach sets a
    matched fixed window."""
    want = cell.kind.needs(cell)
    if want is None:
        return None
    for c in cells:
        if (c.kind, c.variant, c.seed) == want:
            return c.folder(out)
    return None


@contextlib.contextmanager
def grid_lock(out: Path, timeout_s: float = 3600):
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
            new = [c for c in cells if c.model is not None and c.kind.wall_clock_matched and c.variant not in steps]
            if new:
                steps.update(calibrate_steps(grid, new))
                write_json_strict(info_path, {**info, "steps": steps})
        recorded = info["grid"]
        recorded["variants"] = {**recorded["variants"], **grid.variants}
        # grid folders written before the options had their name hold them as "harness"
        options = recorded.pop("harness", None) or recorded.get("variant_options") or {}
        recorded["variant_options"] = {**options, **grid.variant_options}
        recorded["questions"] = grid.questions
        write_json_strict(info_path, info)
    else:
        if any(p.name != ".lock" for p in out.iterdir()):
            raise DynaformerError(f"'{out}' exists and is not a dynaformer compare folder; choose another --out")
        steps = calibrate_steps(grid, cells) if grid.match == "wall_clock" else {}
        write_json_strict(info_path, {"name": grid.name, "fingerprint": grid.fingerprint(), "grid": grid.to_dict(),
                                      "steps": steps, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return steps


def prepare(grid: Grid, out: Path, skip_invalid: bool) -> list[Cell]:
    """Write grid.json (or check an existing one) and each cell's cell.json; return the cells that can run."""
    cells = grid.cells(skip_invalid)
    for c in cells:
        if c.model is not None:
            c.kind.check(c, grid.eval)  # fail now, not after training
    out.mkdir(parents=True, exist_ok=True)
    with grid_lock(out):
        steps = _grid_steps(grid, out, cells)
    skipped = [{"cell": c.key, "reason": c.error} for c in cells if c.error]
    write_json_strict(out / "skipped.json", {"skipped": skipped})
    for c in cells:
        if c.error:
            continue
        if c.kind.wall_clock_matched and c.variant in steps:
            c.train["max_steps"] = int(steps[c.variant])
        d = c.folder(out)
        d.mkdir(parents=True, exist_ok=True)
        spec = c.kind.spec(c, grid.eval, depends_on(out, c, cells))
        if (d / "cell.json").exists():
            try:
                old = json.loads((d / "cell.json").read_text())
            except ValueError:
                old = None
            new = json.loads(json.dumps(spec))
            if old is not None and not same_cell(_moved_to(old, new, out, c.kind.links), new):
                raise DynaformerError(f"cell {c.key} in '{out}' was run with a different config; "
                                      f"rename the variant or choose another --out")
        write_json_strict(d / "cell.json", spec)
    return [c for c in cells if not c.error]


def _moved_to(old: dict, new: dict, out: Path, links: tuple[tuple[str, ...], ...]) -> dict:
    """`old` (a cell.json) with each link to another cell's folder taken as `new`'s where both lead to the same
    cell, each from its own grid folder (`out` for `new`): the grid folder was copied or moved, the cell is the
    same."""
    old = copy.deepcopy(old)
    for path in links:
        *parents, name = path
        a, b = old, new
        for k in parents:
            a, b = (a or {}).get(k), (b or {}).get(k)
        if not (isinstance(a, dict) and isinstance(b, dict)):
            continue
        was, now = a.get(name), b.get(name)
        if not (isinstance(was, str) and isinstance(now, str)) or was == now:
            continue
        try:
            tail = Path(now).relative_to(out).parts
        except ValueError:
            continue  # not a cell of this grid folder (a fine-tuning `init` given by hand)
        if Path(was).parts[-len(tail):] == tail:
            a[name] = now
    return old


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
