"""The diagnostics mechanisms record themselves into metrics.jsonl during training, grouped by family for
the report (the ones the study measures on the trained model are in eval/diagnostics.py).

Keys are matched loosely so the mechanism modules keep their own names:
- per-layer gradient norms over training: keys like `grad_norm/layer3`, `grad_norm_l3`, or a list under
  `layer_grad_norms` / `grad_norms`;
- spans: keys containing `span` (`span/layer2/head1`, `span_mean/l2`, or lists per layer [per head]);
- residual coefficients: keys starting with `res` or containing `coef`, `gate`, `alpha`, `beta`, `gamma`
  or `scale` (scalars or lists per layer).
"""

from __future__ import annotations

import re

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
