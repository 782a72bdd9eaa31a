"""A trained run put to use: load the model and tokenizer of a run folder's newest verified checkpoint (or of a
step-N folder), and evaluate it on text, sample from it, diagnose it, or hand its backbone to fine-tuning.

This sits above both `train/` (it reads checkpoints with train/checkpoint.py) and `eval/` (it measures with
it), so that the trainer can evaluate with eval/ while nothing in eval/ imports train/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .configtools import from_dict
from .data import eval_windows, open_splits, read_text, tokenizer_from_dict
from .data.tokenizers import ByteTokenizer, CharTokenizer
from .errors import CheckpointError, ConfigError, DynaformerError
from .eval.diagnostics import diagnose, plot_diagnostics, plot_training
from .eval.perplexity import evaluate_windows
from .model import ModelConfig, Transformer
from .model.generate import generate
from .model.memory import BYTES, param_bound
from .resources import check_fits_in_memory
from .train.checkpoint import (
    check_fits,
    latest_checkpoint,
    load_model_state,
    read_model_shapes,
    read_model_tensors,
    verify_checkpoint,
)


def resolve_checkpoint(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DynaformerError(f"'{p}' does not exist")
    if (p / "manifest.json").exists() or p.name.startswith("step-"):
        verify_checkpoint(p)
        return p
    ckpt = latest_checkpoint(p)
    if ckpt is None:
        raise CheckpointError(f"'{p}' holds no complete checkpoint (is it a run folder that finished a step?)")
    return ckpt


def load_model(path: str | Path, device: str = "cpu") -> tuple[Transformer, ByteTokenizer | CharTokenizer, Path]:
    """Model (eval mode) and tokenizer from a run folder's newest checkpoint or a step-N folder."""
    ckpt = resolve_checkpoint(path)
    config = verify_checkpoint(ckpt)
    try:
        model_cfg = from_dict(ModelConfig, config["model"], "model")
        tokenizer = tokenizer_from_dict(config["tokenizer"])
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}': config.json does not describe a dynaformer model ({e})") from None
    # Size first, from the config alone (a config.json may ask for 10⁶ layers or 10¹² tokens).
    check_fits_in_memory(BYTES * param_bound(model_cfg), f"the model of '{ckpt}'")
    with torch.device("meta"):  # then the shapes, on the meta device: nothing is allocated
        shell = Transformer(model_cfg)
    check_fits(ckpt, shell, read_model_shapes(ckpt))
    check_fits_in_memory(4 * sum(p.numel() for p in shell.parameters()), f"the model of '{ckpt}'")
    model = Transformer(model_cfg)
    load_model_state(ckpt, model)
    return model.to(device).eval(), tokenizer, ckpt


def load_backbone(path: str | Path) -> tuple[ModelConfig, ByteTokenizer | CharTokenizer, dict[str, torch.Tensor]]:
    """(model config, tokenizer, weights) of a pretrained run for `finetune(..., load_backbone=...)`: the
    model of its newest verified checkpoint (or of a step-N folder), checked as `load_model` checks it."""
    model, tokenizer, ckpt = load_model(path)
    return model.cfg, tokenizer, read_model_tensors(ckpt)


def evaluate_run(path: str | Path, data: str | None = None, max_tokens: int = 262_144, batch_size: int = 32) -> dict:
    model, tokenizer, ckpt = load_model(path)
    if max_tokens <= 0 or batch_size <= 0:
        raise DynaformerError("eval: --tokens and --batch_size must be > 0")
    ctx = model.cfg.context_len
    if data is None:
        split = open_splits(ckpt.parent / "data").val
        source = "the run's validation split"
    else:
        text, source = read_text(data)
        split = tokenizer.encode_array(text)
    windows = eval_windows(np.asarray(split), ctx, max_tokens)
    result = evaluate_windows(model, windows, batch_size, torch.from_numpy(tokenizer.token_bytes()))
    return {"checkpoint": str(ckpt), "data": source, **result}


def generate_from_run(path: str | Path, prompt: str, max_new_tokens: int, temperature: float = 0.8,
                      top_k: int | None = None, top_p: float | None = None, seed: int | None = 0,
                      use_cache: bool = True, max_len: int | None = None) -> str:
    model, tokenizer, _ = load_model(path)
    if max_new_tokens < 0:
        raise DynaformerError("generate: --max_new_tokens must be ≥ 0")
    ids = tokenizer.encode(prompt)
    out = generate(model, torch.tensor([ids]), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   seed=seed, use_cache=use_cache, max_len=max_len)
    return tokenizer.decode(out[0].tolist())


def diagnose_run(path: str | Path, max_tokens: int = 16_384, device: str = "cpu") -> dict:
    """Diagnostics of a run's newest checkpoint (or a step-N folder) on its validation split; writes
    diagnostics.json, diagnostics.png and training_diagnostics.png into the run folder."""
    if max_tokens <= 0:
        raise DynaformerError("eval: --tokens must be > 0")
    model, _, ckpt = load_model(path, device)
    run_dir = ckpt.parent
    windows = eval_windows(open_splits(run_dir / "data").val, model.cfg.context_len, max_tokens)
    diag = {"checkpoint": str(ckpt), **diagnose(model, windows)}
    (run_dir / "diagnostics.json").write_text(json.dumps(diag, indent=1))
    plots = [plot_diagnostics(diag, run_dir / "diagnostics.png"),
             plot_training(run_dir / "metrics.jsonl", run_dir / "training_diagnostics.png")]
    diag["plots"] = [str(p) for p in plots if p is not None]
    return diag
