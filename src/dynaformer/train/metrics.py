"""metrics.jsonl (one JSON object per log or eval step) and the one-line console metric format."""

from __future__ import annotations

import json
import math
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            # Drop lines from after the checkpoint we resume from: they will be recomputed.
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self._f = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def format_train_line(r: dict, max_steps: int) -> str:
    return (f"step {r['step']:>6}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.2f} | {r['tok_s'] / 1000:.1f}k tok/s | {r['ms_step']:.1f} ms/step | "
            f"{r['elapsed_s']:.1f}s")


def format_eval_line(r: dict) -> str:
    return f"eval {r['step']:>6} | val_loss {r['val_loss']:.4f} | val_bpb {r['val_bpb']:.4f} | {r['elapsed_s']:.1f}s"
