"""`dynaformer report`: Markdown + self-contained HTML from `compare` folders (or cell folders).

Plots (matplotlib, Agg): loss curves, bpb by position, long-range accuracy by distance, per-layer
gradient norms, attention ablation per layer, spans per layer/head, residual coefficients over
training, compute bars. A plot whose data no run recorded says "not recorded" instead.
Then the verdict table for every option of both seed questions (verdicts.py), and the runs that were
skipped, with the reason.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DynaformerError
from .encoder_report import encoder_blocks
from .grid import QUESTION_DEFAULTS
from .stats import mean_sd
from .verdicts import METRICS, THRESHOLDS


@dataclass
class Collected:
    results: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))  # variant → results
    dirs: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (cell, reason)
    questions: dict = field(default_factory=lambda: dict(QUESTION_DEFAULTS))
    grids: list[str] = field(default_factory=list)
    eval: dict = field(default_factory=dict)  # the grid's evaluation settings (cost_lengths, cost_repeats)
    encoder: dict[str, dict[str, list[dict]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    encoder_pretrain: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))

    def add(self, r: dict, d: Path) -> None:
        if r.get("kind") == "encoder":
            self.encoder[r["task"]][r["variant"]].append(r)
        elif r.get("kind") == "encoder_pretrain":
            self.encoder_pretrain[r["variant"]].append(r)
        else:
            self.results[r["variant"]].append(r)
            self.dirs[r["variant"]].append(d)


def _read_result(d: Path) -> tuple[dict | None, str | None]:
    p = d / "result.json"
    if not p.exists():
        run = d / "run"
        if (run / "metrics.jsonl").exists():
            from .cell import last_step

            try:
                spec = json.loads((d / "cell.json").read_text())
                total = (spec.get("train") or spec["finetune"])["max_steps"]
            except (OSError, ValueError, KeyError):
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
            cells = sorted(q.parent for q in (p / "cells").glob("*/seed*/cell.json"))
            cells += sorted(q.parent for q in (p / "encoder-pretrain").glob("*/seed*/cell.json"))
            cells += sorted(q.parent for q in (p / "encoder").glob("*/*/seed*/cell.json"))
            n_ok = 0
            for d in cells:
                r, why = _read_result(d)
                if r is None:
                    col.skipped.append((d.relative_to(p).as_posix().removeprefix("cells/"), why))
                    continue
                col.add(r, d)
                n_ok += 1
            if n_ok == 0:
                reasons = "; ".join(f"{c}: {w}" for c, w in col.skipped[-3:]) or "no cells"
                raise DynaformerError(f"'{p}' holds no finished run ({reasons})")
        elif (p / "result.json").exists() or (p / "cell.json").exists():
            r, why = _read_result(p)
            if r is None:
                raise DynaformerError(f"'{p}': {why}")
            col.add(r, p)
        elif (p / "run.json").exists():
            raise DynaformerError(f"'{p}' is a training run folder without harness results; run it through "
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


# --- plots ---------------------------------------------------------------------------------------

def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _colors(variants: list[str]) -> dict[str, str]:
    cycle = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f"]
    return {v: cycle[i % len(cycle)] for i, v in enumerate(variants)}


def _mean_curve(curves: list[list]) -> tuple[np.ndarray, np.ndarray]:
    by: dict[int, list[float]] = defaultdict(list)
    for c in curves:
        for row in c:
            if row[1] is not None:
                by[row[0]].append(row[1])
    steps = np.array(sorted(by))
    return steps, np.array([np.mean(by[s]) for s in steps])


def plot_loss(col: Collected, colors) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for v, rs in col.results.items():
        s, m = _mean_curve([r.get("curve", []) for r in rs])
        axes[0].plot(s, m, label=v, color=colors[v])
        s, m = _mean_curve([r.get("val_curve", []) for r in rs])
        axes[1].plot(s, m, "o-", label=v, color=colors[v])
    axes[0].set(title="training loss (mean over seeds)", xlabel="step", ylabel="nats/token")
    axes[1].set(title="validation loss", xlabel="step", ylabel="nats/token")
    axes[0].legend(fontsize=7)
    return _png(fig)


def plot_position(col: Collected, colors) -> bytes | None:
    plt = _plt()
    mults = sorted({c["multiple"] for rs in col.results.values() for r in rs
                    for c in (r.get("text") or {}).get("contexts", [])})
    if not mults:
        return None
    fig, axes = plt.subplots(1, len(mults), figsize=(4.2 * len(mults), 3.4), squeeze=False)
    for ax, m in zip(axes[0], mults, strict=True):
        for v, rs in col.results.items():
            per = [next((c for c in r["text"]["contexts"] if c["multiple"] == m), None) for r in rs]
            per = [c for c in per if c]
            if not per:
                continue
            his = [b["hi"] for b in per[0]["buckets"]]
            vals = np.mean([[b["bpb"] for b in c["buckets"]] for c in per], axis=0)
            ax.plot(his, vals, "o-", label=v, color=colors[v], ms=3)
        ax.set_xscale("log", base=2)
        ax.set(title=f"bpb by position, {m}× training context", xlabel="token position (bucket end)", ylabel="bpb")
    axes[0][0].legend(fontsize=7)
    return _png(fig)


def plot_longrange(col: Collected, colors) -> bytes | None:
    plt = _plt()
    tasks = sorted({t for rs in col.results.values() for r in rs for t in ((r.get("longrange") or {}).get("tasks")
                                                                         or {})})
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks, strict=True):
        chance = None
        for v, rs in col.results.items():
            recs = [r["longrange"]["tasks"][t] for r in rs if (r.get("longrange") or {}).get("tasks", {}).get(t)]
            if not recs:
                continue
            chance = recs[0]["chance"]
            acc = np.array([rec["exact"] for rec in recs])
            ax.errorbar(recs[0]["distance"], acc.mean(0), yerr=acc.std(0) if len(acc) > 1 else None, fmt="o-",
                        label=v, color=colors[v], ms=3, capsize=2)
        if chance is not None:
            ax.axhline(chance, ls=":", color="grey", lw=1)
        ax.set_xscale("log")
        ticks = sorted({d for rs in col.results.values() for r in rs
                        for d in ((r.get("longrange") or {}).get("tasks", {}).get(t) or {}).get("distance", [])})
        ax.set_xticks(ticks, [str(d) for d in ticks], fontsize=7)
        ax.minorticks_off()
        ax.set(title=f"{t}: exact match", xlabel="distance (tokens)", ylim=(-0.03, 1.03))
    axes[0][0].legend(fontsize=7)
    return _png(fig)


def plot_layers(col: Collected, colors, key: str, title: str, ylabel: str) -> bytes | None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    n_v = len(col.results)
    width = 0.8 / max(1, n_v)
    any_ = False
    for i, (v, rs) in enumerate(col.results.items()):
        vals = [r["diagnostics"][key] if key == "grad_norm_layers" else r["diagnostics"][key]["delta"] for r in rs
                if (r.get("diagnostics") or {}).get(key)]
        lens = {len(x) for x in vals}
        if not vals or len(lens) != 1:
            continue
        any_ = True
        arr = np.array(vals)
        x = np.arange(arr.shape[1]) + i * width
        ax.bar(x, arr.mean(0), width, yerr=arr.std(0) if len(arr) > 1 else None, label=v, color=colors[v])
    if not any_:
        _plt().close(fig)
        return None
    if key == "grad_norm_layers":
        ax.set_yscale("log")
    ax.set(title=title, xlabel="layer", ylabel=ylabel)
    ax.legend(fontsize=7)
    return _png(fig)


_UNITS = {"spans": "mean span (tokens)", "layer_grad_norms": "gradient norm", "residual_coefs": "coefficient"}


def plot_recorded(col: Collected, colors, family: str, title: str) -> bytes | None:
    """Series a mechanism logged to metrics.jsonl, over training: one panel per variant that has any
    (its first seed), and a layer × head heat map of the last values when the keys are 2-D."""
    plt = _plt()
    have = [(v, rs[0]["diagnostics"]["recorded"][family]) for v, rs in col.results.items()
            if ((rs[0].get("diagnostics") or {}).get("recorded") or {}).get(family)]
    if not have:
        return None
    fig, axes = plt.subplots(1, len(have) + 1, figsize=(4.4 * (len(have) + 1), 3.4), squeeze=False)
    import re

    for ax, (v, rec) in zip(axes[0], have, strict=False):
        series = rec["series"]
        if len(series) > 8:  # too many to tell apart: one line per layer (mean of its series), labelled
            by_layer: dict[str, list] = defaultdict(list)
            for n, ys in series.items():
                if "max" in n and any("mean" in m for m in series):
                    continue  # spans: the mean span, not the max
                nums = re.findall(r"\d+", n)
                by_layer[f"layer {nums[-2] if len(nums) >= 2 else nums[0] if nums else '?'}"].append(ys)
            series = {k: [np.nanmean([np.nan if y[i] is None else y[i] for y in group]) for i in range(len(group[0]))]
                      for k, group in by_layer.items()}
        for n, ys in list(series.items())[:12]:
            ax.plot(rec["steps"], [np.nan if y is None else y for y in ys], lw=1, label=n)
        ax.set(title=f"{title}: {v}", xlabel="training step", ylabel=_UNITS.get(family, "value"))
        ax.legend(fontsize=6)
    # heat map of the final values, indices parsed from the keys (…/LAYER/HEAD or …LAYER…HEAD)
    preferred = [h for h in have if h[0] in (col.questions.get("span"), col.questions.get("residual"))]
    v, rec = (preferred or have)[0]

    grid: dict[tuple[int, int], float] = {}
    means = [n for n in rec["series"] if "mean" in n]
    for n, ys in rec["series"].items():
        if means and n not in means:
            continue  # span_mean over span_max
        nums = [int(x) for x in re.findall(r"\d+", n)]
        last = next((y for y in reversed(ys) if y is not None), None)
        if last is not None and nums:
            grid[(nums[-2] if len(nums) >= 2 else 0, nums[-1])] = last
    ax = axes[0][-1]
    if grid:
        L, H = max(k[0] for k in grid) + 1, max(k[1] for k in grid) + 1
        m = np.full((L, H), np.nan)
        for (l, h), val in grid.items():
            m[l, h] = val
        im = ax.imshow(m, aspect="auto", cmap="viridis")
        ax.set_xticks(range(H))
        ax.set_yticks(range(L))
        fig.colorbar(im, ax=ax, label=_UNITS.get(family, "value"))
        ax.set(title=f"last logged value per layer × head: {v}", xlabel="head (or index)", ylabel="layer")
    return _png(fig)


def plot_compute(col: Collected, colors) -> bytes | None:
    plt = _plt()
    items = [("params", lambda r: r["compute"]["params"], "parameters"),
             ("train FLOPs/token", lambda r: r["compute"]["flops"]["train"], "FLOPs"),
             ("attention computed / dense", lambda r: r["compute"]["flops"]["attention_fraction"], "fraction"),
             ("ms/step", lambda r: r["compute"]["ms_step"], "ms"),
             ("tokens/s", lambda r: r["compute"]["tok_s"], "tok/s"),
             ("peak memory", lambda r: r["compute"]["peak_memory"] / 2**20, "MiB"),
             ("KV cache @ context", lambda r: (r["compute"]["kv_cache"].get("measured")
                                               or r["compute"]["kv_cache"]["analytic"]) / 2**10, "KiB")]
    fig, axes = plt.subplots(1, len(items), figsize=(2.6 * len(items), 3.2))
    variants = list(col.results)
    for ax, (title, fn, unit) in zip(axes, items, strict=True):
        means, sds = [], []
        for v in variants:
            vals = []
            for r in col.results[v]:
                try:
                    x = fn(r)
                except (KeyError, TypeError):
                    x = None
                if x is not None:
                    vals.append(float(x))
            m, s = mean_sd(vals) if vals else (np.nan, 0.0)
            means.append(m)
            sds.append(s)
        ax.bar(range(len(variants)), means, yerr=sds, color=[colors[v] for v in variants])
        ax.set_xticks(range(len(variants)), variants, rotation=60, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(unit, fontsize=8)
    fig.tight_layout()
    return _png(fig)


# --- the document --------------------------------------------------------------------------------

def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.{digits}g}"


def _ms(t) -> str:
    return "—" if t is None else f"{_fmt(t[0])} ± {_fmt(t[1], 2)} (n={t[2]})"


def _pm(mean, sd, n=None) -> str:
    if mean is None:
        return "—"
    return f"{_fmt(mean)} ± {_fmt(sd, 2)}" + (f" (n={n})" if n is not None else "")


def verdict_rows(data: dict) -> list[list[str]]:
    rows = []
    for v in data["verdicts"]:
        opt = str(v["option"]) + (" (seed answer)" if v["seed_answer"] else "")
        if v["verdict"] == "not tested":
            rows.append([v["question"], opt, v["claim"], "—", "—", "—", "—", "—", f"not tested: {v['why']}", "—", "—"])
            continue
        evidence = "; ".join(f"{e['test']}: Δ={_fmt(e['diff'])}, p={_fmt(e['p'], 2)} → {e['verdict']}"
                             + (f" ({e['note']})" if e["note"] else "") for e in v["evidence"])
        controls = ", ".join(f"{c}: {x}" for c, x in v["vs_controls"].items()) or "—"
        rows.append([v["question"], opt, v["claim"], v["metric_label"],
                     _pm(v["variant_mean"], v["variant_sd"], v["n"]),
                     _pm(v["reference_mean"], v["reference_sd"], v["reference_n"]), _fmt(v["p"], 2),
                     evidence + (f". {v['note']}" if v["note"] else ""), f"**{v['verdict']}**",
                     v["vs_size_matched"] or "—", controls])
    return rows


def answer_rows(data: dict) -> list[list[str]]:
    """One line per option: the verdict in a word and its decisive number (first part of the claim)."""
    rows = []
    for v in data["verdicts"]:
        num = "—" if v["variant_mean"] is None else (f"{_fmt(v['variant_mean'], 3)} vs {_fmt(v['reference_mean'], 3)} "
                                                       f"({v['metric']}, p={_fmt(v['p'], 2)})")
        word = v["verdict"] + (" (floor)" if v["floor"] and v["verdict"] == "inconclusive" else "")
        rows.append([v["question"], str(v["option"]) + (" ★" if v["seed_answer"] else ""), v["claim"], f"**{word}**",
                     num])
    return rows


def _bold(escaped: str) -> str:
    """Markdown **bold** in already-escaped HTML text → <strong>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


def limits_text(lim: dict) -> str:
    """One paragraph under the answers: what a study of this size cannot tell."""
    size = (f"{lim['params'] / 1e3:,.0f}k parameters" if lim.get("params") else "few parameters") + \
        f" ({lim['n_layer']} layers × {lim['d_model']} wide, context {lim['context_len']})"
    tokens = f" and train on {lim['tokens'] / 1e6:.1f}M tokens" if lim.get("tokens") else ""
    parts = [f"**What this study cannot tell at this size.** Its models have {size}{tokens}: effects that appear "
             f"only with depth, width, longer contexts or longer training are not tested here."]
    if lim.get("mde_exact") is not None:
        parts.append(f"With {lim['seeds']} seeds per arm and the reference's seed spread in exact match "
                     f"(sd {_fmt(lim['accuracy_spread'], 2)}), accuracy differences smaller than about "
                     f"{_fmt(lim['mde_exact'], 2)} cannot be told from seed noise.")
    elif lim.get("seeds") == 1:
        parts.append("With one seed per arm, no difference can be told from seed noise.")
    if lim.get("seed_split"):
        parts.append(f"{', '.join(lim['seed_split'])}: learned by some seeds of the reference and not by others "
                     f"(exact match at the shortest distance per seed: "
                     + "; ".join(f"{t} {', '.join(_fmt(x) for x in lim['tasks'][t]['per_seed'])}"
                                 for t in lim["seed_split"]) + "), so its spread swamps any mechanism's effect.")
    if lim.get("not_learned"):
        parts.append(f"Not learned by the reference (exact match < 0.6 at the shortest distance): "
                     f"{', '.join(lim['not_learned'])}; verdicts resting on them say little.")
    if lim.get("cpu"):
        parts.append(f"Costs are timed on this machine's CPU ({lim['cpu']}); a GPU's balance of compute and "
                     f"memory differs.")
    return " ".join(parts)


def control_rows(data: dict) -> list[list[str]]:
    return [[c["question"], f"{c['variant']} vs {c['control']}", c["metric_label"],
             _pm(c["variant_mean"], c["variant_sd"], c["n"]), _pm(c["control_mean"], c["control_sd"], c["control_n"]),
             _fmt(c["p"], 2), f"**{c['verdict']}**"] for c in data["controls"]]


def cost_tables(data: dict) -> list[tuple]:
    cost = data.get("cost")
    if not cost:
        return [("p", "Not measured (report --no_cost).")]
    L = cost["lengths"]
    ref = cost["reference"]
    blocks = [("p", f"Interleaved on this machine ({cost['cpu']}, {cost['threads']} threads, median of "
                    f"{cost['repeats']} rounds; each model with its own trained weights and spans, on held-out "
                    f"text). Training step: forward + backward of one sequence of T tokens. Decoding: ms per "
                    f"token after a prefill of T. Speed-up is the reference's time over the variant's; the "
                    f"crossover is the first measured length from which the variant stays cheaper.")]
    head = ["variant"] + [f"train ms @ {T}" for T in L] + [f"decode ms/token @ {T}" for T in L] + \
        ["train crossover", "decode crossover"]
    rows = []
    for v, rec in cost["variants"].items():
        if not rec:
            continue
        cross = cost["crossover"].get(v)
        train = [f"{_fmt(m, 3)}" + ("" if cross is None else f" ({cross['train_ms']['speedup'][i]:.2f}×)")
                 for i, m in enumerate(rec["train_ms"])]
        dec = [f"{_fmt(m, 3)}" + ("" if cross is None else f" ({cross['decode_ms']['speedup'][i]:.2f}×)")
               for i, m in enumerate(rec["decode_ms"])]

        def at(c, v=v):
            if c is None:
                return "reference" if v == ref else "—"
            if c["at"] is None:
                return f"none up to {L[-1]}"
            return f"≤ {c['at']}" if c["between"] is None else f"{c['between'][0]}–{c['between'][1]}"

        rows.append([v] + train + dec + [at(cross and cross["train_ms"]), at(cross and cross["decode_ms"])])
    blocks.append(("table", head, rows))
    return blocks


def text_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    mults = sorted({e["multiple"] for es in data["text"].values() for e in es})
    head = ["variant"] + [f"{m}×: one pass / sliding" for m in mults]
    rows = []
    for v, es in data["text"].items():
        by = {e["multiple"]: e for e in es}
        rows.append([v] + [("—" if m not in by else f"{_fmt(by[m]['one_pass_bpb'])} / {_fmt(by[m]['sliding_bpb'])}")
                           for m in mults])
    return head, rows


def variant_table(data: dict) -> tuple[list[str], list[list[str]]]:
    names = list(METRICS)
    head = ["variant", "seeds"] + names
    rows = []
    for v, rec in data["variants"].items():
        n = max((x["n"] for x in rec.values()), default=0)
        rows.append([v, str(n)] + [_pm(rec[k]["mean"], rec[k]["sd"]) if k in rec else "—" for k in names])
    return head, rows


def build(col: Collected, plots: bool = True, data: dict | None = None) -> list[tuple]:
    """The report as blocks: ("h", level, text), ("p", text), ("table", head, rows), ("img", title, png|None,
    why-None). The tables are rendered from `data` (report.json; built here when not given); plots=False only
    checks which plots have data (no drawing)."""
    from .results import report_data

    data = data if data is not None else report_data(col)
    colors = _colors(list(col.results))
    blocks: list[tuple] = [("h", 1, f"dynaformer report: {', '.join(col.grids) or 'runs'}")]
    n_runs = sum(len(v) for v in col.results.values())
    controls = col.questions.get("controls") or {}
    blocks.append(("p", f"{n_runs} finished runs over {len(col.results)} variants "
                        f"({', '.join(f'{v}×{len(r)}' for v, r in col.results.items())}); reference variant "
                        f"'{col.questions.get('reference')}', residual question tested by "
                        f"'{col.questions.get('residual')}' (controls: "
                        f"{', '.join(controls.get('residual', [])) or '—'}), span question by "
                        f"'{col.questions.get('span')}' (controls: "
                        f"{', '.join(controls.get('span', [])) or '—'}), size-matched baseline "
                        + (f"'{col.questions.get('size_matched')}'" if col.questions.get("size_matched") in col.results
                           else "none in these runs") + ". Every number below is in report.json."))
    blocks.append(("h", 2, "Answers at a glance"))
    blocks.append(("p", "Each option's verdict and its decisive number (tested variant vs reference, first part of "
                        "the claim). ★ marks the option the seed file calls correct; it plays no part in judging."))
    blocks.append(("table", ["question", "option", "claim", "verdict", "decisive number"], answer_rows(data)))
    if data.get("limits"):
        blocks.append(("p", limits_text(data["limits"])))
    blocks.append(("h", 2, "Verdicts"))
    blocks.append(("p", "Each option of each seed question becomes a claim about measured metrics of the tested "
                        "variant versus the reference (mean ± sd over seeds; Welch t-test). supported: p < α and "
                        "the effect is at least the threshold in the claimed direction; contradicted: the 95% "
                        "interval of the effect lies below the threshold (no effect of that size, or the opposite);"
                        " inconclusive: neither. Compound options: AND needs every part, OR any part, NOT swaps. "
                        "The last two columns repeat the test against the size-matched larger baseline and against "
                        "the controls. Accuracy claims where both arms stay below the accuracy threshold are "
                        "inconclusive (floor). Cost claims use the interleaved long-length measurement below "
                        "(section Cost); long-text perplexity takes each variant the better way it can be run "
                        "(one pass or a sliding window of its training context)."))
    blocks.append(("table", ["name", "value"], [[k, _fmt(v)] for k, v in THRESHOLDS.items()]))
    blocks.append(("table", ["question", "option", "claim", "metric (first part)", "variant mean ± sd",
                             "reference mean ± sd", "p", "evidence (every part)", "verdict", "vs size-matched",
                             "vs controls"], verdict_rows(data)))
    blocks.append(("h", 2, "Mechanism versus controls"))
    blocks.append(("p", "Does the seed's mechanism matter, or does something simpler do the same? Residual: the "
                        "dynamic residual against static learned weights (one learned gain per branch, no step, "
                        "position or content terms). Span: content-dependent spans against a fixed window of equal "
                        "attention work (its window is each seed's trained dynamic-span mean keys per query) and "
                        "against one learned span per head. Each control is also compared with the reference. "
                        "better / worse: p < α and at least the threshold; floor: both below the accuracy threshold."))
    blocks.append(("table", ["question", "comparison", "metric", "variant mean ± sd", "control mean ± sd", "p",
                             "reading"], control_rows(data)) if data["controls"] else
                  ("p", "No controls in this grid (questions.controls)."))
    blocks.append(("h", 2, "Cost at long lengths"))
    blocks += cost_tables(data)
    blocks.append(("h", 2, "Long text: one pass and sliding window"))
    blocks.append(("p", "Held-out bits per byte over sequences of 1×, 2× and 4× the training context, read in one "
                        "pass and through a sliding window of the training context (stride half of it). The "
                        "long-text verdicts take each variant the better way."))
    head, trows = text_rows(data)
    blocks.append(("table", head, trows))
    blocks.append(("h", 2, "All variants"))
    head, vrows = variant_table(data)
    blocks.append(("table", head, vrows))
    blocks.append(("p", "; ".join(f"{k}: {v[0]}" for k, v in METRICS.items())))
    enc_colors = _colors(sorted({v for by in col.encoder.values() for v in by} | set(col.results)))
    blocks += encoder_blocks(col.encoder, col.questions.get("reference", "baseline"), enc_colors, _plt(), plots,
                             col.encoder_pretrain)
    have_plt = _plt() is not None
    figures = [
        ("Loss curves", "Mean over seeds. Left: training loss per step (tasks and text weighted by their share); "
         "right: held-out text loss at each evaluation.", lambda: plot_loss(col, colors)),
        ("Bits per byte by token position (1×, 2×, 4× the training context)",
         "Held-out text read in one pass; x: the end of each log₂ bucket of positions. Beyond 1× a dense model "
         "sees positions it never trained on (its sliding-window numbers are in the table above).",
         lambda: plot_position(col, colors)),
        ("Long-range accuracy by distance (dotted: chance)",
         "Exact match of the answer, mean ± sd over seeds, against the distance in tokens from the evidence.",
         lambda: plot_longrange(col, colors)),
        ("Per-layer gradient norms at the end of training (harness-measured)",
         "Norm of each block's parameter gradient on held-out windows (log scale): vanishing gradients show as "
         "early layers far below late ones.",
         lambda: plot_layers(col, colors, "grad_norm_layers", "‖∂L/∂θ‖ per block", "gradient norm")),
        ("Per-layer gradient norms over training (recorded by the run)",
         "The first seed of each variant; one line per layer.",
         lambda: plot_recorded(col, colors, "layer_grad_norms", "grad norms")),
        ("Attention ablation: loss increase when a layer's attention is zeroed",
         "Mean ± sd over seeds; higher means the layer's attention matters more.",
         lambda: plot_layers(col, colors, "attn_ablation", "attention importance", "Δ loss (nats)")),
        ("Spans per layer and head over training",
         "Learned-span variants, first seed: the mean span (tokens) of each layer over training (mean over heads "
         "when there are many), and the last logged mean span per layer × head.",
         lambda: plot_recorded(col, colors, "spans", "spans")),
        ("Residual coefficients over training", "Dynamic-residual variants, first seed: the learned coefficients.",
         lambda: plot_recorded(col, colors, "residual_coefs", "coefficients")),
        ("Compute", "Mean ± sd over seeds. ms/step and tokens/s are from each run's own log at the training "
         "context; the long-length cost is in the Cost table.", lambda: plot_compute(col, colors)),
    ]
    blocks.append(("h", 2, "Plots"))
    for title, caption, fn in figures:
        if not plots:
            blocks.append(("img", title, b"" if _has_data(col, title) else None, "not recorded by any run", caption))
            continue
        blocks.append(("img", title, fn() if have_plt else None,
                       "matplotlib is not installed (pip install dynaformer[plot])" if not have_plt else
                       "not recorded by any run", caption))
    blocks.append(("h", 2, "Skipped runs"))
    if col.skipped:
        blocks.append(("table", ["run", "why"], [[c, w] for c, w in col.skipped]))
    else:
        blocks.append(("p", "None: every cell finished."))
    return blocks


def _has_data(col: Collected, title: str) -> bool:
    family = {"Per-layer gradient norms over training (recorded by the run)": "layer_grad_norms",
              "Spans per layer and head over training": "spans",
              "Residual coefficients over training": "residual_coefs"}.get(title)
    if family is None:
        return True
    return any(((r.get("diagnostics") or {}).get("recorded") or {}).get(family) for rs in col.results.values()
               for r in rs)


def _slug(s: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in s.lower()).strip("-")[:48]


def write_report(paths: list[str | Path], out_dir: str | Path, cost: bool = True,
                 cost_lengths: list[int] | None = None) -> dict:
    from .cell import write_json
    from .grid import EVAL_DEFAULTS
    from .results import attach_cost, report_data

    col = collect(paths)
    out = Path(out_dir)
    measured = None
    if cost:
        lengths = cost_lengths or col.eval.get("cost_lengths") or EVAL_DEFAULTS["cost_lengths"]
        repeats = int(col.eval.get("cost_repeats") or EVAL_DEFAULTS["cost_repeats"])
        measured = attach_cost(col, list(lengths), repeats, out / "cost.json")
    data = report_data(col, measured)
    blocks = build(col, data=data)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", data)
    md, body = [], []
    for b in blocks:
        if b[0] == "h":
            md.append("#" * b[1] + " " + b[2] + "\n")
            body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            md.append(b[1] + "\n")
            body.append(f"<p>{_bold(html.escape(b[1]))}</p>")
        elif b[0] == "table":
            head, rows = b[1], b[2]
            md.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
            md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
            md.append("")
            th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
            trs = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
            body.append(f"<table><tr>{th}</tr>{trs}</table>")
        elif b[0] == "img":
            title, png, why, caption = b[1], b[2], b[3], b[4]
            md.append(f"### {title}\n")
            body.append(f"<h3>{html.escape(title)}</h3>")
            if png is None:
                md.append(f"*{why}*\n")
                body.append(f"<p><em>{html.escape(why)}</em></p>")
            else:
                name = f"plots/{_slug(title)}.png"
                (out / name).write_bytes(png)
                md.append(f"![{title}]({name})\n\n*{caption}*\n")
                body.append(f'<img alt="{html.escape(title)}" src="data:image/png;base64,'
                            f'{base64.b64encode(png).decode()}"><p><em>{html.escape(caption)}</em></p>')
    (out / "report.md").write_text("\n".join(md))
    style = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}table{border-collapse:collapse;"
             "font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
             "img{max-width:100%}.supported,.better{background:#d4f4d4}.contradicted,.worse{background:#f8d4d4}"
             ".inconclusive,.floor{background:#f4f0d0}")
    (out / "report.html").write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>dynaformer report"
                                     f"</title><style>{style}</style></head><body>{''.join(body)}</body></html>")
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "json": str(out / "report.json"),
            "runs": sum(len(v) for v in col.results.values()), "skipped": len(col.skipped),
            "verdicts": [{"question": v["question"], "option": v["option"], "verdict": v["verdict"]}
                         for v in data["verdicts"]]}


_VERDICT_CLASSES = ("supported", "contradicted", "inconclusive", "better", "worse", "floor")


def _td(cell: str) -> str:
    """A table cell; a bold verdict word gets its colour class."""
    text = cell.replace("**", "")
    word = text.split(" ")[0] if cell.startswith("**") else ""
    cls = f' class="{word}"' if word in _VERDICT_CLASSES else ""
    return f"<td{cls}>{html.escape(text)}</td>"
