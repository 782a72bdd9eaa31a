"""Fine-tuning a classifier (`dynaformer finetune`): from a pretrained run (its backbone and
tokenizer) or from scratch, on a generated or JSONL classification task."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..configtools import from_dict, to_dict
from ..data import ByteTokenizer
from ..data.nlu import ClassificationData, Example, generate_task, load_jsonl_task
from ..errors import ConfigError, DynaformerError
from ..eval.classification import classification_report
from ..model import ModelConfig
from ..model.classifier import SequenceClassifier
from .checkpoint import read_model_tensors, save_checkpoint
from .optim import make_optimizer


@dataclass
class FinetuneConfig:
    task: str = "entail"  # entail, listops (generated) or jsonl (with train_file / val_file)
    train_file: str | None = None
    val_file: str | None = None
    n_train: int = 4000  # generated tasks: examples
    n_val: int = 500
    distance: int = 8  # entail: supporting fact up to this many sentences before the statement
    depth: int = 2  # listops: nesting depth
    init: str | None = None  # a run folder (or step-N) whose backbone and tokenizer to start from
    out: str = "runs/finetune"
    max_len: int = 256  # tokens per example (longer texts keep their end)
    max_steps: int = 500
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    eval_interval: int = 100
    seed: int = 0
    threads: int = 0
    progress_bar: bool = True
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0

    def validate(self) -> None:
        for name in ("n_train", "n_val", "max_len", "max_steps", "batch_size", "eval_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"finetune.{name}: must be > 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"finetune.lr: must be > 0, got {self.lr}")
        if self.task == "jsonl" and not (self.train_file and self.val_file):
            raise ConfigError("finetune.task: jsonl needs --train_file and --val_file")


def load_task(cfg: FinetuneConfig) -> ClassificationData:
    if cfg.task == "jsonl":
        return load_jsonl_task(cfg.train_file, cfg.val_file)
    return generate_task(cfg.task, cfg.n_train, cfg.n_val, cfg.seed, distance=cfg.distance, depth=cfg.depth)


def encode(examples: list[Example], tokenizer, labels: list[str], max_len: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """→ ids (N, T) right-padded with 0, mask (N, T) bool, label ids (N,), distances."""
    index = {label: i for i, label in enumerate(labels)}
    rows = [tokenizer.encode(e.text)[-max_len:] or [0] for e in examples]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = True
    y = torch.tensor([index[e.label] for e in examples])
    return ids, mask, y, [e.distance for e in examples]


@torch.no_grad()
def evaluate(model: SequenceClassifier, ids, mask, y, distances, n_classes: int, batch_size: int = 128) -> dict:
    model.eval()
    preds = []
    for i in range(0, len(ids), batch_size):
        logits, _ = model(ids[i : i + batch_size], mask[i : i + batch_size])
        preds += logits.argmax(-1).tolist()
    model.train()
    return classification_report(preds, y.tolist(), distances, n_classes)


def finetune(cfg: FinetuneConfig, model_cfg: ModelConfig) -> dict:
    from ..eval.run import load_model

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise DynaformerError(f"run folder '{out}' already exists; choose another --out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_task(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.init:
        backbone, tokenizer, ckpt = load_model(cfg.init)
        model_cfg = backbone.cfg
        model = SequenceClassifier(model_cfg, len(data.labels))
        tensors = read_model_tensors(ckpt)
        model.backbone.load_state_dict(tensors, strict=False)
    else:
        tokenizer = ByteTokenizer()
        model_cfg.vocab_size = tokenizer.vocab_size
        model_cfg.validate()
        model = SequenceClassifier(model_cfg, len(data.labels))
    tr = encode(data.train, tokenizer, data.labels, cfg.max_len)
    va = encode(data.val, tokenizer, data.labels, cfg.max_len)
    opt = make_optimizer(model, cfg)
    out.mkdir(parents=True, exist_ok=True)
    info = {"kind": "finetune", "finetune": to_dict(cfg), "model": to_dict(model_cfg), "labels": data.labels,
            "tokenizer": tokenizer.to_dict(), "n_train": len(data.train), "n_val": len(data.val)}
    (out / "run.json").write_text(json.dumps(info, indent=2))
    log = open(out / "metrics.jsonl", "w", buffering=1)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.perf_counter()
    bar = tqdm(total=cfg.max_steps, unit="step", leave=False, disable=not (cfg.progress_bar and sys.stderr.isatty()))
    result: dict = {}
    try:
        for step in range(1, cfg.max_steps + 1):
            lr = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.max_steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(0, len(tr[0]), (cfg.batch_size,), generator=gen)
            mask = tr[1][idx]
            T = int(mask.sum(1).max())
            _, loss = model(tr[0][idx, :T], mask[:, :T], tr[2][idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                result = evaluate(model, *va, len(data.labels))
                rec = {"step": step, "elapsed_s": round(time.perf_counter() - t0, 3), "loss": loss.item(),
                       "val_accuracy": result["accuracy"], "val_macro_f1": result["macro_f1"]}
                log.write(json.dumps(rec) + "\n")
                bar.write(f"step {step:>5}/{cfg.max_steps} | loss {loss.item():.4f} | "
                          f"val_acc {result['accuracy']:.3f} | val_macro_f1 {result['macro_f1']:.3f}")
    finally:
        bar.close()
        log.close()
    save_checkpoint(out, cfg.max_steps, model.state_dict(), {**info, "step": cfg.max_steps}, {"step": cfg.max_steps})
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "eval.json")
    chance = 1.0 / len(data.labels)
    return {"run_dir": str(out), "chance": chance, **result}


def finetune_config(values: dict) -> FinetuneConfig:
    return from_dict(FinetuneConfig, values, "finetune")
