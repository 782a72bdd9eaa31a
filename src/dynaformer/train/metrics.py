"""metrics.jsonl (one JSON object per log or eval step) and the one-line console metric format."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..files import write_text_atomic


class MetricsLog:
    """metrics.jsonl always; with `tensorboard_dir`, every numeric field also as a TensorBoard scalar
    (tag `train/loss`, `eval/val_loss`, ... by record kind, x-axis = step), and every per-layer or per-head
    series (spans, residual coefficients, layer gradient norms) as grouped scalars `span_mean/L0.H1`, ...,
    one chart per series in the custom-scalars tab."""

    def __init__(self, path: Path, resume_step: int | None = None, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            # Drop lines from after the checkpoint we resume from: they will be recomputed.
            # A line cut short by a hard kill is dropped too.
            kept = [ln for ln in path.read_text().splitlines() if (r := _parse(ln)) and r.get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(ln + "\n" for ln in kept))
        self._f = open(path, "a", buffering=1)
        self._tb = None
        self._series: set[str] = set()  # list-valued keys seen, for the custom-scalars layout
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events from after the resumed checkpoint, as the JSONL truncation above does.
            self._tb = SummaryWriter(str(tensorboard_dir), purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        if self._tb is not None:
            group = "eval" if any(k.startswith("val_") for k in record) else "train"
            for k, v in clean.items():
                if k != "step" and _is_number(v):
                    self._tb.add_scalar(f"{group}/{k}", v, global_step=record["step"])
                elif isinstance(v, list):
                    self._write_series(k, v, record["step"])

    def _write_series(self, key: str, values: list, step: int) -> None:
        """A per-layer (or per-layer, per-head) list as one scalar per element, tagged `key/L0.H1`: TensorBoard
        shows a section per series, and the custom-scalars layout draws each series in one chart."""
        points = [(name, v) for name, v in _series_points(key, values) if _is_number(v)]
        if not points:
            return
        for name, v in points:
            self._tb.add_scalar(f"{key}/{name}", v, global_step=step)
        if key not in self._series:
            self._series.add(key)
            layout = {k: ["Multiline", [rf"^{k}/"]] for k in sorted(self._series)}
            self._tb.add_custom_scalars({"per layer / per head": layout})

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _series_points(key: str, values: list) -> list[tuple[str, object]]:
    """Element names of a recorded series: residual coefficients are per sub-layer (attention, MLP of each
    layer: `L0.attn`, `L0.mlp`), nested lists per layer and head (`L0.H1`), other lists per layer (`L0`)."""
    out: list[tuple[str, object]] = []
    for i, v in enumerate(values):
        if isinstance(v, list):
            out += [(f"L{i}.H{j}", u) for j, u in enumerate(v)]
        elif key.startswith("res_"):
            out.append((f"L{i // 2}.{'attn' if i % 2 == 0 else 'mlp'}", v))
        else:
            out.append((f"L{i}", v))
    return out


def _parse(line: str) -> dict | None:
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) else None


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl (a line cut short by a crash is skipped)."""
    return [r for ln in path.read_text().splitlines() if (r := _parse(ln))]


def format_train_line(r: dict, max_steps: int) -> str:
    return (f"step {r['step']:>6}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
            f"gnorm {r['grad_norm']:.2f} | {r['tok_s'] / 1000:.1f}k tok/s | {r['ms_step']:.1f} ms/step | "
            f"{r['elapsed_s']:.1f}s")


def format_eval_line(r: dict) -> str:
    tasks = ""
    if "val_answer_loss" in r:  # task runs: the answers' loss and exact match, overall and per task
        per = " ".join(f"{k.removeprefix('val_exact_')} {v:.2f}" for k, v in r.items() if k.startswith("val_exact_"))
        tasks = f" | answer_loss {r['val_answer_loss']:.4f} | exact {r['val_exact']:.3f} ({per})"
    return (f"eval {r['step']:>6} | val_loss {r['val_loss']:.4f} | val_bpb {r['val_bpb']:.4f}{tasks} | "
            f"{r['elapsed_s']:.1f}s")
