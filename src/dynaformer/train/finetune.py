"""Fine-tuning a classifier (`dynaformer finetune`): from a pretrained run (its backbone and
tokenizer) or from scratch, on a generated or JSONL classification task.

A fine-tuning config is the training loop's own `TrainConfig` (the `train` section, at fine-tuning's defaults)
plus a `task` section. The loop is the trainer's (`train/trainer.py`): this module brings a `Workload` (the
classifier, its batches of examples and its evaluation), so the schedule (`optim.lr_at`), checkpoints, resume,
the run-folder lock and the clean stop on SIGINT/SIGTERM are the same as pretraining's (docs/design.md §6).

The pretrained backbone (`task.init`) is read by the layer that loads runs (`runs.load_backbone`) and handed in
by the caller: loading a run folder sits above train/ (docs/design.md §1)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..configtools import field_types, first_difference, from_dict, to_dict
from ..data import ByteTokenizer
from ..data.nlu import ClassificationData, Example, generate_task, load_jsonl_task
from ..errors import ConfigError, DynaformerError
from ..eval.classification import classification_report
from ..files import write_json_atomic
from ..locks import exclusive
from ..model import ModelConfig
from ..model.classifier import SequenceClassifier
from .config import TrainConfig
from .rundir import Run


@dataclass
class TaskConfig:
    """The task section of a fine-tuning run: the examples to classify, and the run whose backbone to start from."""

    task: str = "entail"  # entail, keyword, listops (generated) or jsonl (with train_file / val_file)
    train_file: str | None = None
    val_file: str | None = None
    n_train: int = 4000  # generated tasks: examples
    n_val: int = 500
    distance: int = 8  # entail: supporting fact up to this many sentences before the statement
    depth: int = 2  # listops: nesting depth
    init: str | None = None  # a run folder (or step-N) whose backbone and tokenizer to start from
    max_len: int = 256  # tokens per example (longer texts keep their end)

    def validate(self) -> None:
        for name in ("n_train", "n_val", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"task.{name}: must be > 0, got {getattr(self, name)}")
        if self.task == "jsonl" and not (self.train_file and self.val_file):
            raise ConfigError("task.task: jsonl needs --train_file and --val_file")


# The training fields a fine-tuning run takes (the flags of `dynaformer finetune`, the keys of a grid's
# encoder.finetune) at fine-tuning's defaults. Every other TrainConfig field keeps its default, but dtype: fp32.
TRAIN_DEFAULTS: dict[str, Any] = {
    "out": "runs/finetune", "max_steps": 500, "batch_size": 32, "lr": 1e-3,
    "min_lr_ratio": 0.0,  # cosine decays to lr · min_lr_ratio (optim.lr_at)
    "warmup_steps": 50, "weight_decay": 0.01, "beta1": 0.9, "beta2": 0.99, "grad_clip": 1.0,
    "eval_interval": 100,  # also the metrics lines: one per evaluation
    "ckpt_interval": 0,  # steps between step-N checkpoints (0: every eval_interval)
    "keep_last": 2, "seed": 0, "device": "auto", "threads": 0, "progress_bar": True,
    "resume": "auto",  # auto: continue the run in --out from its newest good checkpoint; none: a new folder
}


def _train_defaults() -> TrainConfig:
    return TrainConfig(**TRAIN_DEFAULTS, dtype="fp32")


@dataclass
class FinetuneConfig:
    """A fine-tuning run: the training loop's config (fields outside TRAIN_DEFAULTS stay as fine-tuning sets them)
    and the task section."""

    train: TrainConfig = field(default_factory=_train_defaults)
    task: TaskConfig = field(default_factory=TaskConfig)

    def validate(self) -> None:
        fixed = to_dict(_train_defaults())
        for name, value in to_dict(self.train).items():
            if name not in TRAIN_DEFAULTS and value != fixed[name]:
                raise ConfigError(f"train.{name}: fine-tuning keeps {fixed[name]!r} (the training fields it takes: "
                                  f"{', '.join(TRAIN_DEFAULTS)})")
        if self.train.eval_interval <= 0:
            raise ConfigError(f"train.eval_interval: fine-tuning evaluates every eval_interval steps; must be > 0, "
                              f"got {self.train.eval_interval}")
        if self.train.resume not in ("auto", "none"):
            raise ConfigError(f"train.resume: auto or none for fine-tuning, got {self.train.resume!r}")


def read_finetune(values: Mapping[str, Any], where: str = "finetune") -> FinetuneConfig:
    """A fine-tuning config from its flat form (the command line's flags, a grid's encoder.finetune, run.json's
    record), each key given to the section that owns it."""
    task_keys = set(field_types(TaskConfig))
    known = task_keys | set(TRAIN_DEFAULTS)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key '{where}.{unknown[0]}' (known: {', '.join(sorted(known))})")
    return from_dict(FinetuneConfig, {"train": {k: v for k, v in values.items() if k not in task_keys},
                                      "task": {k: v for k, v in values.items() if k in task_keys}})


def flat_record(cfg: FinetuneConfig) -> dict[str, Any]:
    """The flat form of `cfg` (read back by read_finetune): run.json's and a grid cell's record of the run."""
    train = to_dict(cfg.train)
    return {**{k: train[k] for k in TRAIN_DEFAULTS}, **to_dict(cfg.task)}


def load_task(cfg: FinetuneConfig) -> ClassificationData:
    t = cfg.task
    if t.task == "jsonl":
        return load_jsonl_task(t.train_file, t.val_file)
    return generate_task(t.task, t.n_train, t.n_val, cfg.train.seed, distance=t.distance, depth=t.depth)


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


# Fields of the record that may change when a run is continued: they do not change what is computed.
_MAY_CHANGE = ("resume", "progress_bar", "threads", "device", "out", "eval_interval", "ckpt_interval", "keep_last")
_IDENTITY = ("finetune", "model")  # the sections of run.json that name the run


def _existing_run(out: Path, cfg: FinetuneConfig, info: dict) -> bool:
    """True when `out` holds this run (to continue from its newest good checkpoint), False for a fresh start;
    errors for a folder that is not this run. Called under the folder's lock."""
    if not {p.name for p in out.iterdir()} - {".lock"}:
        return False
    if cfg.train.resume == "none":
        raise DynaformerError(f"run folder '{out}' already exists; choose another --out (or --resume auto)")
    try:
        old = json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        raise DynaformerError(f"run folder '{out}' exists and is not a finetune run; choose another --out") from None
    if old.get("kind") != "finetune":
        raise DynaformerError(f"run folder '{out}' holds a {old.get('kind', 'different')} run; choose another --out")
    diff = first_difference({s: old.get(s) for s in _IDENTITY}, {s: info[s] for s in _IDENTITY},
                            defaults={"finetune": flat_record(FinetuneConfig()), "model": to_dict(ModelConfig())},
                            may_change={"finetune": _MAY_CHANGE})
    if diff:
        raise DynaformerError(f"run folder '{out}' holds a different run ({diff}); choose another --out")
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
        max_len, batch_size = cfg.task.max_len, cfg.train.batch_size
        ids, mask, y, _ = encode(data.train, tokenizer, data.labels, max_len)
        self.sampler = ExampleSampler(ids.to(device), mask.to(device), y.to(device), batch_size, cfg.train.seed)
        va = encode(data.val, tokenizer, data.labels, max_len)
        self.val = (*(t.to(device) for t in va[:3]), va[3])
        self.tokens_per_step = batch_size * max_len  # an upper bound (batches are cut to their longest)

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
    """The trainer's config: the train section, with a metrics line at each evaluation, a checkpoint there too
    when ckpt_interval is 0, and resume auto (whether the folder holds this run was settled by _existing_run)."""
    t = cfg.train
    return dataclasses.replace(t, log_interval=t.eval_interval, ckpt_interval=t.ckpt_interval or t.eval_interval,
                               resume="auto")


# (model config, tokenizer, backbone tensors) of a pretrained run: runs.load_backbone reads them from a run folder
Backbone = tuple[ModelConfig, Any, dict[str, torch.Tensor]]


def _backbone(cfg: FinetuneConfig, model_cfg: ModelConfig, load_backbone: Callable[[str], Backbone] | None
              ) -> tuple[ModelConfig, object, dict | None]:
    """(model config, tokenizer, backbone tensors): those of the run `task.init`, or new ones (no tensors)."""
    if cfg.task.init:
        if load_backbone is None:
            raise ValueError("finetune: task.init names a run; pass load_backbone (runs.load_backbone) to read it")
        return load_backbone(cfg.task.init)
    tokenizer = ByteTokenizer()
    model_cfg.vocab_size = tokenizer.vocab_size
    model_cfg.validate()
    return model_cfg, tokenizer, None


def finetune(cfg: FinetuneConfig, model_cfg: ModelConfig, load_backbone: Callable[[str], Backbone] | None = None
             ) -> dict:
    """Train a classifier; step-N checkpoints (weights, optimizer, sampler and RNG state) make an interrupted
    run continue bit-exactly with the same command (`--resume auto`, the default). One process at a time writes
    the run folder (its lock). `load_backbone` reads `task.init` (runs.load_backbone)."""
    from .device import resolve_device
    from .trainer import Trainer

    out = Path(cfg.train.out)
    device = resolve_device(cfg.train.device, "train.device")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    data = load_task(cfg)
    torch.manual_seed(cfg.train.seed)
    # After seeding: loading a backbone builds a model, whose initialisation draws from the generator that the
    # classifier head's then continues (so the head a run starts with depends on it).
    model_cfg, tokenizer, init_tensors = _backbone(cfg, model_cfg, load_backbone)
    info = {"kind": "finetune", "finetune": flat_record(cfg), "model": to_dict(model_cfg), "labels": data.labels,
            "tokenizer": tokenizer.to_dict(), "n_train": len(data.train), "n_val": len(data.val)}
    with exclusive(out, "run folder"):
        resume = _existing_run(out, cfg, info)
        model = SequenceClassifier(model_cfg, len(data.labels))
        if init_tensors is not None:
            model.backbone.load_state_dict(init_tensors, strict=False)
        workload = ClassifierWorkload(model.to(device), data, tokenizer, cfg, info, device)
        write_json_atomic(out / "run.json", info)
        run = Run(out, model_cfg, loop_config(cfg), tokenizer, splits=None, resumed=resume)
        trainer = Trainer(run, workload=workload)
        summary = trainer.fit()
        result = trainer.last_val or workload.evaluate(model, None)
        write_json_atomic(out / "eval.json", result)
    return {"run_dir": str(out), "chance": 1.0 / len(data.labels), "step": summary["step"],
            "params": summary["params"], **result}
