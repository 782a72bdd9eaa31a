"""A comparison grid: a base config, named variants (config overrides) × seeds, an evaluation plan.

    # configs/grid-cpu.yaml
    model: {n_layer: 4, d_model: 128, ...}        # the base (same sections as `train --config`)
    train: {max_steps: 300, data: "task:suite?...", ...}
    variants:                                     # name → overrides (flat field names or model:/train:)
      baseline: {}
      dyn_residual: {residual: dynamic}
      baseline_large: {d_model: 160}
      fixed_window: {span: fixed, match_reach: dyn_span}   # window = the trained dyn_span's mean reach
    seeds: 3                                      # or a list of seeds
    match: tokens                                 # or wall_clock (with wall_clock_s per cell)
    eval: {n_per_distance: 40, text_tokens: 16384, multiples: [1, 2, 4], cost_lengths: [1024, 2048, 4096]}
    questions: {reference: baseline, residual: dyn_residual, span: dyn_span,
                controls: {residual: [static_residual], span: [fixed_window, per_head]}}
    encoder:                                      # optional: the understanding study (seed 000's NLU tasks)
      model: {n_layer: 2, context_len: 256}       # overrides of the base model (causal is set false)
      finetune: {n_train: 1500, max_steps: 200}   # fine-tuning fields (task and train, flat) of every encoder cell
      tasks: {keyword: {distance: 16}, entail: {}}  # generated tasks (a list, or name → finetune overrides)
      variants: [baseline, dyn_residual, dyn_span, both]  # grid variants whose model overrides apply
      pretrain: {data: "builtin:stories", max_steps: 600}  # optional: masked-LM pretraining (train fields)

Encoder cells fine-tune a bidirectional classifier on each task, for every listed variant and seed —
from scratch, or, with `pretrain`, from that variant and seed's masked-LM pretrained encoder (one
pretraining cell feeds every task); the report compares their accuracy with the reference variant's.

Two variant keys are options the study resolves itself, not config fields (VARIANT_OPTIONS). `seeds: N`
runs only the grid's first N seeds for that variant (controls may take fewer seeds than the variants the
questions test).
`match_reach: V` makes a `fixed` window control of equal attention work: each seed's cell waits for
variant V's cell of the same seed and sets `span_window` to the window whose keys per query equal
those V's trained model attends on held-out windows (model/span_stats.py).

`eval.cost_lengths` are the sequence lengths at which `report` times every trained model's training
step (forward + backward) and its decoding, interleaved (study/cost.py); a length whose training
step would not fit in this machine's memory is refused before anything trains.

A variant whose overrides do not validate against the installed ModelConfig/TrainConfig (e.g. a
residual kind this build does not have) is an error naming the variant — or, with skip_invalid, a
skipped cell that the report lists with the reason.

The `eval`, `questions` and `encoder` sections are dataclasses read through configtools (GridEval,
GridQuestions, GridEncoder), so a bad value is an error naming its field (`grid.eval.n_per_distance: ...`); the
Grid keeps each as the plain record grid.json and the cells hold.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from ..configtools import from_dict, read_yaml_mapping, to_dict
from ..data.tasks import TASKS, check_task_data, is_task_spec
from ..errors import ConfigError, DynaformerError
from ..model import ModelConfig
from ..model.span import learns_span
from ..train.config import TrainConfig, split_sections
from ..train.finetune import FinetuneConfig, flat_record, read_finetune
from .kinds import ENCODER, ENCODER_PRETRAIN, LM, CellKind


@dataclass
class GridMatch:
    """How cells are matched: `tokens` (every cell the same steps) or `wall_clock` (steps calibrated so each
    variant trains about `wall_clock_s` seconds)."""

    match: Literal["tokens", "wall_clock"] = "tokens"
    wall_clock_s: float | None = None


@dataclass
class VariantOptions:
    """A variant's keys that the study resolves itself (VARIANT_OPTIONS), not config fields."""

    seeds: int | None = None  # only the grid's first N seeds for this variant
    match_reach: str | None = None  # a fixed window sized to this learned-span variant's trained reach


@dataclass
class GridEval:
    """`eval:` — how every trained cell is evaluated (study/cell.py), and the lengths its cost is timed at."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # every long-range task of the registry
    n_per_distance: int = 40  # long-range examples per distance
    fractions: list[float] = field(default_factory=lambda: [1 / 16, 1 / 8, 1 / 4, 1 / 2, 7 / 8])  # of the context
    text_tokens: int = 16384  # held-out tokens for bits per byte
    multiples: list[int] = field(default_factory=lambda: [1, 2, 4])  # of the training context, for long text
    diag_windows: int = 8
    batch_size: int = 16
    cost_lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096])  # study/cost.py
    cost_repeats: int = 3

    def validate(self) -> None:
        """Evaluation settings that would fail after training fail now."""
        for t in self.tasks:
            if t not in TASKS:
                raise ConfigError(f"grid.eval.tasks: unknown task '{t}' (known: {', '.join(TASKS)})")
        for name in ("tasks", "multiples", "cost_lengths", "fractions"):
            if not getattr(self, name):
                raise ConfigError(f"grid.eval.{name}: must not be empty")
        for name in ("multiples", "cost_lengths"):
            if any(v <= 0 for v in getattr(self, name)):
                raise ConfigError(f"grid.eval.{name}: expected positive integers, got {getattr(self, name)}")
        for name in ("n_per_distance", "text_tokens", "diag_windows", "batch_size", "cost_repeats"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"grid.eval.{name}: must be > 0, got {getattr(self, name)}")
        if not all(0 < f <= 1 for f in self.fractions):
            raise ConfigError(f"grid.eval.fractions: expected fractions of the context in (0, 1], got "
                              f"{self.fractions}")


@dataclass
class GridQuestions:
    """`questions:` — the variants that answer the study's questions, and their controls. A question whose variant
    the grid lacks is reported as not tested; a control must be a variant of the grid (checked by the grid)."""

    reference: str | None = "baseline"
    residual: str | None = "dyn_residual"
    span: str | None = "dyn_span"
    size_matched: str | None = "baseline_large"
    controls: dict[str, list[str] | None] | None = field(default_factory=dict)  # residual: [...], span: [...]
    # The newest methods that do the question's job another way (hyper-connections, forgetting attention, ...),
    # each read against the question's mechanism and the reference in the report's "Relatives" section.
    relatives: dict[str, list[str] | None] | None = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.controls = {k: list(v or []) for k, v in (self.controls or {}).items()}
        self.relatives = {k: list(v or []) for k, v in (self.relatives or {}).items()}

    def validate(self) -> None:
        for name in ("controls", "relatives"):
            if any(k not in ("residual", "span") for k in getattr(self, name)):
                raise ConfigError(f"grid.questions.{name}: expected {{residual: [variants], span: [variants]}}")


ENCODER_TASKS = ("keyword", "entail", "listops")
_ENCODER_VARIANTS = ("baseline", "dyn_residual", "dyn_span", "both")  # encoder.variants' default, where present


@dataclass
class GridEncoder:
    """`encoder:` — the understanding study. Its model, finetune and pretrain mappings are overrides, checked when
    each cell's config is resolved (resolve_encoder, resolve_pretrain)."""

    model: dict | None = None  # overrides of the base model (causal is set false)
    finetune: dict | None = None  # fine-tuning fields (flat: task and train) shared by every encoder cell
    tasks: list[str] | dict[str, dict | None] | None = None  # a list, or name → its fine-tuning overrides
    variants: list[str] | None = None  # grid variants whose model overrides apply (default: _ENCODER_VARIANTS)
    pretrain: dict | None = None  # masked-LM pretraining first (train fields); none: fine-tune from scratch

    def __post_init__(self) -> None:
        self.model, self.finetune = dict(self.model or {}), dict(self.finetune or {})
        tasks = self.tasks or ["keyword"]
        self.tasks = ({str(t): {} for t in tasks} if isinstance(tasks, list)
                      else {str(k): dict(v or {}) for k, v in tasks.items()})

    def validate(self) -> None:
        for t in self.tasks:
            if t not in ENCODER_TASKS:
                raise ConfigError(f"grid.encoder.tasks: unknown task '{t}' (generated tasks: "
                                  f"{', '.join(ENCODER_TASKS)})")

    def record(self) -> dict:
        """As grid.json and the grid's fingerprint hold it: `pretrain` only when given."""
        out = to_dict(self)
        if out["pretrain"] is None:
            del out["pretrain"]
        return out


EVAL_DEFAULTS = to_dict(GridEval())
QUESTION_DEFAULTS = to_dict(GridQuestions())
VARIANT_OPTIONS = tuple(sorted(f.name for f in fields(VariantOptions)))  # keys the study resolves itself
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Cell:
    variant: str
    seed: int
    model: dict | None  # resolved config dicts (None when the variant is invalid)
    train: dict | None  # language-model and pretraining cells: the training config
    error: str | None = None
    task: str | None = None  # encoder cells: the classification task and the fine-tuning config
    finetune: dict | None = None
    kind: CellKind = LM  # LM | ENCODER_PRETRAIN (masked-LM, feeds the encoder cells) | ENCODER (study/kinds.py)
    match_reach: str | None = None  # LM cells: the variant whose trained keys per query set span_window

    @property
    def key(self) -> str:
        return self.kind.key(self)

    @property
    def steps(self) -> int:
        return self.kind.steps(self)

    def folder(self, out: Path) -> Path:
        """This cell's folder in the grid folder `out`."""
        return self.kind.folder(out, self)


@dataclass
class Grid:
    name: str
    base: dict[str, dict]
    variants: dict[str, dict[str, dict]]
    seeds: list[int]
    variant_options: dict[str, dict] = field(default_factory=dict)  # variant → its VARIANT_OPTIONS, where it has any
    match: str = "tokens"
    wall_clock_s: float | None = None
    eval: dict = field(default_factory=lambda: dict(EVAL_DEFAULTS))
    questions: dict = field(default_factory=lambda: dict(QUESTION_DEFAULTS))
    encoder: dict | None = None  # GridEncoder.record(): {model, finetune, tasks: {name: overrides}, variants, pretrain}

    def to_dict(self) -> dict:
        return {"name": self.name, "base": self.base, "variants": self.variants,
                "variant_options": self.variant_options, "seeds": self.seeds, "match": self.match,
                "wall_clock_s": self.wall_clock_s, "eval": self.eval, "questions": self.questions,
                "encoder": self.encoder}

    def fingerprint(self) -> str:
        """What every cell shares (variants and seeds may be added to a grid folder later)."""
        shared = {k: v for k, v in self.to_dict().items()
                  if k not in ("variants", "variant_options", "seeds", "questions", "name")}
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
            for s in self.seeds[: self.variant_options.get(name, {}).get("seeds", len(self.seeds))]:
                t = to_dict(tcfg)
                t["seed"] = int(s)
                out.append(Cell(name, int(s), to_dict(mcfg), t,
                                match_reach=self.variant_options.get(name, {}).get("match_reach")))
        return out + self.encoder_cells(skip_invalid)

    def encoder_cells(self, skip_invalid: bool = False) -> list[Cell]:
        """Pretraining cells (when the encoder block has `pretrain`) first, then fine-tuning cells."""
        if not self.encoder:
            return []
        pre, out = [], []
        for name in self.encoder["variants"]:
            if name not in self.variants:
                continue  # a variant left out of this run (--variants)
            if self.encoder.get("pretrain") is not None:
                try:
                    mcfg, tcfg = resolve_pretrain(self.base, self.encoder, self.variants[name], name)
                except ConfigError as e:
                    if not skip_invalid:
                        raise
                    pre += [Cell(name, s, None, None, error=str(e), kind=ENCODER_PRETRAIN) for s in self.seeds]
                else:
                    pre += [Cell(name, int(s), to_dict(mcfg), {**to_dict(tcfg), "seed": int(s)},
                                 kind=ENCODER_PRETRAIN) for s in self.seeds]
            for task, overrides in self.encoder["tasks"].items():
                try:
                    mcfg, fcfg = resolve_encoder(self.base, self.encoder, self.variants[name], task, overrides, name)
                except ConfigError as e:
                    if not skip_invalid:
                        raise
                    out += [Cell(name, s, None, None, error=str(e), task=task, kind=ENCODER) for s in self.seeds]
                    continue
                for s in self.seeds:
                    f = {**flat_record(fcfg), "seed": int(s)}
                    out.append(Cell(name, int(s), to_dict(mcfg), None, task=task, finetune=f, kind=ENCODER))
        return pre + out


def resolve(base: dict[str, dict], overrides: dict[str, dict], variant: str) -> tuple[ModelConfig, TrainConfig]:
    m = {**base.get("model", {}), **overrides.get("model", {})}
    t = {**base.get("train", {}), **overrides.get("train", {})}
    try:
        mcfg, tcfg = from_dict(ModelConfig, m, "model"), from_dict(TrainConfig, t, "train")
        if is_task_spec(tcfg.data):
            check_task_data(tcfg.data, mcfg.context_len)
    except DynaformerError as e:
        raise ConfigError(f"variant '{variant}': {e}") from None
    return mcfg, tcfg


def resolve_encoder(base: dict[str, dict], encoder: dict, variant_overrides: dict[str, dict], task: str,
                    task_overrides: dict, variant: str) -> tuple[ModelConfig, FinetuneConfig]:
    """(ModelConfig, FinetuneConfig) of an encoder cell: base model + encoder model + the variant's model
    overrides, bidirectional; the encoder's finetune fields + the task's."""
    m = {**base.get("model", {}), **encoder.get("model", {}), **variant_overrides.get("model", {}), "causal": False}
    f = {**encoder.get("finetune", {}), **task_overrides, "task": task}
    try:
        mcfg = from_dict(ModelConfig, m, "model")
        fcfg = read_finetune(f, "finetune")
    except ConfigError as e:
        raise ConfigError(f"encoder variant '{variant}', task '{task}': {e}") from None
    return mcfg, fcfg


def resolve_pretrain(base: dict[str, dict], encoder: dict, variant_overrides: dict[str, dict], variant: str):
    """(ModelConfig, TrainConfig) of a masked-LM pretraining cell: the encoder model of the variant, the
    grid's base training fields + the encoder's `pretrain` fields, objective mlm."""
    m = {**base.get("model", {}), **encoder.get("model", {}), **variant_overrides.get("model", {}), "causal": False}
    t = {**base.get("train", {}), **encoder["pretrain"], "objective": "mlm"}
    try:
        return from_dict(ModelConfig, m, "model"), from_dict(TrainConfig, t, "train")
    except ConfigError as e:
        raise ConfigError(f"encoder pretraining of variant '{variant}': {e}") from None


def _parse_encoder(raw, variants: set[str]) -> dict | None:
    if raw is None:
        return None
    enc = from_dict(GridEncoder, raw, "grid.encoder")
    enc.variants = enc.variants or [v for v in _ENCODER_VARIANTS if v in variants]
    if not enc.variants:
        raise ConfigError("grid.encoder.variants: expected a list of grid variant names")
    missing = [v for v in enc.variants if v not in variants]
    if missing:
        raise ConfigError(f"grid.encoder.variants: '{missing[0]}' is not a variant of this grid")
    return enc.record()


def load_grid(path: str | Path, variants: list[str] | None = None, seeds: int | list[int] | None = None) -> Grid:
    p = Path(path)
    raw = read_yaml_mapping(p, "grid")
    return grid_from_dict(raw, p.stem, variants, seeds)


def grid_from_dict(raw: dict, name: str = "grid", variants: list[str] | None = None,
                   seeds: int | list[int] | None = None) -> Grid:
    """A Grid from a grid mapping (a parsed YAML), every part checked now with the key named; `variants` and
    `seeds` restrict or replace the grid's own (the variants a kept one matches the reach of stay)."""
    raw = copy.deepcopy(raw)
    known = {"name", "model", "train", "variants", "seeds", "match", "wall_clock_s", "eval", "questions", "encoder"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"grid: unknown key '{unknown[0]}' (known: {', '.join(sorted(known))})")
    base = split_sections({k: raw.get(k, {}) or {} for k in ("model", "train")}, "grid base")
    vs = raw.get("variants") or {"baseline": {}}
    parsed, options = _parse_variants(vs)
    all_names = set(vs)
    _check_variant_options(base, parsed, options, all_names)
    if variants:
        parsed = _select(parsed, options, variants)
    seed_list = _parse_seeds(raw.get("seeds", 3) if seeds is None else seeds)
    match, wall = _parse_match(raw)
    ev = to_dict(from_dict(GridEval, raw.get("eval") or {}, "grid.eval"))
    qs = _parse_questions(raw.get("questions"), all_names)
    encoder = _parse_encoder(raw.get("encoder"), all_names)
    grid = Grid(str(raw.get("name", name)), base, parsed, seed_list, {v: options[v] for v in parsed if options[v]},
                match, wall, ev, qs, encoder)
    resolve(base, {}, "(base)")  # the base itself must validate
    from .cost import check_lengths, check_study_memory

    resolved = []
    for v, ov in parsed.items():
        try:
            resolved.append((v, *resolve(base, ov, v)))
        except ConfigError:
            pass  # reported by cells() (or skipped with skip_invalid)
    for v, mcfg, tcfg in resolved:
        _check_tasks_fit(v, mcfg, tcfg, ev)
    check_lengths(ev["cost_lengths"], [m for _, m, _ in resolved])
    check_study_memory([(m, t) for _, m, t in resolved], ev)
    return grid


def _check_tasks_fit(variant: str, mcfg: ModelConfig, tcfg: TrainConfig, ev: dict) -> None:
    """Every task a cell trains on fits each length it is trained at (the context, and the staged short rows),
    and every evaluated task fits the context: one line naming the task and its limit, before anything trains."""
    from ..data.tasks import make_task, parse_task_spec, task_range

    where = f"grid variant '{variant}'"
    if is_task_spec(tcfg.data):
        spec = parse_task_spec(tcfg.data)
        lengths = [spec.length or mcfg.context_len] + ([tcfg.short_context] if tcfg.short_context else [])
        for task in spec.make():
            for L in lengths:
                L = min(L, spec.length or L)
                try:
                    lo, hi = task_range(task, L, spec.dist)
                except DynaformerError as e:
                    raise ConfigError(f"{where}: {e}") from None
                if hi < lo:
                    raise ConfigError(f"{where}: task {task.name}: length {L} is too short for this task "
                                      f"(no distance is valid at this length)")
    params = parse_task_spec(tcfg.data).params if is_task_spec(tcfg.data) else {}
    for name in ev["tasks"]:
        lo, hi = make_task(name, **params.get(name, {})).distance_range(mcfg.context_len)
        if hi < lo:
            raise ConfigError(f"grid.eval.tasks: task {name} does not fit the context of {where} "
                              f"({mcfg.context_len} tokens: no distance is valid at this length)")


def _parse_variants(vs) -> tuple[dict[str, dict[str, dict]], dict[str, dict]]:
    """name → config overrides in sections, and name → the study's own options (VARIANT_OPTIONS) taken out of them."""
    if not isinstance(vs, dict):
        raise ConfigError("grid.variants: expected a mapping name → overrides")
    parsed, options = {}, {}
    for vname, ov in vs.items():
        if not _NAME_RE.match(str(vname)):
            raise ConfigError(f"grid.variants: bad variant name '{vname}' (letters, digits, _ . - only)")
        ov = dict(ov or {})
        options[str(vname)] = {k: ov.pop(k) for k in VARIANT_OPTIONS if k in ov}
        parsed[str(vname)] = split_sections(ov, f"variant '{vname}'")
    return parsed, options


def _check_variant_options(base: dict[str, dict], parsed: dict[str, dict], options: dict[str, dict],
                           names: set) -> None:
    """`seeds: N` is a positive count; `match_reach: V` sits on a fixed window and names a learned-span variant."""
    for vname, h in options.items():
        from_dict(VariantOptions, h, f"variant '{vname}'")  # types, each error naming variant and key
        n = h.get("seeds")
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ConfigError(f"variant '{vname}': seeds must be a positive integer (the first N of the grid's seeds), "
                              f"got {n!r}")
        src = h.get("match_reach")
        if src is None:
            continue
        if src not in names or src == vname:
            raise ConfigError(f"variant '{vname}': match_reach names '{src}', which is not another variant of this "
                              f"grid")
        if resolve(base, parsed[vname], vname)[0].span != "fixed":
            raise ConfigError(f"variant '{vname}': match_reach sets a fixed window; add span: fixed")
        if not learns_span(resolve(base, parsed[src], src)[0].span):
            raise ConfigError(f"variant '{vname}': match_reach needs a learned-span variant, '{src}' has none")


def _select(parsed: dict[str, dict], options: dict[str, dict], variants: list[str]) -> dict[str, dict]:
    """The variants asked for (`compare --variants`), and those whose reach a kept fixed window matches."""
    missing = [v for v in variants if v not in parsed]
    if missing:
        raise ConfigError(f"unknown variant '{missing[0]}' (grid has: {', '.join(parsed)})")
    needed = [h["match_reach"] for v, h in options.items() if v in variants and "match_reach" in h]
    return {v: parsed[v] for v in variants + [n for n in needed if n not in variants]}


MAX_SEEDS = 1000  # seeds per grid: a grid's cells are variants × seeds, each a training run


def _parse_seeds(s) -> list[int]:
    if isinstance(s, int) and not isinstance(s, bool) and s > MAX_SEEDS:  # before a list of them is built
        raise ConfigError(f"grid.seeds: at most {MAX_SEEDS:,} seeds (each is one training run per variant), got {s:,}")
    if isinstance(s, int) and not isinstance(s, bool) and s >= 1:
        seed_list = list(range(s))
    elif isinstance(s, list) and s and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in s):
        seed_list = [int(x) for x in s]
    else:
        raise ConfigError(f"grid.seeds: expected a number of seeds (≥ 1) or a list of seeds (integers ≥ 0), got {s!r}")
    if not seed_list:
        raise ConfigError("grid.seeds: need at least one seed")
    if len(seed_list) > MAX_SEEDS:
        raise ConfigError(f"grid.seeds: at most {MAX_SEEDS:,} seeds (each is one training run per variant), got "
                          f"{len(seed_list):,}")
    return seed_list


def _parse_match(raw: dict) -> tuple[str, float | None]:
    top = from_dict(GridMatch, {k: raw[k] for k in ("match", "wall_clock_s") if k in raw}, "grid")
    if top.match == "wall_clock" and not (top.wall_clock_s is not None and top.wall_clock_s > 0):
        raise ConfigError("grid.wall_clock_s: match: wall_clock needs a positive number of seconds per cell")
    # The number as written (an int stays an int): grid fingerprints of existing folders hash it that way.
    return top.match, raw.get("wall_clock_s")


def _parse_questions(raw, names: set[str]) -> dict:
    qs = to_dict(from_dict(GridQuestions, raw or {}, "grid.questions"))
    for kind in ("controls", "relatives"):  # a typo would silently drop the rows
        for q, cs in qs[kind].items():
            for c in cs:
                if c not in names:
                    raise ConfigError(f"grid.questions.{kind}.{q}: '{c}' is not a variant of this grid")
    return qs
