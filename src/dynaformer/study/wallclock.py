"""Equal training wall-clock: the tested variant and the reference read at the same training time.

Every cell of a `match: tokens` grid trains the same steps, so a variant whose steps are cheaper has also
trained for less time. For each question this module puts each cell's evaluations (metrics.jsonl) on a clock of
training time alone, takes t* = the shorter of the two arms' mean training times, reads every cell's curve at
t*, and judges the options' accuracy and perplexity parts again on those readings:

- training time, side by side (preferred): when the report has timed every cell's trained model at the shapes
  of its training stages (study/cost.py measure_stages, interleaved round-robin, with the threads the cells
  trained with), step s costs the sum of its stages' ms/step. This clock does not see what else ran on the machine
  while a cell trained (cells of one grid train at different times, beside different loads).
- training time from the logs (when the cost step did not run): the sum over the log rows of ms_step × (steps
  since the previous log row). The trainer's ms_step
  is the mean time of the steps since its last log, evaluation or checkpoint, timed from when that pause ended,
  so the sum leaves evaluation and checkpoint time out. The first log window also holds one-off start-up (kernel
  compilation on first use): when it is slower than the next window its steps are timed at the next window's
  rate (the difference is recorded per cell as startup_s). elapsed_s, which includes all of these, is used only
  for a run whose log has no ms_step (the clock used is recorded per arm).
- reading at t*: linear interpolation, in training time, between the two evaluations around t*; a cell that
  finished training before t* is read at its last evaluation; a cell whose first evaluation comes after t* has
  no reading (its parts are then inconclusive: not recorded).
- what is read: the curve's own metrics, held-out bits per byte (val_bpb) and the task probe's teacher-forced exact
  match on validation examples of the training tasks (val_exact_TASK). They stand in for the by-distance
  evaluation's metrics (CURVE_FOR) but are not it: no distance buckets, no greedy decoding, no ROUGE.
- the curve of a run scheduled for its full steps, read part-way, is not the curve of a run scheduled to stop at
  t* (its learning rate has not decayed yet): the readings are a lower bound for the arm that stopped early.

Parts with no curve metric (cost, gradients, attention, long-text bpb) keep their equal-token measurement.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from ..train.metrics import read_metrics
from .stats import mean_sd
from .verdicts import (
    ALPHA,
    D_ACC,
    D_BPB,
    QUESTIONS,
    WALL_CLOCK,
    All,
    Any_,
    Not,
    Test,
    compare_control,
    family,
    judge,
)

# An option-test metric → the training curve's metric that stands for it at equal wall-clock.
CURVE_FOR = {"val_bpb": "val_bpb", "qa_acc": "val_exact_storyqa", "summary_rouge": "val_exact_summary",
             "far_acc": "val_exact_passkey"}

HOW = {
    "clock": "side by side where the report timed the cells' training steps (side_by_side): each step at the "
             "ms/step of its stage's shape, timed in the report step for every trained model interleaved "
             "round-robin, with the threads the cells trained with (forward, backward and an AdamW update), so "
             "that what else ran on the machine while a cell trained does not enter; otherwise the cells' own "
             "logs (ms_step): Σ over the log rows of ms_step × the steps since the previous log row, evaluation "
             "and checkpoint pauses left out, the first log window (which also holds one-off start-up such as "
             "kernel compilation) at the next window's rate when it is slower; elapsed_s only where a log has no "
             "ms_step",
    "t_star": "the shorter of the two arms' mean training times",
    "reading": "linear interpolation in training time between the two evaluations around t*; a cell that finished "
               "before t* is read at its last evaluation; none before a cell's first evaluation",
    "metrics": "the training curve's teacher-forced metrics on validation examples of the training tasks "
               "(val_exact_TASK) and held-out bits per byte (val_bpb), not the full by-distance evaluation; "
               + ", ".join(f"{k} → {v}" for k, v in CURVE_FOR.items()),
}


class Curve(NamedTuple):
    evals: list[dict]  # the evaluation rows, each with "train_s": training seconds when it was taken
    total: float | None  # training seconds at the end of the log
    clock: str  # "ms_step" or "elapsed_s"
    startup_s: float  # one-off start-up time left out of the first log window (kernel compilation, warm-up)


def eval_curve(rows: list[dict]) -> Curve:
    """A run's evaluations on its training clock (module docstring). The first log window also holds the run's
    one-off start-up (the band kernel compiles on first use, about a minute, in whichever cell needs it first):
    when it is slower than the next window, its steps are timed at the next window's rate and the difference is
    kept as startup_s. Steps redone after a reloaded checkpoint count again: they were trained."""
    if not any("ms_step" in r for r in rows):
        evals = [{**r, "train_s": float(r["elapsed_s"])} for r in rows if "val_loss" in r and "elapsed_s" in r]
        ends = [float(r["elapsed_s"]) for r in rows if "elapsed_s" in r]
        return Curve(evals, (max(ends) if ends else None), "elapsed_s", 0.0)
    logs = [r for r in rows if "ms_step" in r and "val_loss" not in r]
    first_rate = float(logs[0]["ms_step"]) / 1000
    if len(logs) > 1 and float(logs[1]["ms_step"]) / 1000 < first_rate:
        first_rate = float(logs[1]["ms_step"]) / 1000
    startup = (float(logs[0]["ms_step"]) / 1000 - first_rate) * int(logs[0]["step"])
    cum, last_step, rate, evals, first = 0.0, 0, 0.0, [], True
    for r in rows:
        if r.get("event") == "reloaded_checkpoint":
            last_step = int(r["step"])
        elif "val_loss" in r:
            evals.append({**r, "train_s": cum + max(0, int(r["step"]) - last_step) * rate})
        elif "ms_step" in r:
            rate = first_rate if first else float(r["ms_step"]) / 1000
            first = False
            cum += max(0, int(r["step"]) - last_step) * rate
            last_step = int(r["step"])
    return Curve(evals, cum, "ms_step", startup)


def read_at(points: list[tuple[float, float]], t: float) -> tuple[float | None, list[int]]:
    """The curve (training seconds, value) at time t, and the indices of the points it was read from: linear
    interpolation between the points around t, the last point when t is past the end, None before the first."""
    pts = sorted((x, y, i) for i, (x, y) in enumerate(points) if y is not None)
    if not pts or t < pts[0][0]:
        return None, []
    if t >= pts[-1][0]:
        return pts[-1][1], [pts[-1][2]]
    for (x0, y0, i0), (x1, y1, i1) in zip(pts, pts[1:], strict=False):
        if t == x0:
            return y0, [i0]
        if x0 < t < x1:
            return y0 + (y1 - y0) * (t - x0) / (x1 - x0), [i0, i1]
    return None, []  # unreachable: t lies within the points, or on the last one


def stage_curve(rows: list[dict], cost: dict, steps: int) -> Curve:
    """A run's evaluations on the side-by-side clock: the training time of step s is the sum over its stages of
    the steps taken in that stage × that stage's ms/step as the report timed it for this model (study/cost.py
    measure_stages). Steps redone after an interruption are not counted: they are the machine's, not the
    variant's."""
    stages = [(int(n), float(ms) / 1000) for (n, _, _), ms in zip(cost["stages"], cost["stage_ms"], strict=True)]

    def at(step: int) -> float:
        t, left = 0.0, step
        for n, rate in stages:
            take = min(left, n)
            t, left = t + take * rate, left - take
        return t + left * stages[-1][1]

    evals = [{**r, "train_s": at(int(r["step"]))} for r in rows if "val_loss" in r and "step" in r]
    return Curve(evals, at(steps), "side_by_side", 0.0)


def cell_curve(cell_dir: Path, result: dict | None = None, clock: str = "ms_step") -> Curve | None:
    """The cell's evaluations on `clock`: "side_by_side" (the report's stage timings in result["cost"]) or the
    ms/step the cell logged."""
    path = Path(cell_dir) / "run" / "metrics.jsonl"
    if not path.exists():
        return None
    rows = read_metrics(path)
    if clock == "side_by_side":
        return stage_curve(rows, result["cost"], int(result.get("steps") or rows[-1].get("step", 0)))
    return eval_curve(rows)


def _has_stage_times(r: dict) -> bool:
    c = r.get("cost") or {}
    return bool(c.get("stage_ms")) and len(c["stage_ms"]) == len(c.get("stages") or ())


def curve_metrics(curves: list[Curve]) -> list[str]:
    """The curve metrics every evaluation of these cells recorded: val_bpb and the exact-match columns."""
    names = None
    for c in curves:
        for e in c.evals:
            keys = {k for k in e if k == "val_bpb" or k.startswith("val_exact")}
            names = keys if names is None else names & keys
    return sorted(names or [])


def to_wall_clock(claim):
    """The claim with every part that has a curve metric (CURVE_FOR) read on the curve at equal training time;
    None when no part has one."""
    if isinstance(claim, Test):
        if claim.metric not in CURVE_FOR:
            return None
        return Test(WALL_CLOCK + CURVE_FOR[claim.metric], claim.direction, claim.delta, claim.relative)
    if isinstance(claim, All | Any_):
        parts = [to_wall_clock(p) for p in claim.parts]
        if all(p is None for p in parts):
            return None
        return type(claim)([new if new is not None else old for new, old in zip(parts, claim.parts, strict=True)])
    if isinstance(claim, Not):
        inner = to_wall_clock(claim.part)
        return None if inner is None else Not(inner)
    return None  # per-layer claims have no curve metric


def _reading_test(name: str) -> Test:
    return Test(WALL_CLOCK + name, -1, D_BPB) if name == "val_bpb" else Test(WALL_CLOCK + name, +1, D_ACC)


def wall_clock_records(col) -> dict:
    """report.json's "wall_clock": per question, the arms' training times, t*, each cell's readings, the curve
    metrics compared at t* (Holm within that table) and the options with a curve metric judged again (Holm within
    the re-judged options' tests)."""
    ref = col.questions.get("reference", "baseline")
    out: dict = {"how": HOW, "alpha": ALPHA, "questions": {}}
    for q in QUESTIONS:
        var = col.questions.get(q.key)
        if var not in col.results or ref not in col.results or var == ref:
            continue
        arms = {"variant": (var, col.dirs[var]), "reference": (ref, col.dirs[ref])}
        both = [r for name, _ in arms.values() for r in col.results[name]]
        clock = "side_by_side" if both and all(_has_stage_times(r) for r in both) else "ms_step"
        curves = {k: [cell_curve(d, r, clock) for d, r in zip(dirs, col.results[name], strict=True)]
                  for k, (name, dirs) in arms.items()}
        missing = [str(d) for k, (_, dirs) in arms.items() for d, c in zip(dirs, curves[k], strict=True)
                   if c is None or c.total is None]
        if missing:
            out["questions"][q.key] = {"variant": var, "reference": ref, "why": f"no metrics.jsonl in {missing[0]}"}
            continue
        totals = {k: [c.total for c in cs] for k, cs in curves.items()}
        means = {k: mean_sd(v)[0] for k, v in totals.items()}
        t_star = min(means.values())
        names = curve_metrics(curves["variant"] + curves["reference"])
        cells, with_readings = {}, {}
        for k, (name, _) in arms.items():
            recs, res = [], []
            for r, c in zip(col.results[name], curves[k], strict=True):
                readings, around = {}, []
                for m in names:
                    readings[m], idx = read_at([(e["train_s"], e.get(m)) for e in c.evals], t_star)
                    around = around or [int(c.evals[i]["step"]) for i in idx]
                recs.append({"seed": r.get("seed"), "train_s": c.total, "clock": c.clock, "startup_s": c.startup_s,
                             "steps_read": around, "readings": readings})
                res.append({**r, "wall_clock": readings})
            cells[k], with_readings[k] = recs, res
        V, R = with_readings["variant"], with_readings["reference"]
        tests = [_reading_test(m) for m in names]
        fam_readings = family(tests, V, R, var, ref)
        readings = []
        for t in tests:
            e = compare_control(t, V, R, var, ref, fam_readings)
            if e.v is None or e.r is None:
                e.verdict = "not read"
            readings.append({**e.record(), "metric": t.metric.removeprefix(WALL_CLOCK)})
        claims = [(opt, to_wall_clock(opt.claim)) for opt in q.options]
        claims = [(opt, c) for opt, c in claims if c is not None]
        fam = family([c for _, c in claims], V, R, var, ref)
        options = []
        for opt, c in claims:
            j = judge(c, V, R, var, ref, fam)
            options.append({"option": opt.number, "claim": opt.text, "verdict": j.verdict,
                            "evidence": [e.record(i in j.decisive) for i, e in enumerate(j.evidence)],
                            "decided_by": j.decisive})
        out["questions"][q.key] = {
            "variant": var, "reference": ref, "t_star_s": t_star,
            "train_s": {k: {"mean": means[k], "per_seed": totals[k]} for k in arms},
            "clock": sorted({c["clock"] for cs in cells.values() for c in cs}), "cells": cells,
            "readings": readings, "family_size": fam.size, "options": options}
    return out
