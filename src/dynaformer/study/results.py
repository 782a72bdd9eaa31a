"""report.json: every number the report shows, built once from the collected cells, so that the Markdown
and HTML are renderings of it and other tools can read the results.

    {"grids", "questions", "thresholds",
     "verdicts":  [{question, option, claim, metric, verdict, variant_mean, variant_sd, reference_mean,
                    reference_sd, p, floor, evidence: [...], vs_size_matched, vs_controls: {control: verdict}}],
     "controls":  [{question, variant, control, metric, verdict, variant_mean, ..., p}],
     "variants":  {name: {metric: {mean, sd, n}}},
     "longrange": {variant: {task: {distance: [...], exact: [mean per distance], f1?, rouge_l?}}},
     "text":      {variant: [{multiple, context, one_pass_bpb, sliding_bpb}]}  (means over seeds),
     "cost":      {lengths, threads, cpu, repeats, variants: {name: {train_ms, train_ms_sd, decode_ms,
                   decode_ms_sd, kv_bytes}}, crossover: {variant: {train: {...}, decode: {...}}}} | null,
     "limits":    {params, n_layer, d_model, context_len, tokens, seeds, mde_exact, tasks: {task: {exact, sd,
                   per_seed}}, seed_split: [...], not_learned: [...], cpu}  (what the study cannot tell)}
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from .cost import crossover, measure_cost
from .stats import mean_sd, t_quantile
from .verdicts import (
    CONTROL_TESTS,
    METRICS,
    QUESTIONS,
    THRESHOLDS,
    compare_control,
    is_floor,
    judge,
    metric_label,
    metric_value,
)


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
    if cached and cached.get("lengths") == lengths and sorted(cached.get("models", {})) == sorted(keys) \
            and cached.get("repeats") == repeats:
        cost = cached
    else:
        models, text = {}, None
        for key, (_, _, d) in zip(keys, cells, strict=True):
            models[key], _, ckpt = load_model(d / "run")
            if text is None:
                text = np.asarray(open_splits(d / "run" / "data").val)
        cost = measure_cost(models, text, lengths, repeats)
        del models
        if cache_path is not None:
            from .cell import write_json

            cache_path.parent.mkdir(parents=True, exist_ok=True)
            write_json(cache_path, cost)
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


def verdict_records(col) -> list[dict]:
    ref = col.questions.get("reference", "baseline")
    size = col.questions.get("size_matched")
    controls = col.questions.get("controls") or {}
    out = []
    for q in QUESTIONS:
        var = col.questions.get(q.key)
        for opt in q.options:
            rec = {"question": q.key, "option": opt.number, "claim": opt.text,
                   "seed_answer": opt.number == q.answer_key, "note": opt.note, "variant": var, "reference": ref}
            if var not in col.results or ref not in col.results:
                missing = var if var not in col.results else ref
                out.append(rec | {"metric": None, "verdict": "not tested", "why": f"no finished runs of '{missing}'",
                                  "variant_mean": None, "variant_sd": None, "reference_mean": None,
                                  "reference_sd": None, "p": None, "floor": False, "evidence": [],
                                  "vs_size_matched": None, "vs_controls": {}})
                continue
            verdict, ev = judge(opt.claim, col.results[var], col.results[ref], var, ref)
            e0 = ev[0]
            vm, vs, vn = _triple(e0.v)
            rm, rsd, rn = _triple(e0.r)
            vs_size = None
            if size in col.results and size != var:
                vs_size = judge(opt.claim, col.results[var], col.results[size], var, size)[0]
            vs_controls = {c: judge(opt.claim, col.results[var], col.results[c], var, c)[0]
                           for c in controls.get(q.key, []) if c in col.results}
            out.append(rec | {
                "metric": e0.metric, "metric_label": metric_label(e0.metric) if not e0.metric.endswith("_l")
                else e0.metric, "verdict": verdict, "variant_mean": _num(vm), "variant_sd": _num(vs), "n": vn,
                "reference_mean": _num(rm), "reference_sd": _num(rsd), "reference_n": rn, "p": _num(e0.p),
                "floor": any(is_floor(e) for e in ev),
                "evidence": [{"test": e.test, "metric": e.metric, "diff": _num(e.diff), "p": _num(e.p),
                              "verdict": e.verdict, "note": e.note} for e in ev],
                "vs_size_matched": vs_size, "vs_controls": vs_controls})
    return out


def control_records(col) -> list[dict]:
    """Each tested variant against each of its controls (and each control against the reference), one
    metric at a time, read two-sided: does the seed's mechanism do better than what merely resembles it?"""
    ref = col.questions.get("reference", "baseline")
    out = []
    for q, names in (col.questions.get("controls") or {}).items():
        var = col.questions.get(q)
        for c in names:
            pairs = [(var, c), (c, ref)]
            for a, b in pairs:
                if a not in col.results or b not in col.results:
                    continue
                for t in CONTROL_TESTS[q]:
                    e = compare_control(t, col.results[a], col.results[b], a, b)
                    vm, vs, vn = _triple(e.v)
                    cm, cs, cn = _triple(e.r)
                    out.append({"question": q, "variant": a, "control": b, "metric": t.metric,
                                "metric_label": metric_label(t.metric), "verdict": e.verdict,
                                "variant_mean": _num(vm), "variant_sd": _num(vs), "n": vn, "control_mean": _num(cm),
                                "control_sd": _num(cs), "control_n": cn, "diff": _num(e.diff), "p": _num(e.p)})
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


def report_data(col, cost: dict | None = None) -> dict:
    summary = cost_summary(col, cost)
    return {"grids": col.grids, "questions": col.questions, "thresholds": THRESHOLDS,
            "verdicts": verdict_records(col), "controls": control_records(col), "variants": variant_records(col),
            "longrange": longrange_records(col), "text": text_records(col), "cost": summary,
            "skipped": [{"cell": c, "why": w} for c, w in col.skipped], "limits": limits_record(col, summary)}


LEARNED = 0.6  # exact match at the shortest distance from which a task counts as learned


def limits_record(col, cost: dict | None = None) -> dict | None:
    """What the study cannot tell at its size: how big and how long-trained its models are, the smallest
    accuracy difference its seeds can separate from seed noise, and the tasks the reference did not learn
    (or learned in some seeds only, whose all-or-nothing spread swamps any mechanism's effect)."""
    from .verdicts import ALPHA

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
    # A two-sided Welch test with n seeds per arm and this seed spread separates differences of about
    # t(1 − α/2, 2n − 2) · sd · √(2/n); with one seed nothing is separable.
    spread = float(np.sqrt(np.mean(np.square(sds)))) if sds else None
    mde = (t_quantile(1 - ALPHA / 2, 2 * n - 2) * spread * math.sqrt(2 / n)) if spread is not None and n > 1 else None
    return {"params": (r0.get("compute") or {}).get("params"), "n_layer": r0["model"].get("n_layer"),
            "d_model": r0["model"].get("d_model"), "context_len": r0["model"].get("context_len"),
            "tokens": r0.get("tokens"), "seeds": n, "accuracy_spread": spread, "mde_exact": mde, "tasks": tasks,
            "seed_split": [t for t, x in tasks.items() if max(x["per_seed"]) >= LEARNED > min(x["per_seed"])],
            "not_learned": [t for t, x in tasks.items() if max(x["per_seed"]) < LEARNED],
            "cpu": (cost or {}).get("cpu")}
