"""A comparison grid: a base config, named variants (config overrides) × seeds, an evaluation plan.

    # configs/grid-cpu.yaml
    model: {n_layer: 4, d_model: 128, ...}        # the base (same sections as `train --config`)
    train: {max_steps: 300, data: "task:suite?...", ...}
    variants:                                     # name → overrides (flat field names or model:/train:)
      baseline: {}
      dyn_residual: {residual: dynamic}
      baseline_large: {d_model: 160}
    seeds: 3                                      # or a list of seeds
    match: tokens                                 # or wall_clock (with wall_clock_s per cell)
    eval: {n_per_distance: 40, text_tokens: 16384, multiples: [1, 2, 4]}
    questions: {reference: baseline, residual: dyn_residual, span: dyn_span}

A variant whose overrides do not validate against the installed ModelConfig/TrainConfig (e.g. a
residual kind this build does not have) is an error naming the variant — or, with skip_invalid, a
skipped cell that the report lists with the reason.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configtools import from_dict, read_yaml_mapping, to_dict
from ..errors import ConfigError
from ..model import ModelConfig
from ..train.config import TrainConfig, split_sections

EVAL_DEFAULTS: dict[str, Any] = {"tasks": ["passkey", "mqar", "selcopy", "storyqa"], "n_per_distance": 40,
                                 "fractions": [1 / 16, 1 / 8, 1 / 4, 1 / 2, 7 / 8], "text_tokens": 16384,
                                 "multiples": [1, 2, 4], "diag_windows": 8, "batch_size": 16}
QUESTION_DEFAULTS = {"reference": "baseline", "residual": "dyn_residual", "span": "dyn_span",
                     "size_matched": "baseline_large"}
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Cell:
    variant: str
    seed: int
    model: dict | None  # resolved config dicts (None when the variant is invalid)
    train: dict | None
    error: str | None = None

    @property
    def key(self) -> str:
        return f"{self.variant}/seed{self.seed}"


@dataclass
class Grid:
    name: str
    base: dict[str, dict]
    variants: dict[str, dict[str, dict]]
    seeds: list[int]
    match: str = "tokens"
    wall_clock_s: float | None = None
    eval: dict = field(default_factory=lambda: dict(EVAL_DEFAULTS))
    questions: dict = field(default_factory=lambda: dict(QUESTION_DEFAULTS))

    def to_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "variants": self.variants, "seeds": self.seeds,
                "match": self.match, "wall_clock_s": self.wall_clock_s, "eval": self.eval,
                "questions": self.questions}

    def fingerprint(self) -> str:
        """What every cell shares (variants and seeds may be added to a grid folder later)."""
        shared = {k: v for k, v in self.to_dict().items() if k not in ("variants", "seeds", "questions", "name")}
        return hashlib.sha256(json.dumps(shared, sort_keys=True).encode()).hexdigest()[:16]

    def cells(self, skip_invalid: bool = False) -> list[Cell]:
        out = []
        for name, ov in self.variants.items():
            try:
                mcfg, tcfg = resolve(self.base, ov, name)
            except ConfigError as e:
                if not skip_invalid:
                    raise
                out += [Cell(name, s, None, None, error=str(e)) for s in self.seeds]
                continue
            for s in self.seeds:
                t = to_dict(tcfg)
                t["seed"] = int(s)
                out.append(Cell(name, int(s), to_dict(mcfg), t))
        return out


def resolve(base: dict[str, dict], overrides: dict[str, dict], variant: str) -> tuple[ModelConfig, TrainConfig]:
    m = {**base.get("model", {}), **overrides.get("model", {})}
    t = {**base.get("train", {}), **overrides.get("train", {})}
    try:
        return from_dict(ModelConfig, m, "model"), from_dict(TrainConfig, t, "train")
    except ConfigError as e:
        raise ConfigError(f"variant '{variant}': {e}") from None


def load_grid(path: str | Path, variants: list[str] | None = None, seeds: int | list[int] | None = None) -> Grid:
    p = Path(path)
    raw = read_yaml_mapping(p, "grid")
    return grid_from_dict(raw, p.stem, variants, seeds)


def grid_from_dict(raw: dict, name: str = "grid", variants: list[str] | None = None,
                   seeds: int | list[int] | None = None) -> Grid:
    raw = copy.deepcopy(raw)
    known = {"name", "model", "train", "variants", "seeds", "match", "wall_clock_s", "eval", "questions"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"grid: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    base = split_sections({k: raw.get(k, {}) or {} for k in ("model", "train")}, "grid base")
    vs = raw.get("variants") or {"baseline": {}}
    if not isinstance(vs, dict):
        raise ConfigError("grid.variants: expected a mapping name → overrides")
    parsed = {}
    for vname, ov in vs.items():
        if not _NAME_RE.match(str(vname)):
            raise ConfigError(f"grid.variants: bad variant name '{vname}' (letters, digits, _ . - only)")
        parsed[str(vname)] = split_sections(ov or {}, f"variant '{vname}'")
    if variants:
        missing = [v for v in variants if v not in parsed]
        if missing:
            raise ConfigError(f"unknown variant '{missing[0]}' (grid has: {', '.join(parsed)})")
        parsed = {v: parsed[v] for v in variants}
    s = raw.get("seeds", 3) if seeds is None else seeds
    seed_list = list(range(int(s))) if isinstance(s, int | str) else [int(x) for x in s]
    if not seed_list:
        raise ConfigError("grid.seeds: need at least one seed")
    match = raw.get("match", "tokens")
    if match not in ("tokens", "wall_clock"):
        raise ConfigError(f"grid.match: expected tokens or wall_clock, got {match!r}")
    wall = raw.get("wall_clock_s")
    if match == "wall_clock" and not (isinstance(wall, int | float) and wall > 0):
        raise ConfigError("grid.wall_clock_s: match: wall_clock needs a positive number of seconds per cell")
    ev = dict(EVAL_DEFAULTS)
    for k, v in (raw.get("eval") or {}).items():
        if k not in EVAL_DEFAULTS:
            raise ConfigError(f"grid.eval: unknown key '{k}' (known: {', '.join(EVAL_DEFAULTS)})")
        ev[k] = v
    from ..data.tasks import make_task

    for t in ev["tasks"]:
        make_task(t)
    qs = {**QUESTION_DEFAULTS, **(raw.get("questions") or {})}
    grid = Grid(str(raw.get("name", name)), base, parsed, seed_list, match, wall, ev, qs)
    resolve(base, {}, "(base)")  # the base itself must validate
    return grid
