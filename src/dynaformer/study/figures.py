"""The report's figures (matplotlib, Agg), each described once as data: its title, its caption, how it is
drawn from the collected results, and whether any run recorded what it shows. A figure without data says
"not recorded by any run" in the report instead of an empty plot.
"""

from __future__ import annotations

import io
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..plotting import pyplot
from .collect import Collected
from .stats import mean_sd


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def colors_for(variants: list[str]) -> dict[str, str]:
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
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for v, rs in col.results.items():
        s, m = _mean_curve([r.get("curve", []) for r in rs])
        axes[0].plot(s, m, label=v, color=colors[v])
        s, m = _mean_curve([r.get("val_curve", []) for r in rs])
        axes[1].plot(s, m, "o-", label=v, color=colors[v])
    axes[0].set(title="training loss (mean over seeds)", xlabel="step", ylabel="nats/token")
    axes[1].set(title="validation loss", xlabel="step", ylabel="nats/token")
    axes[0].legend(fontsize=7)
    return png(fig)


def plot_position(col: Collected, colors) -> bytes | None:
    plt = pyplot()
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
    return png(fig)


def plot_longrange(col: Collected, colors) -> bytes | None:
    plt = pyplot()
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
    return png(fig)


def plot_layers(col: Collected, colors, key: str, title: str, ylabel: str) -> bytes | None:
    plt = pyplot()
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
        pyplot().close(fig)
        return None
    if key == "grad_norm_layers":
        ax.set_yscale("log")
    ax.set(title=title, xlabel="layer", ylabel=ylabel)
    ax.legend(fontsize=7)
    return png(fig)


_UNITS = {"spans": "mean span (tokens)", "layer_grad_norms": "gradient norm", "residual_coefs": "coefficient"}


def plot_recorded(col: Collected, colors, family: str, title: str) -> bytes | None:
    """Series a mechanism logged to metrics.jsonl, over training: one panel per variant that has any
    (its first seed), and a layer × head heat map of the last values when the keys are 2-D."""
    plt = pyplot()
    have = [(v, rs[0]["diagnostics"]["recorded"][family]) for v, rs in col.results.items()
            if ((rs[0].get("diagnostics") or {}).get("recorded") or {}).get(family)]
    if not have:
        return None
    fig, axes = plt.subplots(1, len(have) + 1, figsize=(4.4 * (len(have) + 1), 3.4), squeeze=False)
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
    return png(fig)


def plot_compute(col: Collected, colors) -> bytes | None:
    plt = pyplot()
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
    return png(fig)


def _recorded(family: str) -> Callable[[Collected], bool]:
    """Whether any run logged series of `family` to its metrics (study/recorded.py)."""
    def has(col: Collected) -> bool:
        return any(((r.get("diagnostics") or {}).get("recorded") or {}).get(family) for rs in col.results.values()
                   for r in rs)
    return has


@dataclass(frozen=True)
class Figure:
    title: str
    caption: str
    draw: Callable[[Collected, dict[str, str]], bytes | None]  # (results, variant → colour) → PNG, None: no data
    has_data: Callable[[Collected], bool] = lambda col: True  # without drawing (build(plots=False))


FIGURES = [
    Figure("Loss curves", "Mean over seeds. Left: training loss per step (tasks and text weighted by their share); "
           "right: held-out text loss at each evaluation.", plot_loss),
    Figure("Bits per byte by token position (1×, 2×, 4× the training context)",
           "Held-out text read in one pass; x: the end of each log₂ bucket of positions. Beyond 1× a dense model "
           "sees positions it never trained on (its sliding-window numbers are in the table above).", plot_position),
    Figure("Long-range accuracy by distance (dotted: chance)",
           "Exact match of the answer, mean ± sd over seeds, against the distance in tokens from the evidence.",
           plot_longrange),
    Figure("Per-layer gradient norms at the end of training (measured after training)",
           "Norm of each block's parameter gradient on held-out windows (log scale): vanishing gradients show as "
           "early layers far below late ones.",
           lambda col, colors: plot_layers(col, colors, "grad_norm_layers", "‖∂L/∂θ‖ per block", "gradient norm")),
    Figure("Per-layer gradient norms over training (recorded by the run)",
           "The first seed of each variant; one line per layer.",
           lambda col, colors: plot_recorded(col, colors, "layer_grad_norms", "grad norms"),
           _recorded("layer_grad_norms")),
    Figure("Attention ablation: loss increase when a layer's attention is zeroed",
           "Mean ± sd over seeds; higher means the layer's attention matters more.",
           lambda col, colors: plot_layers(col, colors, "attn_ablation", "attention importance", "Δ loss (nats)")),
    Figure("Spans per layer and head over training",
           "Learned-span variants, first seed: the mean span (tokens) of each layer over training (mean over heads "
           "when there are many), and the last logged mean span per layer × head.",
           lambda col, colors: plot_recorded(col, colors, "spans", "spans"), _recorded("spans")),
    Figure("Residual coefficients over training", "Dynamic-residual variants, first seed: the learned coefficients.",
           lambda col, colors: plot_recorded(col, colors, "residual_coefs", "coefficients"),
           _recorded("residual_coefs")),
    Figure("Compute", "Mean ± sd over seeds. ms/step and tokens/s are from each run's own log at the training "
           "context; the long-length cost is in the Cost table.", plot_compute),
]
