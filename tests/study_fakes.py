"""Fake study cells for the report's statistics, wall-clock and Findings tests: result dicts with the metrics the
verdicts read, cell folders whose metrics.jsonl holds a known training curve, and a Collected of them, so that
report.json is built in milliseconds without training anything."""

from __future__ import annotations

import json
from pathlib import Path

from dynaformer.study.collect import Collected


def fake_result(variant: str, seed: int, *, bpb: float = 2.0, gap: float = 0.0, far: float = 0.3, qa: float = 0.8,
                summary: float = 0.7, ms: float = 100.0, decode: float = 10.0, grad: tuple = (1.0, 1.0),
                attn: tuple = (0.5, 0.5), long_bpb: float = 2.5, context: int = 128) -> dict:
    """A finished language-model cell's result.json, reduced to what verdicts.METRICS and the limits read."""
    return {"variant": variant, "seed": seed, "status": "ok", "val_bpb": bpb, "gen_gap": gap, "elapsed_s": 60.0,
            "tokens": 1_000_000, "model": {"n_layer": len(attn), "d_model": 64, "context_len": context},
            "compute": {"params": 100_000, "ms_step": ms},
            "text": {"contexts": [{"multiple": 1, "context": context, "bpb": bpb, "buckets": [{"bpb": bpb}]},
                                  {"multiple": 4, "context": 4 * context, "bpb": long_bpb}]},
            "longrange": {"far_exact": far, "tasks": {
                "storyqa": {"distance": [8, 64], "chance": 0.1, "exact": [qa, qa]},
                "summary": {"distance": [8, 64], "chance": 0.0, "exact": [summary, summary],
                            "rouge_l": [summary, summary]}}},
            "diagnostics": {"grad_norm_layers": list(grad), "attn_ablation": {"delta": list(attn)}},
            "cost": {"lengths": [1024, 4096], "train_ms": [ms / 4, ms], "decode_ms": [decode / 4, decode]}}


def write_curve(cell_dir: Path, ms_step: float, evals: dict[int, dict], steps: int, log_every: int = 100,
                pause_s: float = 7.0) -> None:
    """cell_dir/run/metrics.jsonl as the trainer writes it: a log row every `log_every` steps (ms_step: the steps'
    mean time), an evaluation row at each step of `evals` (its values), and `pause_s` of evaluation time that
    elapsed_s counts and ms_step does not."""
    rows, elapsed = [], 0.0
    for step in range(log_every, steps + 1, log_every):
        elapsed += log_every * ms_step / 1000
        rows.append({"step": step, "elapsed_s": round(elapsed, 4), "loss": 1.0, "lr": 1e-3, "grad_norm": 1.0,
                     "tok_s": 1.0, "ms_step": ms_step})
        if step in evals:
            elapsed += pause_s
            rows.append({"step": step, "elapsed_s": round(elapsed, 4), "val_loss": 1.0, **evals[step]})
    (cell_dir / "run").mkdir(parents=True, exist_ok=True)
    (cell_dir / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def fake_collected(results: dict[str, list[dict]], root: Path | None = None, questions: dict | None = None,
                   grid: str = "fake-grid") -> Collected:
    """A Collected of these results; with `root`, each cell gets a folder root/cells/VARIANT/seedS (where
    write_curve puts its metrics.jsonl)."""
    col = Collected()
    col.grids.append(grid)
    col.questions.update(questions or {"reference": "baseline", "residual": "dyn_residual", "span": "dyn_span"})
    for v, rs in results.items():
        for r in rs:
            d = (root or Path("/nonexistent")) / "cells" / v / f"seed{r['seed']}"
            if root is not None:
                d.mkdir(parents=True, exist_ok=True)
            col.add(r, d)
    return col
