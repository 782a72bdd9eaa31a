"""Fine-tuning a classifier (`dynaformer finetune`): from a pretrained run (its backbone and
tokenizer) or from scratch, on a generated or JSONL classification task.

The training loop is the trainer's (`train/trainer.py`): this module brings a `Workload` (the classifier, its
batches of examples and its evaluation) and maps `FinetuneConfig` onto the loop's `TrainConfig`, so the
schedule (`optim.lr_at`), checkpoints, resume and the clean stop on SIGINT/SIGTERM are the same as
pretraining's (docs/design.md §6)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..configtools import to_dict
from ..data import ByteTokenizer
from ..data.nlu import ClassificationData, Example, generate_task, load_jsonl_task
from ..errors import ConfigError, DynaformerError
from ..eval.classification import classification_report
from ..files import write_json_atomic
from ..model import ModelConfig
from ..model.classifier import SequenceClassifier
from ..resources import check_threads
from .checkpoint import read_model_tensors
from .config import TrainConfig
from .rundir import Run


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
    min_lr_ratio: float = 0.0  # cosine decays to lr · min_lr_ratio (optim.lr_at)
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
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"finetune.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0:
            raise ConfigError(f"finetune.warmup_steps: must be ≥ 0, got {self.warmup_steps}")
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


def _existing_run(out: Path, cfg: FinetuneConfig, info: dict) -> bool:
    """True when `out` holds this run (to continue from its newest good checkpoint), False for a fresh start;
    errors for a folder that is not this run."""
    if not out.exists() or not any(out.iterdir()):
        return False
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
    return True


class ExampleSampler:
    """Batches of examples drawn with replacement by a seeded generator (its state is the sampler's state in
    each checkpoint), cut to the longest real example of the batch."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, batch_size: int,
                 seed: int) -> None:
        self.ids, self.mask, self.labels, self.batch_size = ids, mask, labels, batch_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(self.ids), (self.batch_size,), generator=self.gen).to(self.ids.device)
        mask = self.mask[idx]
        T = int(mask.sum(1).max())
        return self.ids[idx, :T], mask[:, :T], self.labels[idx]  # (B, T), (B, T), (B,)

    def state_dict(self) -> dict:
        return {"rng": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["rng"])


class ClassifierWorkload:
    """The trainer's workload for fine-tuning: the classifier, batches of examples, accuracy and macro-F1 on
    the validation examples at each evaluation (`trainer.Workload`)."""

    train_lines = False  # one metrics line per evaluation, with the loss of its step

    def __init__(self, model: SequenceClassifier, data: ClassificationData, tokenizer, cfg: FinetuneConfig,
                 info: dict, device: torch.device) -> None:
        self.model, self.info, self.n_classes = model, info, len(data.labels)
        ids, mask, y, _ = encode(data.train, tokenizer, data.labels, cfg.max_len)
        self.sampler = ExampleSampler(ids.to(device), mask.to(device), y.to(device), cfg.batch_size, cfg.seed)
        va = encode(data.val, tokenizer, data.labels, cfg.max_len)
        self.val = (*(t.to(device) for t in va[:3]), va[3])
        self.tokens_per_step = cfg.batch_size * cfg.max_len  # an upper bound (batches are cut to their longest)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        return self.sampler.next()

    def loss(self, forward: nn.Module, amp: Callable[[], contextlib.AbstractContextManager], ids: torch.Tensor,
             mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with amp():
            return forward(ids, mask, labels)[1]

    def aux_loss(self) -> float:
        return 0.0

    def before_step(self, step: int, max_steps: int) -> None:
        pass  # the backbone's progress τ stays as pretraining left it

    def before_clip(self) -> None:
        pass

    def log_fields(self) -> dict:
        return {}

    def evaluate(self, forward: nn.Module, autocast: torch.dtype | None) -> dict:
        return evaluate(self.model, *self.val, self.n_classes)

    def eval_record(self, result: dict) -> dict:
        return {"val_accuracy": result["accuracy"], "val_macro_f1": result["macro_f1"]}

    def eval_line(self, r: dict) -> str:
        return (f"step {r['step']:>5} | loss {r['loss']:.4f} | val_acc {r['val_accuracy']:.3f} | "
                f"val_macro_f1 {r['val_macro_f1']:.3f}")

    def config_record(self) -> dict:
        return self.info

    def finish(self, metrics_path: Path) -> None:
        pass


def loop_config(cfg: FinetuneConfig) -> TrainConfig:
    """The trainer's config for a fine-tuning run: the same schedule fields; fp32 and AdamW, as before."""
    return TrainConfig(
        out=cfg.out, max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2,
        grad_clip=cfg.grad_clip, eval_interval=cfg.eval_interval, log_interval=cfg.eval_interval,
        ckpt_interval=cfg.ckpt_interval or cfg.eval_interval, keep_last=cfg.keep_last, seed=cfg.seed,
        device=cfg.device, threads=cfg.threads, progress_bar=cfg.progress_bar, resume="auto", dtype="fp32")


def _backbone(cfg: FinetuneConfig, model_cfg: ModelConfig) -> tuple[ModelConfig, object, dict | None]:
    """(model config, tokenizer, backbone tensors): those of the run `cfg.init`, or new ones (no tensors)."""
    from ..runs import load_model  # function-local: runs.py sits above train/ (docs/design.md §1)

    init_tensors, tokenizer = None, ByteTokenizer()
    if cfg.init:
        backbone, tokenizer, ckpt = load_model(cfg.init)
        model_cfg = backbone.cfg
        init_tensors = read_model_tensors(ckpt)
    else:
        model_cfg.vocab_size = tokenizer.vocab_size
        model_cfg.validate()
    return model_cfg, tokenizer, init_tensors


def finetune(cfg: FinetuneConfig, model_cfg: ModelConfig) -> dict:
    """Train a classifier; step-N checkpoints (weights, optimizer, sampler and RNG state) make an interrupted
    run continue bit-exactly with the same command (`--resume auto`, the default)."""
    from .device import resolve_device
    from .trainer import Trainer

    out = Path(cfg.out)
    device = resolve_device(cfg.device, "finetune.device")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    data = load_task(cfg)
    torch.manual_seed(cfg.seed)
    model_cfg, tokenizer, init_tensors = _backbone(cfg, model_cfg)
    info = {"kind": "finetune", "finetune": to_dict(cfg), "model": to_dict(model_cfg), "labels": data.labels,
            "tokenizer": tokenizer.to_dict(), "n_train": len(data.train), "n_val": len(data.val)}
    resume = _existing_run(out, cfg, info)
    model = SequenceClassifier(model_cfg, len(data.labels))
    if init_tensors is not None:
        model.backbone.load_state_dict(init_tensors, strict=False)
    workload = ClassifierWorkload(model.to(device), data, tokenizer, cfg, info, device)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "run.json", info)
    run = Run(out, model_cfg, loop_config(cfg), tokenizer, splits=None, resumed=resume)
    trainer = Trainer(run, workload=workload)
    summary = trainer.fit()
    result = trainer.last_val or workload.evaluate(model, None)
    write_json_atomic(out / "eval.json", result)
    return {"run_dir": str(out), "chance": 1.0 / len(data.labels), "step": summary["step"],
            "params": summary["params"], **result}
