"""Mechanism-agnostic diagnostics measured by the harness, and the ones mechanisms record themselves.

Measured here on a trained model (any residual or span kind): per-layer gradient norms of the
validation loss (vanishing gradients: the first/last ratio) and per-layer attention ablation (the
validation-loss increase when one layer's attention output is zeroed: the role of attention per layer).

Recorded by the mechanisms into metrics.jsonl and picked up by family (keys are matched loosely so the
mechanism modules keep their own names):
- per-layer gradient norms over training: keys like `grad_norm/layer3`, `grad_norm_l3`, or a list under
  `layer_grad_norms` / `grad_norms`;
- spans: keys containing `span` (`span/layer2/head1`, `span_mean/l2`, or lists per layer [per head]);
- residual coefficients: keys starting with `res` or containing `coef`, `gate`, `alpha`, `beta`, `gamma`
  or `scale` (scalars or lists per layer).
"""

from __future__ import annotations

import re

import torch

FAMILIES = {
    "layer_grad_norms": re.compile(r"^(layer_grad_norms?|grad_norms|grad_norm[/_.:-].+)$"),
    "spans": re.compile(r"span", re.I),
    "residual_coefs": re.compile(r"^res|coef|gate|alpha|beta|gamma|scale", re.I),
}
_SKIP = {"step", "elapsed_s", "loss", "lr", "grad_norm", "tok_s", "ms_step", "progress", "val_loss", "val_bpb"}


def _flatten(key: str, value) -> dict[str, float]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {key: float(value)}
    if isinstance(value, list):
        out: dict[str, float] = {}
        for i, v in enumerate(value):
            out.update(_flatten(f"{key}/{i}", v))
        return out
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(f"{key}/{k}", v))
        return out
    return {}


def recorded_diagnostics(metrics: list[dict]) -> dict:
    """{"recorded": {family: {"steps": [...], "series": {name: [values aligned to steps, None if absent]}}}}"""
    fam: dict[str, dict[int, dict[str, float]]] = {f: {} for f in FAMILIES}
    for r in metrics:
        step = r.get("step")
        for key, value in r.items():
            if key in _SKIP or step is None:
                continue
            for fname, rx in FAMILIES.items():
                if rx.search(key):
                    fam[fname].setdefault(step, {}).update(_flatten(key, value))
                    break
    out = {}
    for fname, by_step in fam.items():
        if not by_step:
            continue
        steps = sorted(by_step)
        names = sorted({n for d in by_step.values() for n in d})
        out[fname] = {"steps": steps, "series": {n: [by_step[s].get(n) for s in steps] for n in names}}
    return {"recorded": out}


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(getattr(model, "blocks", []))


def layer_grad_norms(model: torch.nn.Module, windows: torch.Tensor) -> list[float]:
    """‖∂L/∂θ_l‖ per block l for the mean loss over `windows` (N, T+1): vanishing gradients show as
    small norms in the first layers."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)
    with torch.enable_grad():
        _, loss = model(x, y)
        loss.backward()
    norms = []
    for blk in _blocks(model):
        sq = sum(float(p.grad.double().pow(2).sum()) for p in blk.parameters() if p.grad is not None)
        norms.append(sq**0.5)
    model.zero_grad(set_to_none=True)
    model.train(was)
    return norms


@torch.no_grad()
def attention_ablation(model: torch.nn.Module, windows: torch.Tensor) -> dict:
    """Validation-loss increase when each layer's attention output is replaced by zeros."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    x, y = windows[:, :-1].to(device), windows[:, 1:].to(device)
    base = float(model(x, y)[1])
    deltas = []
    for blk in _blocks(model):
        handle = blk.attn.register_forward_hook(lambda m, a, out: torch.zeros_like(out))
        try:
            deltas.append(float(model(x, y)[1]) - base)
        finally:
            handle.remove()
    model.train(was)
    return {"base_loss": base, "delta": deltas}
