"""The study's kinds of cell, one object each: where its folder lies, what must finish before it runs, what its
cell.json holds, how its process starts and what it runs.

    LM                a language model trained on the grid's data and evaluated on its eval plan (the questions)
    ENCODER_PRETRAIN  a masked-LM encoder whose run folder feeds the fine-tuning cells of its variant and seed
    ENCODER           a bidirectional classifier fine-tuned on one generated task (from scratch, or from the
                      pretraining cell of its variant and seed when the grid has one)

The kind's name is the "kind" of its cell.json and result.json; language-model cells, the first kind, write none.
Folder names, keys and file contents are those of every grid folder written so far: they must not change, or an
existing grid folder would no longer resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DynaformerError

if TYPE_CHECKING:
    from .grid import Cell


class CellKind:
    """What one kind of cell does differently from the others; the methods take the Cell (study/grid.py)."""

    name: str  # cell.json's and result.json's "kind"
    section: str  # the Cell's config section ("train" or "finetune") that holds its steps
    wall_clock_matched: bool = False  # `match: wall_clock` sets its steps from the measured step time
    distributed: bool = True  # a cell may be a torchrun job (`compare --nproc_per_cell`)
    links: tuple[tuple[str, ...], ...] = ()  # where its cell.json names another cell's folder (key paths)

    def __repr__(self) -> str:
        return f"CellKind({self.name})"

    def key(self, cell: Cell) -> str:
        """The cell's name in status.json, skipped.json and the progress lines."""
        return f"{self.key_prefix(cell)}{cell.variant}/seed{cell.seed}"

    def key_prefix(self, cell: Cell) -> str:
        raise NotImplementedError

    def folder(self, out: Path, cell: Cell) -> Path:
        """The cell's folder under the grid folder `out`."""
        raise NotImplementedError

    def pattern(self) -> str:
        """Glob of this kind's cell.json files under a grid folder (the report finds its cells by it)."""
        raise NotImplementedError

    def steps(self, cell: Cell) -> int:
        return int(getattr(cell, self.section)["max_steps"])

    def spec_steps(self, spec: dict) -> int:
        """The steps a cell.json asks for."""
        return int(spec[self.section]["max_steps"])

    def needs(self, cell: Cell) -> tuple[CellKind, str, int] | None:
        """(kind, variant, seed) of the cell whose result this cell needs first, if that cell is in the grid."""
        return None

    def waits_for(self, cell: Cell) -> str:
        """What `needs` names, in words: the reason a cell never started when that cell did not finish."""
        return "input cell"

    def check(self, cell: Cell, ev: dict) -> None:
        """Fail before anything trains on what would fail after training."""

    def spec(self, cell: Cell, ev: dict, need: Path | None) -> dict:
        """cell.json: what the cell process runs. `need` is the folder of the cell `needs` names, None when the
        grid has no such cell."""
        raise NotImplementedError

    def run(self, cell_dir: Path, spec: dict, progress_bar: bool) -> dict:
        """Train and measure the cell in this process; write and return its result.json."""
        raise NotImplementedError

    def collect(self, col, result: dict, cell_dir: Path) -> None:
        """Put a finished cell's result where the report reads it (study/collect.py's Collected)."""
        raise NotImplementedError


class _LanguageModel(CellKind):
    name, section, wall_clock_matched = "lm", "train", True
    links = (("match_reach", "cell"),)

    def key_prefix(self, cell: Cell) -> str:
        return ""

    def folder(self, out: Path, cell: Cell) -> Path:
        return out / "cells" / cell.variant / f"seed{cell.seed}"

    def pattern(self) -> str:
        return "cells/*/seed*/cell.json"

    def needs(self, cell: Cell) -> tuple[CellKind, str, int] | None:
        # a matched fixed window: the learned-span cell of the same seed whose mean reach sets span_window
        return (self, cell.match_reach, cell.seed) if cell.match_reach else None

    def waits_for(self, cell: Cell) -> str:
        return f"match_reach cell ({cell.match_reach})"

    def check(self, cell: Cell, ev: dict) -> None:
        from ..data.tasks import make_task
        from .cell import task_params

        C, params = cell.model["context_len"], task_params(cell.train["data"])
        for t in ev["tasks"]:  # every evaluated task generates at this context
            task = make_task(t, **params.get(t, {}))
            task.generate(1, C, task.distance_range(C)[0])

    def spec(self, cell: Cell, ev: dict, need: Path | None) -> dict:
        spec = {"variant": cell.variant, "seed": cell.seed, "model": cell.model, "train": cell.train, "eval": ev}
        if cell.match_reach:
            if need is None:
                raise DynaformerError(f"cell {cell.key}: match_reach needs variant '{cell.match_reach}', which this "
                                      f"run leaves out")
            spec["match_reach"] = {"variant": cell.match_reach, "cell": str(need)}
        return spec

    def run(self, cell_dir: Path, spec: dict, progress_bar: bool) -> dict:
        from .cell import run_lm_cell

        return run_lm_cell(cell_dir, spec, progress_bar)

    def collect(self, col, result: dict, cell_dir: Path) -> None:
        col.results[result["variant"]].append(result)
        col.dirs[result["variant"]].append(cell_dir)


class _EncoderPretrain(CellKind):
    name, section = "encoder_pretrain", "train"

    def key_prefix(self, cell: Cell) -> str:
        return "encoder-pretrain/"

    def folder(self, out: Path, cell: Cell) -> Path:
        return out / "encoder-pretrain" / cell.variant / f"seed{cell.seed}"

    def pattern(self) -> str:
        return "encoder-pretrain/*/seed*/cell.json"

    def spec(self, cell: Cell, ev: dict, need: Path | None) -> dict:
        return {"kind": self.name, "variant": cell.variant, "seed": cell.seed, "model": cell.model,
                "train": cell.train}

    def run(self, cell_dir: Path, spec: dict, progress_bar: bool) -> dict:
        from .cell import run_pretrain_cell

        return run_pretrain_cell(cell_dir, spec, progress_bar)

    def collect(self, col, result: dict, cell_dir: Path) -> None:
        col.encoder_pretrain[result["variant"]].append(result)


class _Encoder(CellKind):
    name, section, distributed = "encoder", "finetune", False  # fine-tuning runs as one process
    links = (("needs",), ("finetune", "init"))

    def key_prefix(self, cell: Cell) -> str:
        return f"encoder-{cell.task}/"

    def folder(self, out: Path, cell: Cell) -> Path:
        return out / "encoder" / cell.task / cell.variant / f"seed{cell.seed}"

    def pattern(self) -> str:
        return "encoder/*/*/seed*/cell.json"

    def needs(self, cell: Cell) -> tuple[CellKind, str, int] | None:
        return (ENCODER_PRETRAIN, cell.variant, cell.seed)  # present only when the grid's encoder has `pretrain`

    def waits_for(self, cell: Cell) -> str:
        return "pretraining cell"

    def spec(self, cell: Cell, ev: dict, need: Path | None) -> dict:
        if need is not None:  # fine-tune from the pretrained encoder of the same variant and seed
            cell.finetune["init"] = str(need / "run")
        return {"kind": self.name, "variant": cell.variant, "seed": cell.seed, "task": cell.task,
                "model": cell.model, "finetune": cell.finetune, **({} if need is None else {"needs": str(need)})}

    def run(self, cell_dir: Path, spec: dict, progress_bar: bool) -> dict:
        from .cell import run_encoder_cell

        return run_encoder_cell(cell_dir, spec, progress_bar)

    def collect(self, col, result: dict, cell_dir: Path) -> None:
        col.encoder[result["task"]][result["variant"]].append(result)


LM, ENCODER_PRETRAIN, ENCODER = _LanguageModel(), _EncoderPretrain(), _Encoder()
KINDS: tuple[CellKind, ...] = (LM, ENCODER_PRETRAIN, ENCODER)  # the order a grid's cells and the report list them


def kind_of(record: dict) -> CellKind:
    """The kind a cell.json or result.json describes (language-model cells write no "kind")."""
    name = record.get("kind", LM.name)
    for k in KINDS:
        if k.name == name:
            return k
    raise DynaformerError(f"unknown cell kind {name!r} (known: {', '.join(k.name for k in KINDS)})")
