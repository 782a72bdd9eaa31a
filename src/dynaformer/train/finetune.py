"""Fine-tuning a classifier (`dynaformer finetune`): from a pretrained run (its backbone and
tokenizer) or from scratch, on a generated or JSONL classification task."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..configtools import from_dict, to_dict
from ..data import ByteTokenizer
from ..data.nlu import ClassificationData, Example, generate_task, load_jsonl_task
from ..errors import CheckpointError, ConfigError, DynaformerError, Interrupted
from ..eval.classification import classification_report
from ..model import ModelConfig
from ..model.classifier import SequenceClassifier
from ..resources import check_threads
from .checkpoint import (
    latest_checkpoint,
    load_trainer_state,
    read_model_tensors,
    remove_stale_temporaries,
    save_checkpoint,
)
from .metrics import MetricsLog
from .optim import make_optimizer
from .state import load_optimizer_state, optimizer_state


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
    ckpt_interval: int = 0  # steps between step-N checkpoints (0: every eval_interval)
    keep_last: int = 2  # checkpoints kept (0: all)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    resume: str = "auto"  # auto: continue the run in --out from its newest good checkpoint; none: a new folder

    def validate(self) -> None:
        for name in ("n_train", "n_val", "max_len", "max_steps", "batch_size", "eval_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"finetune.{name}: must be > 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"finetune.lr: must be > 0, got {self.lr}")
        check_threads(self.threads, "finetune.threads")
        if self.ckpt_interval < 0 or self.keep_last < 0:
            raise ConfigError("finetune.ckpt_interval / keep_last: must be >= 0")
        if self.resume not in ("auto", "none"):
            raise ConfigError(f"finetune.resume: auto or none, got {self.resume!r}")
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


# Fields that may change when a run is continued: they do not change what is computed.
_RESUMABLE = ("resume", "progress_bar", "threads", "device", "out", "eval_interval", "ckpt_interval", "keep_last")


def _existing_run(out: Path, cfg: FinetuneConfig, info: dict) -> Path | None:
    """The checkpoint to continue from, None for a fresh start; errors for a folder that is not this run."""
    if not out.exists() or not any(out.iterdir()):
        return None
    if cfg.resume == "none":
        raise DynaformerError(f"run folder '{out}' already exists; choose another --out (or --resume auto)")
    try:
        old = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        raise DynaformerError(f"run folder '{out}' exists and is not a finetune run; choose another --out") from None
    if old.get("kind") != "finetune":
        raise DynaformerError(f"run folder '{out}' holds a {old.get('kind', 'different')} run; choose another --out")
    for section in ("finetune", "model"):
        a, b = old.get(section, {}), info[section]
        for key in sorted(set(a) | set(b)):
            if section == "finetune" and key in _RESUMABLE:
                continue
            if a.get(key) != b.get(key):
                raise DynaformerError(f"run folder '{out}' holds a different run ({section}.{key}: {a.get(key)!r} "
                                      f"in the folder, {b.get(key)!r} now); choose another --out")
    return latest_checkpoint(out)


def finetune(cfg: FinetuneConfig, model_cfg: ModelConfig) -> dict:
    """Train a classifier; step-N checkpoints (weights, optimizer, sampler and RNG state) make an interrupted
    run continue bit-exactly with the same command (`--resume auto`, the default)."""
    from ..eval.run import load_model
    from .trainer import resolve_device

    out = Path(cfg.out)
    device = resolve_device(cfg.device, "finetune.device")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_task(cfg)
    torch.manual_seed(cfg.seed)
    init_tensors = None
    if cfg.init:
        backbone, tokenizer, ckpt = load_model(cfg.init)
        model_cfg = backbone.cfg
        init_tensors = read_model_tensors(ckpt)
    else:
        tokenizer = ByteTokenizer()
        model_cfg.vocab_size = tokenizer.vocab_size
        model_cfg.validate()
    info = {"kind": "finetune", "finetune": to_dict(cfg), "model": to_dict(model_cfg), "labels": data.labels,
            "tokenizer": tokenizer.to_dict(), "n_train": len(data.train), "n_val": len(data.val)}
    resume_from = _existing_run(out, cfg, info)
    model = SequenceClassifier(model_cfg, len(data.labels))
    if init_tensors is not None:
        model.backbone.load_state_dict(init_tensors, strict=False)
    model.to(device)
    tr = tuple(t.to(device) for t in encode(data.train, tokenizer, data.labels, cfg.max_len)[:3])
    va = encode(data.val, tokenizer, data.labels, cfg.max_len)
    va = (*(t.to(device) for t in va[:3]), va[3])
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, elapsed_before, result = 0, 0.0, {}
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    if resume_from is not None:
        missing, unexpected = model.load_state_dict(read_model_tensors(resume_from), strict=False)
        missing = [n for n in missing if not (n == "backbone.head.weight" and model_cfg.tie_embeddings)]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint '{resume_from}' does not fit this classifier "
                                  f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})")
        state = load_trainer_state(resume_from)
        load_optimizer_state(model, opt, state["optimizer"], sharded=False)
        gen.set_state(state["sampler_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed_before, result = int(state["step"]), float(state["elapsed_s"]), state.get("result") or {}
        print(f"resumed from {resume_from} (step {step})", file=sys.stderr)
    tmp = out / ".run.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, out / "run.json")
    if resume_from is None:  # a fresh start (maybe in a folder whose run died before its first checkpoint)
        (out / "metrics.jsonl").write_text("")
    log = MetricsLog(out / "metrics.jsonl", resume_step=step if resume_from is not None else None)
    t0 = time.perf_counter()
    ckpt_every = cfg.ckpt_interval or cfg.eval_interval

    def save() -> Path:
        state = {"step": step, "elapsed_s": elapsed_before + time.perf_counter() - t0, "result": result,
                 "optimizer": optimizer_state(model, opt, sharded=False), "sampler_rng": gen.get_state(),
                 "torch_rng": torch.get_rng_state()}
        return save_checkpoint(out, step, model.state_dict(), {**info, "step": step}, state, keep_last=cfg.keep_last)

    stop: list[int] = []

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", leave=False,
               disable=not (cfg.progress_bar and sys.stderr.isatty()))
    try:
        while step < cfg.max_steps and not stop:
            step += 1
            lr = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.max_steps)))
            for g in opt.param_groups:
                g["lr"] = lr
            idx = torch.randint(0, len(tr[0]), (cfg.batch_size,), generator=gen).to(device)
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
                rec = {"step": step, "elapsed_s": round(elapsed_before + time.perf_counter() - t0, 3),
                       "loss": loss.item(), "val_accuracy": result["accuracy"], "val_macro_f1": result["macro_f1"]}
                log.write(rec)
                bar.write(f"step {step:>5}/{cfg.max_steps} | loss {loss.item():.4f} | "
                          f"val_acc {result['accuracy']:.3f} | val_macro_f1 {result['macro_f1']:.3f}")
            if step % ckpt_every == 0 or step == cfg.max_steps:
                save()
        if step < cfg.max_steps:
            ckpt = save()
            raise Interrupted(f"stopped by {signal.Signals(stop[0]).name} at step {step}; checkpoint saved to "
                              f"{ckpt}; continue with the same command")
    finally:
        bar.close()
        log.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    if not result:  # resumed from the final checkpoint of a finished run
        result = evaluate(model, *va, len(data.labels))
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "eval.json")
    chance = 1.0 / len(data.labels)
    params = sum(p.numel() for p in model.parameters())
    return {"run_dir": str(out), "chance": chance, "step": step, "params": params, **result}


def finetune_config(values: dict) -> FinetuneConfig:
    return from_dict(FinetuneConfig, values, "finetune")
