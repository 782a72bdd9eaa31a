"""One grid cell: train (resuming if a checkpoint is there), evaluate, write result.json atomically.

Runs in its own process (`python -m dynaformer.study.cell CELL_DIR`) so that peak memory is the
cell's own and a crash stays in its cell; `run_cell` is also callable in-process (tests). The cell's
kind (study/kinds.py) picks what runs: run_lm_cell, run_pretrain_cell or run_encoder_cell.

    CELL_DIR/cell.json    what to run (model, train, eval plan), written by `compare`
    CELL_DIR/run/         the run folder (dynaformer train layout)
    CELL_DIR/result.json  everything the report needs; its presence marks the cell done
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from ..configtools import from_dict
from ..data import eval_windows
from ..errors import DynaformerError, Interrupted
from ..eval.compute import compute_summary, peak_memory_bytes
from ..eval.diagnostics import attention_ablation, block_grad_norms
from ..eval.longrange import evaluate_longrange
from ..eval.perplexity import evaluate_windows
from ..eval.text import evaluate_text
from ..files import write_json_strict
from ..locks import hostname
from ..model import ModelConfig
from ..train.config import TrainConfig
from ..train.metrics import read_metrics
from .kinds import ENCODER, ENCODER_PRETRAIN, kind_of
from .recorded import recorded_diagnostics


def _finite(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def last_step(cell_dir: Path) -> int:
    """The last step the cell's run logged (0 before its first log line): read from the end of metrics.jsonl,
    which a running trainer appends to, so it is cheap to poll."""
    try:
        with open(cell_dir / "run" / "metrics.jsonl", "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 4096))
            lines = [ln for ln in f.read().decode(errors="ignore").splitlines() if ln.startswith("{")]
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (OSError, ValueError, KeyError, IndexError):
        return 0


def run_cell(cell_dir: Path, progress_bar: bool = False) -> dict:
    """Run the cell that cell_dir/cell.json describes, by its kind."""
    spec = json.loads((cell_dir / "cell.json").read_text())
    return kind_of(spec).run(cell_dir, spec, progress_bar)


def run_lm_cell(cell_dir: Path, spec: dict, progress_bar: bool = False) -> dict:
    """Train the language model (its fixed window first matched to the reach of its match_reach cell), then
    evaluate it on the grid's eval plan."""
    model = dict(spec["model"])
    matched = None
    if spec.get("match_reach"):
        model["span_window"] = matched = matched_window_of(Path(spec["match_reach"]["cell"]),
                                                           int(model["context_len"]))
    trainer, summary = _train_cell(cell_dir, model, spec["train"], progress_bar)
    if trainer is None:  # a rank other than 0 of a torchrun cell: rank 0 evaluates and writes the result
        return {}
    result = evaluate_trained(trainer, spec["eval"])
    result.update({"variant": spec["variant"], "seed": spec["seed"], "status": "ok", "summary": summary,
                   "host": hostname(), "model": model, "train": spec["train"]})
    if matched is not None:
        result["matched_window"] = {"window": matched, "from": spec["match_reach"]["variant"]}
    write_json_strict(cell_dir / "result.json", _finite(result))
    return result


def run_pretrain_cell(cell_dir: Path, spec: dict, progress_bar: bool = False) -> dict:
    """Masked-LM pretraining: its product is the run folder, which the encoder cells fine-tune from."""
    trainer, summary = _train_cell(cell_dir, dict(spec["model"]), spec["train"], progress_bar)
    if trainer is None:
        return {}
    result = {"kind": ENCODER_PRETRAIN.name, "variant": spec["variant"], "seed": spec["seed"], "status": "ok",
              "summary": summary, "val_loss": summary.get("val_loss"), "steps": trainer.step,
              "elapsed_s": trainer.elapsed(), "model": spec["model"], "train": spec["train"]}
    write_json_strict(cell_dir / "result.json", _finite(result))
    return result


def _train_cell(cell_dir: Path, model: dict, train: dict, progress_bar: bool):
    """Train the cell's run folder (cell_dir/run), resuming from its newest checkpoint: (trainer, summary), or
    (None, {}) on a rank other than 0."""
    run_dir = cell_dir / "run"
    if run_dir.exists() and not (run_dir / "run.json").is_file():
        shutil.rmtree(run_dir)  # killed while the run folder was being created: start it again
    mcfg = from_dict(ModelConfig, model, "model")
    tcfg = from_dict(TrainConfig, {**train, "out": str(run_dir), "resume": "auto", "progress_bar": progress_bar},
                     "train")
    return _train(mcfg, tcfg)


def _train(mcfg: ModelConfig, tcfg: TrainConfig):
    """Train the cell's run, in this process or as one rank of a torchrun job (`compare --nproc_per_cell`).
    Returns (trainer, summary) on rank 0, whose trainer then holds the whole model; (None, {}) elsewhere."""
    from ..train import distributed
    from ..train.rundir import locked_run
    from ..train.state import model_state
    from ..train.trainer import Trainer, resolve_device

    dist = distributed.init_distributed(resolve_device(tcfg.device))
    try:
        with locked_run(mcfg, tcfg, dist) as run:
            trainer = Trainer(run, dist)
            summary = trainer.fit()
            if trainer.sharded:  # the evaluation runs on rank 0 alone: gather the FSDP shards there
                from ..model import Transformer

                full = model_state(trainer.model, True)
                if dist.is_main:
                    whole = Transformer(mcfg)
                    whole.load_state_dict(full, strict=False)
                    trainer.model = whole.to(trainer.device)
    finally:
        distributed.shutdown(dist)
    return (trainer, summary) if dist.is_main else (None, {})


def matched_window_of(source: Path, context_len: int) -> int:
    """The fixed window doing the attention work of the trained learned-span cell `source` (its measured
    keys per query at the training context)."""
    from ..model.span_stats import matched_window

    try:
        reach = json.loads((source / "result.json").read_text())["span_reach"]
    except (OSError, ValueError, KeyError, TypeError):
        raise DynaformerError(f"match_reach: '{source}' has no finished result with span_reach") from None
    return matched_window(float(reach["keys_per_query"]), context_len)


def run_encoder_cell(cell_dir: Path, spec: dict, progress_bar: bool = False) -> dict:
    """Fine-tune a bidirectional classifier on the cell's task, from scratch or from the pretraining cell's
    encoder (`finetune.init`), resuming from its newest checkpoint; record accuracy, macro-F1 and accuracy
    by distance."""
    from ..runs import load_backbone
    from ..train.finetune import finetune, read_finetune

    fcfg = read_finetune({**spec["finetune"], "out": str(cell_dir / "run"), "resume": "auto",
                          "progress_bar": progress_bar})
    res = finetune(fcfg, from_dict(ModelConfig, spec["model"], "model"), load_backbone)
    metrics = read_metrics(cell_dir / "run" / "metrics.jsonl")
    result = {"kind": ENCODER.name, "variant": spec["variant"], "seed": spec["seed"], "task": spec["task"],
              "status": "ok", "accuracy": res["accuracy"], "macro_f1": res["macro_f1"],
              "accuracy_by_distance": res["accuracy_by_distance"], "chance": res["chance"], "params": res["params"],
              "steps": res["step"], "elapsed_s": metrics[-1]["elapsed_s"] if metrics else None,
              "curve": [[r["step"], r["val_accuracy"]] for r in metrics if "val_accuracy" in r],
              "pretrained": bool(spec["finetune"].get("init")),
              "model": spec["model"], "finetune": spec["finetune"]}
    write_json_strict(cell_dir / "result.json", _finite(result))
    return result


def task_params(data: str) -> dict[str, dict]:
    """The task parameters a run trained with (passkey digits, summary visits, ...), so that the long-range
    evaluation asks the same tasks."""
    from ..data.tasks import is_task_spec, parse_task_spec

    return parse_task_spec(data).params if is_task_spec(data) else {}


def evaluate_trained(trainer, ev: dict) -> dict:
    """Everything measured after training: text by position, the long-range suite, train/val gap,
    diagnostics (gradient norms, attention ablation), compute."""
    model, run = trainer.model, trainer.run_info
    torch.manual_seed(0)
    C = model.cfg.context_len
    token_bytes = torch.from_numpy(run.tokenizer.token_bytes())
    text = evaluate_text(model, np.asarray(run.splits.val), C, ev["text_tokens"], ev["multiples"],
                         ev["batch_size"], token_bytes)
    train_w = eval_windows(np.asarray(run.splits.train), C, ev["text_tokens"])
    val_w = eval_windows(np.asarray(run.splits.val), C, ev["text_tokens"])
    tr = evaluate_windows(model, train_w, ev["batch_size"], token_bytes)
    va = evaluate_windows(model, val_w, ev["batch_size"], token_bytes)
    tasks = ev["tasks"] if run.tokenizer.kind == "byte" else []
    longrange = evaluate_longrange(model, C, tasks, ev["n_per_distance"], ev["fractions"],
                                   batch_size=ev["batch_size"], params=task_params(trainer.cfg.data)) if tasks else None
    diag_w = val_w[: ev["diag_windows"]]
    reach = _span_reach(model, diag_w[:, :-1])
    metrics = read_metrics(run.dir / "metrics.jsonl")
    ablation = attention_ablation(model, diag_w, batch_size=None)
    diagnostics = {"grad_norm_layers": block_grad_norms(model, diag_w),
                   "attn_ablation": {"base_loss": ablation["base_loss"], "delta": ablation["attn_ablation_increase"]},
                   **recorded_diagnostics(metrics)}
    compute = compute_summary(model, metrics, C, windows=diag_w[:, :-1])
    compute["peak_memory"], compute["peak_memory_kind"] = peak_memory_bytes(trainer.device)
    curve = [[r["step"], r["loss"]] for r in metrics if "loss" in r]
    val_curve = [[r["step"], r["val_loss"], r.get("val_bpb")] for r in metrics if "val_loss" in r]
    return {"text": text, "longrange": longrange, "train_loss": tr["loss"], "val_loss": va["loss"],
            "val_bpb": va["bpb"], "gen_gap": va["loss"] - tr["loss"], "diagnostics": diagnostics,
            "compute": compute, "curve": curve, "val_curve": val_curve,
            "span_reach": reach, "elapsed_s": trainer.elapsed(), "steps": trainer.step,
            "tokens": trainer.step * trainer.cfg.batch_size * trainer.cfg.grad_accum * C}


@torch.no_grad()
def _span_reach(model: torch.nn.Module, windows: torch.Tensor) -> dict | None:
    from ..model.span_stats import span_reach

    was = model.training
    model.eval()
    model(windows.to(next(model.parameters()).device))
    model.train(was)
    return span_reach(model, windows.shape[1]) or None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m dynaformer.study.cell CELL_DIR", file=sys.stderr)
        return 2
    try:
        run_cell(Path(argv[0]))
    except Interrupted as e:
        print(f"cell {argv[0]}: {e}", file=sys.stderr)
        return 130
    except DynaformerError as e:
        print(f"cell {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
