"""Collecting a study's results for the report: the finished cells of `compare` folders (or single cell
folders), grouped by variant and sorted by seed, with every cell that has no usable result.json listed as
skipped with the reason (not started, training not finished, evaluation failed, unreadable)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DynaformerError
from .cell import last_step
from .grid import QUESTION_DEFAULTS
from .kinds import KINDS, kind_of


@dataclass
class Collected:
    """The results of the language-model cells by variant (seed order), the encoder cells by task and variant,
    the skipped cells with their reason, and the grids' questions and evaluation settings."""

    results: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))  # variant → results
    dirs: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (cell, reason)
    questions: dict = field(default_factory=lambda: dict(QUESTION_DEFAULTS))
    grids: list[str] = field(default_factory=list)
    eval: dict = field(default_factory=dict)  # the grid's evaluation settings (cost_lengths, cost_repeats)
    encoder: dict[str, dict[str, list[dict]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    encoder_pretrain: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))

    def add(self, r: dict, d: Path) -> None:
        kind_of(r).collect(self, r, d)


def read_result(d: Path) -> tuple[dict | None, str | None]:
    p = d / "result.json"
    if not p.exists():
        run = d / "run"
        if (run / "metrics.jsonl").exists():
            try:
                spec = json.loads((d / "cell.json").read_text())
                total = kind_of(spec).spec_steps(spec)
            except (OSError, ValueError, KeyError, TypeError, DynaformerError):
                total = "?"
            step = last_step(d)
            if step == total:
                return None, "no result.json: training finished but its evaluation did not (see cell.log)"
            return None, f"no result.json: training not finished (step {step}/{total})"
        return None, "no result.json: not started or killed before its first step"
    try:
        r = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        return None, f"result.json unreadable ({e.__class__.__name__})"
    if not isinstance(r, dict) or r.get("status") != "ok" or "variant" not in r:
        return None, "result.json is incomplete"
    return r, None


def collect(paths: list[str | Path]) -> Collected:
    """Results from compare folders (grid.json) and cell folders (result.json). A path that is neither,
    or that holds no finished run at all, is an error naming it."""
    col = Collected()
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DynaformerError(f"'{p}' does not exist")
        if (p / "grid.json").exists():
            try:
                info = json.loads((p / "grid.json").read_text())
            except ValueError:
                raise DynaformerError(f"'{p}/grid.json' is damaged") from None
            col.grids.append(info.get("name", p.name))
            col.questions.update(info.get("grid", {}).get("questions", {}))
            col.eval.update(info.get("grid", {}).get("eval", {}))
            try:
                for s in json.loads((p / "skipped.json").read_text()).get("skipped", []):
                    col.skipped.append((s["cell"], f"config invalid on this build: {s['reason']}"))
            except (OSError, ValueError):
                pass
            cells = [d for kind in KINDS for d in sorted(q.parent for q in p.glob(kind.pattern()))]
            n_ok = 0
            for d in cells:
                r, why = read_result(d)
                if r is None:
                    col.skipped.append((d.relative_to(p).as_posix().removeprefix("cells/"), why))
                    continue
                col.add(r, d)
                n_ok += 1
            if n_ok == 0:
                reasons = "; ".join(f"{c}: {w}" for c, w in col.skipped[-3:]) or "no cells"
                raise DynaformerError(f"'{p}' holds no finished run ({reasons})")
        elif (p / "result.json").exists() or (p / "cell.json").exists():
            r, why = read_result(p)
            if r is None:
                raise DynaformerError(f"'{p}': {why}")
            col.add(r, p)
        elif (p / "run.json").exists():
            raise DynaformerError(f"'{p}' is a training run folder without study results; run it through "
                                  f"`dynaformer compare` (or give the compare folder)")
        else:
            raise DynaformerError(f"'{p}' is not a compare folder or a cell folder (no grid.json or result.json)")
    for v in col.results:
        order = sorted(range(len(col.results[v])), key=lambda i: col.results[v][i]["seed"])
        col.results[v] = [col.results[v][i] for i in order]
        col.dirs[v] = [col.dirs[v][i] for i in order]
    for by_variant in col.encoder.values():
        for v in by_variant:
            by_variant[v].sort(key=lambda r: r["seed"])
    return col
