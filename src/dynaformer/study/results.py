"""report.json: every number the report shows, built once from the collected cells, so that the Markdown
and HTML are renderings of it and other tools can read the results.

    {"provenance": {created, command, git_commit, cells_git_commit, dynaformer, torch, cpu_capability, cpu_model,
                    grids, context_len, cells, cells_train_s, span_s},
     "grids", "questions" (the grid's: reference, tested variants, controls), "thresholds",
     "question_text": {question: {title, text, options: [5 × full text], marked}},
     "correction": {method, alpha, power, family, why, mde, contradicted},
     "families":  {question: {size, alpha_m, p: {metric: p}, p_holm: {...}, mde: {...}, variant, reference}},
     "verdicts":  [{question, option, claim, statement, marked_correct, verdict, decided_by: [part index],
                    metric, variant_mean, variant_sd, reference_mean, reference_sd, p, p_holm, mde (of the first
                    deciding part), floor, evidence: [{test, metric, means, sds, n, diff, p, p_holm, mde, verdict,
                    decisive}], vs_size_matched, vs_controls: {control: verdict}}],
     "controls":  [{question, variant, control, metric, verdict, variant_mean, ..., p, p_holm}],
     "relatives": {question: {mechanism, reference, relatives, arms, summary: {arm: {metric: {mean, sd, n}}},
                   comparisons: [{relative, against, metric, verdict, relative_mean, ..., p, p_holm}]}},
     "wall_clock": {how, alpha, questions: {question: {variant, reference, t_star_s, train_s, clock, cells,
                    readings: [...], family_size, options: [{option, claim, verdict, evidence, decided_by}]}}},
     "variants":  {name: {metric: {mean, sd, n}}},
     "longrange": {variant: {task: {distance: [...], exact: [mean per distance], f1?, rouge_l?}}},
     "text":      {variant: [{multiple, context, one_pass_bpb, sliding_bpb}]}  (means over seeds),
     "cost":      {lengths, threads, cpu, repeats, variants: {name: {train_ms, train_ms_sd, decode_ms,
                   decode_ms_sd, kv_bytes}}, crossover: {variant: {train: {...}, decode: {...}}}} | null,
     "limits":    {params, n_layer, d_model, context_len, tokens, seeds, mde_exact, tasks: {task: {exact, sd,
                   per_seed}}, seed_split: [...], not_learned: [...], cpu}  (what the study cannot tell)}

Older report.json files name the marked option `seed_answer` (now `marked_correct`); readers accept both.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..files import write_json_strict
from .cost import crossover, measure_cost, measure_stages, train_stages
from .stats import mde, mean_sd
from .verdicts import (
    ALPHA,
    CONTROL_TESTS,
    D_TIME,
    METRICS,
    POWER,
    QUESTIONS,
    THRESHOLDS,
    Family,
    Test,
    compare_control,
    family,
    is_floor,
    judge,
    metric_label,
    metric_value,
)
from .wallclock import wall_clock_records


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


# --- cost: measured in the report step --------------------------------------------------------------

def attach_cost(col, lengths: list[int], repeats: int, cache_path: Path | None = None) -> dict | None:
    """Time every finished language-model cell's trained model at the cost lengths (plus its training
    context), interleaved (study/cost.py), and put each cell's series under result["cost"]. A cached
    measurement of the same cells and lengths (cache_path) is reused."""
    import json

    from ..data import open_splits
    from ..runs import load_model

    cells = [(v, r, d) for v in col.results for r, d in zip(col.results[v], col.dirs[v], strict=True)]
    if not cells:
        return None
    C = max(int(r["model"]["context_len"]) for _, r, _ in cells)
    lengths = sorted({C, *[int(T) for T in lengths]})
    keys = [f"{v}/seed{r['seed']}" for v, r, _ in cells]
    cached = None
    if cache_path is not None and cache_path.exists():
        try:
            cached = json.loads(cache_path.read_text())
        except ValueError:
            cached = None
    stages = {key: train_stages(r["train"], int(r["model"]["context_len"])) if r.get("train") else []
              for key, (_, r, _) in zip(keys, cells, strict=True)}
    if cached and cached.get("lengths") == lengths and sorted(cached.get("models", {})) == sorted(keys) \
            and cached.get("repeats") == repeats and all(
                cached["models"][k].get("stages") == [list(s) for s in stages[k]] for k in keys):
        cost = cached
    else:
        models, text = {}, None
        for key, (_, _, d) in zip(keys, cells, strict=True):
            models[key], _, ckpt = load_model(d / "run")
            if text is None:
                text = np.asarray(open_splits(d / "run" / "data").val)
        cost = measure_cost(models, text, lengths, repeats)
        timed = {k: m for k, m in models.items() if stages[k]}
        if timed:
            threads = max(int(r["train"].get("threads") or 1) for _, r, _ in cells if r.get("train"))
            per_stage = measure_stages(timed, text, {k: stages[k] for k in timed}, threads, repeats)
            cost["stage_threads"] = threads
            for k in timed:
                cost["models"][k]["stages"] = [list(s) for s in stages[k]]
                cost["models"][k]["stage_ms"] = per_stage[k]
        del models
        if cache_path is not None:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_strict(cache_path, cost)
    for key, (_, r, _) in zip(keys, cells, strict=True):
        r["cost"] = {"lengths": cost["lengths"], **cost["models"][key]}
    return cost


def cost_summary(col, cost: dict | None) -> dict | None:
    if cost is None:
        return None
    ref = col.questions.get("reference", "baseline")
    per: dict[str, dict] = {}
    for v, rs in col.results.items():
        rec = {}
        for key in ("train_ms", "decode_ms", "kv_bytes"):
            arr = np.array([r["cost"][key] for r in rs if r.get("cost")], dtype=float)
            if arr.size:
                rec[key] = arr.mean(0).tolist()
                rec[f"{key}_sd"] = (arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1])).tolist()
        per[v] = rec
    cross = {}
    if ref in per and per[ref]:
        for v, rec in per.items():
            if v != ref and rec:
                cross[v] = {k: crossover(cost["lengths"], per[ref][k], rec[k]) for k in ("train_ms", "decode_ms")}
    return {k: cost[k] for k in ("lengths", "threads", "cpu", "repeats", "decode_tokens")} | {
        "variants": per, "crossover": cross, "reference": ref}


# --- verdicts ----------------------------------------------------------------------------------------

def _triple(t):
    return (None, None, None) if t is None else (t[0], t[1], t[2])


FAMILY = ("one question's comparison of its tested variant with the reference: the distinct metrics its five "
          "options test, one two-sided Welch p each")
WHY_FAMILY = ("Each question is answered on its own (its own variant against the reference), so the guarantee a "
              "reader needs is that no option of that answer is called supported by chance: Holm within each "
              "question gives that at α, without paying for the other question's tests.")
MDE_FORMULA = ("MDE = (t(1 − α/(2m), ν) + t(power, ν)) · √(sd_v²/n_v + sd_r²/n_r): the true difference a two-sided "
               "Welch test at Holm's strictest level α/m (m: the question's family size) detects with 80% power, ν the "
               "Welch–Satterthwaite degrees of freedom, sd and n the measured seed spread and seeds of each arm")


def correction_record() -> dict:
    return {"method": "Holm–Bonferroni", "alpha": ALPHA, "power": POWER, "family": FAMILY, "why": WHY_FAMILY,
            "mde": MDE_FORMULA, "contradicted": "each test's own 95% interval (not corrected)"}


def family_record(fam: Family) -> dict:
    return {"size": fam.size, "alpha_m": fam.alpha, "p": fam.p, "p_holm": fam.p_holm,
            "mde": {m: _num(x) for m, x in fam.mde.items()}}


def _against(col, q, var: str, other: str) -> list[str]:
    """The question's five verdicts for `var` against another arm (a control, the size-matched baseline), with
    that comparison's own Holm family."""
    V, O = col.results[var], col.results[other]
    fam = family([opt.claim for opt in q.options], V, O, var, other)
    return [judge(opt.claim, V, O, var, other, fam).verdict for opt in q.options]


def verdict_records(col) -> tuple[list[dict], dict]:
    """The ten options' verdicts, and each question's Holm family (families: {question: family_record})."""
    ref = col.questions.get("reference", "baseline")
    size = col.questions.get("size_matched")
    controls = col.questions.get("controls") or {}
    out, families = [], {}
    for q in QUESTIONS:
        var = col.questions.get(q.key)
        fam = None
        if var in col.results and ref in col.results:
            fam = family([opt.claim for opt in q.options], col.results[var], col.results[ref], var, ref)
            families[q.key] = family_record(fam) | {"variant": var, "reference": ref,
                                                    "n_variant": len(col.results[var]),
                                                    "n_reference": len(col.results[ref])}

        vs_size = _against(col, q, var, size) if fam is not None and size in col.results and size != var else None
        vs_controls = {c: _against(col, q, var, c) for c in controls.get(q.key, [])
                       if fam is not None and c in col.results}
        for i, opt in enumerate(q.options):
            rec = {"question": q.key, "option": opt.number, "claim": opt.text,
                   "statement": q.text.options[opt.number - 1], "marked_correct": opt.number == q.marked,
                   "note": opt.note, "variant": var, "reference": ref}
            if fam is None:
                missing = var if var not in col.results else ref
                out.append(rec | {"metric": None, "verdict": "not tested", "why": f"no finished runs of '{missing}'",
                                  "variant_mean": None, "variant_sd": None, "reference_mean": None,
                                  "reference_sd": None, "p": None, "p_holm": None, "mde": None, "floor": False,
                                  "evidence": [], "decided_by": [], "vs_size_matched": None, "vs_controls": {}})
                continue
            j = judge(opt.claim, col.results[var], col.results[ref], var, ref, fam)
            e0 = j.evidence[j.decisive[0]] if j.decisive else j.evidence[0]  # the (first) part that decided
            vm, vs, vn = _triple(e0.v)
            rm, rsd, rn = _triple(e0.r)
            out.append(rec | {
                "metric": e0.metric, "metric_label": metric_label(e0.metric) if not e0.metric.endswith("_l")
                else e0.metric, "verdict": j.verdict, "variant_mean": _num(vm), "variant_sd": _num(vs), "n": vn,
                "reference_mean": _num(rm), "reference_sd": _num(rsd), "reference_n": rn, "p": _num(e0.p),
                "p_holm": _num(e0.p_holm), "mde": _num(e0.mde), "floor": any(is_floor(e) for e in j.evidence),
                "evidence": [e.record(k in j.decisive) for k, e in enumerate(j.evidence)], "decided_by": j.decisive,
                "vs_size_matched": vs_size[i] if vs_size else None,
                "vs_controls": {c: vs[i] for c, vs in vs_controls.items()}})
    return out, families


def control_records(col) -> list[dict]:
    """Each tested variant against each of its controls (and each control against the reference), one
    metric at a time, read two-sided: does the question's mechanism do better than what merely resembles it?
    Holm within each pair's metrics."""
    ref = col.questions.get("reference", "baseline")
    out = []
    for q, names in (col.questions.get("controls") or {}).items():
        var = col.questions.get(q)
        for c in names:
            pairs = [(var, c), (c, ref)]
            for a, b in pairs:
                if a not in col.results or b not in col.results:
                    continue
                fam = family(CONTROL_TESTS[q], col.results[a], col.results[b], a, b)
                for t in CONTROL_TESTS[q]:
                    e = compare_control(t, col.results[a], col.results[b], a, b, fam)
                    vm, vs, vn = _triple(e.v)
                    cm, cs, cn = _triple(e.r)
                    out.append({"question": q, "variant": a, "control": b, "metric": t.metric,
                                "metric_label": metric_label(t.metric), "verdict": e.verdict,
                                "variant_mean": _num(vm), "variant_sd": _num(vs), "n": vn, "control_mean": _num(cm),
                                "control_sd": _num(cs), "control_n": cn, "diff": _num(e.diff), "p": _num(e.p),
                                "p_holm": _num(e.p_holm)})
    return out


# What a relative is read on against the question's mechanism and the reference: the control metrics, and the
# costs at the longest measured length (faster is "better").
RELATIVE_COST_TESTS = [Test("train_ms_long", -1, D_TIME, relative=True),
                       Test("decode_ms_long", -1, D_TIME, relative=True)]
RELATIVE_SUMMARY = ("val_bpb", "long_bpb", "far_acc", "qa_acc", "summary_rouge", "train_ms_long", "decode_ms_long",
                    "kv_bytes")


def relative_records(col) -> dict:
    """The relatives of each question's mechanism (grid `questions.relatives`): per question, the arms (the
    reference, the mechanism, each relative) with their mean ± sd of the summary metrics, and each relative read
    two-sided against the mechanism and against the reference on the control metrics and the long-length costs,
    Holm within each pair (as the controls are)."""
    ref = col.questions.get("reference", "baseline")
    out: dict = {}
    for q, names in (col.questions.get("relatives") or {}).items():
        var = col.questions.get(q)
        arms = [a for a in dict.fromkeys([ref, var, *names]) if a in col.results]
        if not any(n in col.results for n in names):
            continue
        summary = {}
        for a in arms:
            row = {}
            for m in RELATIVE_SUMMARY:
                vals = [x for x in (metric_value(r, m) for r in col.results[a]) if x is not None]
                row[m] = ({"mean": float(np.mean(vals)), "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                           "n": len(vals)} if vals else None)
            summary[a] = row
        tests = CONTROL_TESTS[q] + RELATIVE_COST_TESTS
        comparisons = []
        for rel in names:
            for other in (var, ref):
                if rel not in col.results or other not in col.results or other == rel:
                    continue
                fam = family(tests, col.results[rel], col.results[other], rel, other)
                for t in tests:
                    e = compare_control(t, col.results[rel], col.results[other], rel, other, fam)
                    rm, rsd, rn = _triple(e.v)
                    om, osd, on = _triple(e.r)
                    comparisons.append({"relative": rel, "against": other, "metric": t.metric,
                                        "metric_label": metric_label(t.metric), "verdict": e.verdict,
                                        "relative_mean": _num(rm), "relative_sd": _num(rsd), "n": rn,
                                        "against_mean": _num(om), "against_sd": _num(osd), "against_n": on,
                                        "diff": _num(e.diff), "p": _num(e.p), "p_holm": _num(e.p_holm),
                                        "note": e.note})
        out[q] = {"mechanism": var, "reference": ref, "relatives": [n for n in names if n in col.results],
                  "arms": arms, "summary": summary, "comparisons": comparisons}
    return out


# --- per-variant tables ----------------------------------------------------------------------------

def variant_records(col) -> dict:
    out = {}
    for v, rs in col.results.items():
        rec = {}
        for n in METRICS:
            vals = [x for x in (metric_value(r, n) for r in rs) if x is not None]
            if vals:
                m, s = mean_sd(vals)
                rec[n] = {"mean": _num(m), "sd": _num(s), "n": len(vals)}
        windows = [r["matched_window"]["window"] for r in rs if r.get("matched_window")]
        if windows:
            rec["matched_window"] = {"mean": float(np.mean(windows)), "sd": float(np.std(windows)), "n": len(windows)}
        out[v] = rec
    return out


def longrange_records(col) -> dict:
    out: dict = defaultdict(dict)
    for v, rs in col.results.items():
        tasks = sorted({t for r in rs for t in ((r.get("longrange") or {}).get("tasks") or {})})
        for t in tasks:
            recs = [r["longrange"]["tasks"][t] for r in rs if (r.get("longrange") or {}).get("tasks", {}).get(t)]
            item = {"distance": recs[0]["distance"], "chance": recs[0]["chance"], "n_seeds": len(recs)}
            for key in ("exact", "f1", "rouge_l"):
                if all(key in rec for rec in recs):
                    arr = np.array([rec[key] for rec in recs], dtype=float)
                    item[key] = arr.mean(0).tolist()
                    item[f"{key}_sd"] = (arr.std(0, ddof=1) if len(arr) > 1 else np.zeros(arr.shape[1])).tolist()
            out[v][t] = item
    return dict(out)


def text_records(col) -> dict:
    out = {}
    for v, rs in col.results.items():
        by: dict[int, dict] = {}
        for r in rs:
            for c in (r.get("text") or {}).get("contexts", []):
                e = by.setdefault(c["multiple"], {"multiple": c["multiple"], "context": c["context"], "one": [],
                                                  "sliding": []})
                e["one"].append(c["bpb"])
                if c.get("sliding"):
                    e["sliding"].append(c["sliding"]["bpb"])
        out[v] = [{"multiple": e["multiple"], "context": e["context"], "one_pass_bpb": float(np.mean(e["one"])),
                   "sliding_bpb": float(np.mean(e["sliding"])) if e["sliding"] else None}
                  for _, e in sorted(by.items())]
    return out


def question_text_records() -> dict:
    """The questions word for word (questions.py), so that report.json is read without the package."""
    return {q.key: {"title": q.title, "text": q.text.text, "options": list(q.text.options), "marked": q.marked}
            for q in QUESTIONS}


def provenance_record(col) -> dict:
    """What produced these results: when the report was made and by what command, the code (the report's git
    commit and the cells' own), the CPU (its kind as torch dispatches to it: AVX2, AVX512, ...), the grids and
    their context length, and the training time: the sum of the cells' own (evaluations during training
    included) and the span from the first cell's start to the last cell's result (file times: pauses between
    resumed sessions included)."""
    import datetime
    import json
    import shlex
    import sys

    import torch

    from ..train.device import cpu_model
    from ..train.rundir import environment

    dirs = [d for ds in col.dirs.values() for d in ds]
    commits, cpus, starts, ends = set(), set(), [], []
    for d in dirs:
        try:
            run = json.loads((d / "run" / "run.json").read_text())
            env = run.get("env") or run.get("environment") or {}
            commits.add(env.get("git_commit"))
            cpus.add(env.get("cpu_capability"))
            created = run.get("created")
            starts.append(datetime.datetime.fromisoformat(created).timestamp() if created
                          else (d / "run" / "run.json").stat().st_mtime)
            ends.append((d / "result.json").stat().st_mtime)
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    command = os.environ.get("DYNAFORMER_STUDY_COMMAND") or (
        shlex.join(["dynaformer", *sys.argv[1:]]) if argv0 in ("dynaformer", "cli.py") else None)
    contexts = sorted({int(r["model"]["context_len"]) for rs in col.results.values() for r in rs
                       if (r.get("model") or {}).get("context_len")})
    train = [float(r["elapsed_s"]) for rs in col.results.values() for r in rs if r.get("elapsed_s") is not None]
    env = environment()
    return {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "git_commit": env.get("git_commit"),
            "cells_git_commit": sorted(c for c in commits if c) or None,
            "cells_cpu_capability": sorted(c for c in cpus if c) or None, "dynaformer": env.get("dynaformer"),
            "torch": env.get("torch"), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model(), "grids": col.grids, "context_len": contexts[-1] if contexts else None,
            "cells": len(dirs), "cells_train_s": sum(train) if train else None,
            "span_s": (max(ends) - min(starts)) if starts and ends else None}


def report_data(col, cost: dict | None = None) -> dict:
    summary = cost_summary(col, cost)
    verdicts, families = verdict_records(col)
    return {"provenance": provenance_record(col), "grids": col.grids, "questions": col.questions,
            "question_text": question_text_records(), "thresholds": THRESHOLDS, "correction": correction_record(),
            "families": families, "verdicts": verdicts, "controls": control_records(col),
            "relatives": relative_records(col), "wall_clock": wall_clock_records(col), "variants": variant_records(col),
            "longrange": longrange_records(col), "text": text_records(col), "cost": summary,
            "skipped": [{"cell": c, "why": w} for c, w in col.skipped], "limits": limits_record(col, summary)}


LEARNED = 0.6  # exact match at the shortest distance from which a task counts as learned


def limits_record(col, cost: dict | None = None) -> dict | None:
    """What the study cannot tell at its size: how big and how long-trained its models are, the smallest
    accuracy difference its seeds can separate from seed noise, and the tasks the reference did not learn
    (or learned in some seeds only, whose all-or-nothing spread swamps any mechanism's effect)."""
    ref = col.questions.get("reference")
    rs = col.results.get(ref) or []
    if not rs:
        return None
    r0 = rs[0]
    arms = [v for v in (ref, col.questions.get("residual"), col.questions.get("span")) if col.results.get(v)]
    n = min(len(col.results[v]) for v in arms)
    tasks, sds = {}, []
    for t in sorted({t for r in rs for t in ((r.get("longrange") or {}).get("tasks") or {})}):
        per_seed = [r["longrange"]["tasks"][t]["exact"][0] for r in rs
                    if (r.get("longrange") or {}).get("tasks", {}).get(t)]
        mean, sd = mean_sd(per_seed)
        tasks[t] = {"exact": mean, "sd": sd, "per_seed": per_seed}
        if len(per_seed) > 1:
            sds.append(sd)
    # The smallest difference one two-sided Welch test at α finds with 80% power, n seeds per arm with this seed
    # spread in both (stats.mde); with one seed nothing is separable. The questions' own, corrected numbers are in
    # their families.
    spread = float(np.sqrt(np.mean(np.square(sds)))) if sds else None
    smallest = mde(spread, n, spread, n, ALPHA, POWER) if spread is not None and n > 1 else None
    return {"params": (r0.get("compute") or {}).get("params"), "n_layer": r0["model"].get("n_layer"),
            "d_model": r0["model"].get("d_model"), "context_len": r0["model"].get("context_len"),
            "tokens": r0.get("tokens"), "seeds": n, "accuracy_spread": spread, "mde_exact": smallest, "tasks": tasks,
            "seed_split": [t for t, x in tasks.items() if max(x["per_seed"]) >= LEARNED > min(x["per_seed"])],
            "not_learned": [t for t, x in tasks.items() if max(x["per_seed"]) < LEARNED],
            "cpu": (cost or {}).get("cpu")}
