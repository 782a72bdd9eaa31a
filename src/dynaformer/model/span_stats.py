"""Span statistics for logs and plots: mean / max span per layer and head, and the attention work the
band kernel actually does (query·key pairs) versus dense causal attention."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..kernels import band_flops
from ..plotting import pyplot


def _last_spans(model: nn.Module) -> list[tuple[nn.Module, torch.Tensor]]:
    """[(span module, its spans z (1|B, H, 1|T) in the model's last forward)] per layer; [] for a model without
    spans or before its first forward."""
    spans = [b.attn.span for b in getattr(model, "blocks", [])]
    if not spans or spans[0] is None or getattr(model, "last_outputs", None) is None:
        return []
    z = model.last_outputs.spans
    return [(span, z[i]) for i, span in enumerate(spans) if i in z]


@torch.no_grad()
def span_stats(model: nn.Module, seq_len: int | None = None) -> dict:
    """From the spans of the last forward: {"span_mean": [[per head] per layer], "span_max": ...,
    "attn_pairs_frac": computed / dense pairs}; {} for a model without spans."""
    spans = _last_spans(model)
    if not spans:
        return {}
    means, maxes, computed, dense = [], [], 0, 0
    for span, z in spans:
        z = z.float()  # (1|B, H, 1|T)
        means.append([round(float(x), 2) for x in z.mean(dim=(0, 2))])
        maxes.append([round(float(x), 2) for x in z.amax(dim=(0, 2))])
        T = seq_len or z.shape[-1]
        if T > 1:
            c, d = band_flops(z.expand(z.shape[0], z.shape[1], T), T, T, span.ramp, span.hard)
            computed, dense = computed + c, dense + d
    out = {"span_mean": means, "span_max": maxes}
    if dense:
        out["attn_pairs_frac"] = round(computed / dense, 4)
    return out


@torch.no_grad()
def span_reach(model: nn.Module, seq_len: int) -> dict:
    """From the spans of the last forward over sequences of seq_len = T tokens: the mean reach z + R over layers,
    heads and tokens, and the keys a query actually weights, mean over layers, heads and positions t of
    min(t + 1, z + R) — the attention work a fixed window must match; {} for a model without spans."""
    spans = _last_spans(model)
    if not spans:
        return {}
    reach, keys = [], []
    for span, z in spans:
        r = z.float() + span.ramp  # (1|B, H, 1|T)
        reach.append(float(r.mean()))
        pos = torch.arange(1, seq_len + 1, dtype=r.dtype)
        keys.append(float(torch.minimum(r, pos).mean()))
    return {"mean_reach": round(sum(reach) / len(reach), 3), "keys_per_query": round(sum(keys) / len(keys), 3)}


def matched_window(keys_per_query: float, T: int) -> int:
    """The smallest fixed window w whose keys per query at length T, mean over t of min(t + 1, w), reach
    `keys_per_query`: a sliding window doing the same attention work as a learned span."""
    for w in range(1, T + 1):
        if sum(min(t + 1, w) for t in range(T)) / T >= keys_per_query:
            return w
    return T


def plot_span_heatmap(records: list[dict], path: Path) -> Path | None:
    """Heat map of the mean span per (layer, head) over training from metrics records; None without
    matplotlib or span records."""
    recs = [r for r in records if "span_mean" in r]
    if not recs:
        return None
    plt = pyplot()
    if plt is None:
        return None
    steps = [r["step"] for r in recs]
    grid = torch.tensor([[x for layer in r["span_mean"] for x in layer] for r in recs]).T  # (L·H, steps)
    n_layer, n_head = len(recs[0]["span_mean"]), len(recs[0]["span_mean"][0])
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.3 * n_layer * n_head + 2.5))
    im = axes[0].imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest",
                        extent=(steps[0], steps[-1], n_layer * n_head - 0.5, -0.5))
    axes[0].set_yticks(range(n_layer * n_head), [f"L{i // n_head}H{i % n_head}" for i in range(n_layer * n_head)],
                       fontsize=6)
    axes[0].set_xlabel("step")
    axes[0].set_title("mean span per layer/head (tokens)")
    fig.colorbar(im, ax=axes[0])
    last = torch.tensor(recs[-1]["span_mean"])
    im2 = axes[1].imshow(last.numpy(), aspect="auto", cmap="viridis")
    axes[1].set_xticks(range(n_head))
    axes[1].set_yticks(range(n_layer))
    axes[1].set_xlabel("head")
    axes[1].set_ylabel("layer")
    axes[1].set_title(f"final mean span (step {steps[-1]})")
    fig.colorbar(im2, ax=axes[1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
