"""Per-layer diagnostics of a model on token windows (docs/design.md §7), and their plots:

- gradient norms per block: of the attention and MLP weights' current gradients (`layer_grad_norms`, which
  the trainer logs at each log step; `grad_norms` after one backward on windows, with the first/last ratio
  that tests the vanishing-gradient claims), or of all of a block's parameters after one backward on windows
  (`block_grad_norms`, the study's measure);
- branch-to-stream norm ratio per sub-layer: how much each update moves the stream;
- attention ablation per layer: the loss increase when one layer's attention output is zeroed (the role of
  attention per layer);
- the learned residual coefficients, and for `dynamic` the distribution of the per-token weight;
- plots: per-layer numbers, and gradient norms and coefficients over training (from metrics.jsonl,
  where the trainer logs `layer_grad_norm` and `res_*` at each log step).

Everything takes a model and token windows (N, T+1), so it works on any checkpoint; runs.diagnose_run does
it for a run folder and writes diagnostics.json and plots into it.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model.residual import DynamicResidual, residual_modules, residual_stats
from ..plotting import pyplot


def _blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.blocks)


def _branch_params(block: nn.Module, which: str) -> list[torch.Tensor]:
    return [p for p in getattr(block, which).parameters()]


@torch.no_grad()
def layer_grad_norms(model: nn.Module) -> list[float]:
    """Per block: the L2 norm of the current .grad of its attention and MLP weights (residual-mechanism
    parameters and norms excluded, so kinds are comparable). NaN for a block without gradients."""
    out = []
    for block in _blocks(model):
        grads = [p.grad for p in _branch_params(block, "attn") + _branch_params(block, "mlp") if p.grad is not None]
        norms = [_full(g.float().norm()) for g in grads]  # FSDP: a DTensor's norm is reduced over ranks
        out.append(float(torch.linalg.vector_norm(torch.stack(norms))) if norms else math.nan)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _split(windows: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    w = windows.to(device)
    return w[:, :-1], w[:, 1:]


@contextlib.contextmanager
def _backward(model: nn.Module, windows: torch.Tensor) -> Iterator[torch.Tensor]:
    """One forward/backward of the mean loss on `windows` (N, T+1) in eval mode (no dropout: the gradient of
    the function evaluated), from no gradients; yields the loss while the .grad are there, then clears them."""
    x, y = _split(windows, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            _, loss = model(x, y)
            loss.backward()
        yield loss
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def grad_norms(model: nn.Module, windows: torch.Tensor) -> dict:
    """One forward/backward on `windows` (N, T+1): per-layer gradient norms (`layer_grad_norms`) and the
    first/last ratio. Leaves the model's .grad as it found them (none)."""
    with _backward(model, windows) as loss:
        norms = layer_grad_norms(model)
    return {"layer_grad_norm": norms, "grad_ratio_first_last": norms[0] / norms[-1] if norms[-1] > 0 else math.inf,
            "loss": float(loss.detach())}


def block_grad_norms(model: nn.Module, windows: torch.Tensor) -> list[float]:
    """‖∂L/∂θ_l‖ per block l for the mean loss over `windows` (N, T+1), over all of the block's parameters
    (residual gates and norms included), summed in float64: vanishing gradients show as small norms in the
    first layers. The study's per-layer gradient norms (result.json `grad_norm_layers`)."""
    with _backward(model, windows):
        return [sum(float(p.grad.double().pow(2).sum()) for p in blk.parameters() if p.grad is not None) ** 0.5
                for blk in _blocks(model)]


@torch.no_grad()
def branch_stream_ratios(model: nn.Module, windows: torch.Tensor) -> list[float]:
    """Per sub-layer (attention, MLP, attention, ...): mean over tokens of ‖update‖ / ‖skip‖. For additive
    kinds the update is what the sub-layer adds to the stream (weights included: output − input); for
    post-norm kinds (postnorm, deepnorm) it is the branch output against the weighted skip α·x."""
    device = next(model.parameters()).device
    x, _ = _split(windows, device)
    mods = residual_modules(model)
    branches = [m for b in _blocks(model) for m in (b.attn, b.mlp)]
    seen: dict[int, dict] = {i: {} for i in range(len(mods))}
    handles = []
    for i, (res, br) in enumerate(zip(mods, branches, strict=True)):
        handles.append(res.register_forward_pre_hook(lambda mod, args, i=i: seen[i].__setitem__("x", args[0])))
        handles.append(res.register_forward_hook(lambda mod, args, out, i=i: seen[i].__setitem__("out", out)))
        handles.append(br.register_forward_hook(lambda mod, args, out, i=i: seen[i].__setitem__("f", out)))
    sums = [0.0] * len(mods)
    count = 0
    was_training = model.training
    model.eval()
    try:
        for j in range(0, len(x), 16):
            model(x[j : j + 16])
            for i, res in enumerate(mods):
                s = seen[i]
                split = getattr(res, "update_and_skip", None)  # kinds with several streams (model/streams.py)
                if split is not None:
                    upd, skip = split(s["x"], s["out"], s["f"])
                elif res.additive:
                    upd, skip = s["out"] - s["x"], s["x"]
                else:
                    upd, skip = s["f"], res.skip_scale * s["x"]
                ratio = upd.float().norm(dim=-1) / skip.float().norm(dim=-1).clamp_min(1e-12)  # (B, T)
                sums[i] += float(ratio.sum())
            count += x[j : j + 16].numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return [s / count for s in sums]


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int | None = 16) -> float:
    """Mean token loss: the model's own over one batch (batch_size None), or summed over batches."""
    if batch_size is None:
        return float(model(x, y)[1])
    total = 0.0
    for j in range(0, len(x), batch_size):
        logits, _ = model(x[j : j + batch_size])
        total += float(F.cross_entropy(logits.float().transpose(1, 2), y[j : j + batch_size], reduction="sum"))
    return total / y.numel()


@torch.no_grad()
def attention_ablation(model: nn.Module, windows: torch.Tensor, batch_size: int | None = 16) -> dict:
    """Loss with each layer's attention output zeroed (one layer at a time), and the increase over the intact
    model: {"base_loss", "attn_ablation_increase": per layer}. A layer whose attention matters shows a large
    increase. batch_size None scores all windows in one batch with the model's own loss (the study's way)."""
    x, y = _split(windows, next(model.parameters()).device)
    was_training = model.training
    model.eval()
    base = _loss(model, x, y, batch_size)
    increase = []
    try:
        for block in _blocks(model):
            h = block.attn.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
            try:
                increase.append(_loss(model, x, y, batch_size) - base)
            finally:
                h.remove()
    finally:
        model.train(was_training)
    return {"base_loss": base, "attn_ablation_increase": increase}


@torch.no_grad()
def dynamic_weight_stats(model: nn.Module, windows: torch.Tensor) -> dict[str, list[float]]:
    """For `dynamic` residuals: per sub-layer mean, std, min and max over tokens of the branch weight
    c·s(τ)·m(p, x), and its mean over the first and the last quarter of positions (the position effect)."""
    mods = [m for m in residual_modules(model) if isinstance(m, DynamicResidual)]
    if not mods:
        return {}
    device = next(model.parameters()).device
    x, _ = _split(windows, device)
    weights: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(mods))}

    def hook(mod, args, i):
        stream, _, ctx = args
        m = mod.multiplier(mod.norm(stream), ctx)
        B, T = stream.shape[:2]
        m = torch.ones(B, T) if m is None else torch.as_tensor(m, dtype=torch.float32).expand(B, T, 1)[..., 0]
        weights[i].append(m.float().cpu())

    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: hook(mod, args, i)) for i, m in enumerate(mods)]
    was_training = model.training
    model.eval()
    try:
        for j in range(0, len(x), 16):
            model(x[j : j + 16])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: dict[str, list[float]] = {k: [] for k in ("weight_mean", "weight_std", "weight_min", "weight_max",
                                                   "weight_first_quarter", "weight_last_quarter")}
    for i in range(len(mods)):
        w = torch.cat(weights[i])  # (N, T)
        q = max(1, w.shape[1] // 4)
        out["weight_mean"].append(float(w.mean()))
        out["weight_std"].append(float(w.std()) if w.numel() > 1 else 0.0)
        out["weight_min"].append(float(w.min()))
        out["weight_max"].append(float(w.max()))
        out["weight_first_quarter"].append(float(w[:, :q].mean()))
        out["weight_last_quarter"].append(float(w[:, -q:].mean()))
    return out


def diagnose(model: nn.Module, windows: torch.Tensor, grad_windows: int = 8) -> dict:
    """All per-layer diagnostics of `model` on `windows` (N, T+1)."""
    out = {"residual": model.cfg.residual, "n_layer": model.cfg.n_layer, "windows": len(windows),
           "progress": float(model.progress)}
    out.update(grad_norms(model, windows[:grad_windows]))
    out["branch_stream_ratio"] = branch_stream_ratios(model, windows)
    out.update(attention_ablation(model, windows))
    out["coefficients"] = residual_stats(model)
    out["dynamic_weight"] = dynamic_weight_stats(model, windows)
    return out


# --- plots -----------------------------------------------------------------------------------

def plot_diagnostics(diag: dict, path: Path) -> Path | None:
    """Bar charts of the per-layer numbers of `diagnose`. None when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return None
    panels = [("gradient norm per layer", diag["layer_grad_norm"], "layer", True),
              ("‖update‖ / ‖stream‖ per sub-layer", diag["branch_stream_ratio"], "sub-layer (attn, mlp, ...)", False),
              ("loss increase, attention zeroed", diag["attn_ablation_increase"], "layer", False)]
    for key, values in diag.get("dynamic_weight", {}).items():
        if key == "weight_mean":
            panels.append(("dynamic weight c·s·m (mean)", values, "sub-layer", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (title, values, xlabel, log) in zip(axes, panels, strict=True):
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        if log and all(v > 0 for v in values):
            ax.set_yscale("log")
    fig.suptitle(f"{diag['residual']}: diagnostics (first/last grad ratio {diag['grad_ratio_first_last']:.3g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_training(metrics_path: Path, path: Path) -> Path | None:
    """Per-layer gradient norms and residual coefficients over training, from metrics.jsonl.
    None when matplotlib is missing or the log holds neither."""
    plt = pyplot()
    if plt is None or not metrics_path.exists():
        return None
    records = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), list)]
              for k in sorted({k for r in records for k in r if k == "layer_grad_norm" or k.startswith("res_")})}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    ncols = min(4, len(series))
    nrows = -(-len(series) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
    for ax in axes.flat[len(series):]:
        ax.axis("off")
    for ax, (key, points) in zip(axes.flat, series.items(), strict=False):
        steps = [s for s, _ in points]
        n = max(len(v) for _, v in points)
        cmap = plt.get_cmap("viridis")
        for i in range(n):
            ys = [v[i] if i < len(v) and v[i] is not None else math.nan for _, v in points]
            ax.plot(steps, ys, color=cmap(i / max(1, n - 1)), lw=1, label=str(i) if n <= 8 else None)
        if key == "layer_grad_norm":
            ax.set_yscale("log")
        ax.set_title(key + (" (per layer)" if key == "layer_grad_norm" else " (per sub-layer)"), fontsize=10)
        ax.set_xlabel("step")
        if n <= 8:
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
