"""`TrainConfig`: everything about a training run that is not the model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..errors import ConfigError
from ..resources import check_threads


@dataclass
class TrainConfig:
    data: str = "builtin:default"  # FILE, FOLDER, builtin:default (packaged tiny-shakespeare) or builtin:stories
    text_field: str = "text"  # the field that holds the text in .jsonl / .parquet / datasets-folder data
    tokenizer: Literal["byte", "char", "bpe"] = "byte"
    tokenizer_file: str = ""  # bpe: a tokenizer JSON from `dynaformer data tokenizer`
    objective: Literal["clm", "mlm"] = "clm"  # next-token (causal LM) or masked-LM (needs model.causal=false)
    out: str = "runs/default"  # the run folder
    val_fraction: float = 0.1
    max_steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    # adamw, or muon: Muon for the blocks' hidden matrices, AdamW for the rest (train/optim.py)
    optimizer: Literal["adamw", "muon"] = "adamw"
    muon_lr_ratio: float = 1.0  # optimizer muon: Muon's lr is lr × this (at AdamW's update RMS); AdamW's stays lr
    grad_clip: float = 1.0  # 0 disables clipping
    # Staged context (Press et al. 2021, "Shortformer"): the first `short_steps` steps train on rows of
    # `short_context` tokens, context_len / short_context times as many, so tokens per step stay equal; 0: off
    short_context: int = 0
    short_steps: int = 0
    eval_interval: int = 250  # 0: evaluate only at the end
    eval_tokens: int = 32768  # fixed validation budget per evaluation
    log_interval: int = 50
    ckpt_interval: int = 0  # 0: checkpoint only at the end (and on interrupt)
    keep_last: int = 3  # checkpoints to keep; 0 keeps all
    seed: int = 1337
    # auto: bf16 autocast where it pays (CUDA with bf16; a CPU with native bf16 matmul, confirmed by a cached
    # probe), fp32 otherwise; fp32; bf16 (train/device.py)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    threads: int = 0  # CPU threads for torch; 0 keeps torch's default
    # none, auto (newest checkpoint in `out` that verifies), restart (this run again from step 0, its
    # checkpoints set aside), or a step-N folder
    resume: str = "none"
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun: replicate (DDP) or shard (FSDP2)
    # auto: under torchrun every rank writes its own shards (torch.distributed.checkpoint), one process writes
    # safetensors; full: always gather the whole state to rank 0 and write safetensors
    ckpt_format: Literal["auto", "full"] = "auto"
    max_bad_steps: int = 3  # non-finite loss/grad steps in a row before reloading the last checkpoint
    progress_bar: bool = True
    tensorboard: bool = False  # also write metrics as TensorBoard scalars to <out>/tensorboard (extra [tensorboard])

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "log_interval", "eval_tokens", "max_bad_steps"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}: must be > 0, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_interval", "ckpt_interval", "keep_last", "threads", "weight_decay",
                     "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be ≥ 0, got {getattr(self, name)}")
        if (self.short_context > 0) != (self.short_steps > 0) or min(self.short_context, self.short_steps) < 0:
            raise ConfigError(f"train.short_context, train.short_steps: staged context needs both > 0 (or both 0), "
                              f"got {self.short_context} and {self.short_steps}")
        if self.short_steps > self.max_steps:
            raise ConfigError(f"train.short_steps: must be ≤ max_steps={self.max_steps}, got {self.short_steps}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        if not self.muon_lr_ratio > 0:
            raise ConfigError(f"train.muon_lr_ratio: must be > 0, got {self.muon_lr_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction: must be in (0, 1), got {self.val_fraction}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be in [0, 1), got {getattr(self, name)}")
        if not self.out:
            raise ConfigError("train.out: the run folder must be named")
        check_threads(self.threads, "train.threads")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"train.seed: must be in [0, 2⁶³), got {self.seed}")
        if self.resume not in ("none", "auto", "restart") and not (Path(self.resume) / "manifest.json").is_file():
            raise ConfigError(f"train.resume: expected none, auto, restart or a checkpoint folder (step-N), got "
                              f"'{self.resume}'")
        if self.resume not in ("none", "auto", "restart") and Path(self.resume).resolve().parent != \
                Path(self.out).resolve():
            raise ConfigError(f"train.resume: '{self.resume}' is a checkpoint of another run folder; a checkpoint "
                              f"continues the run it belongs to (--out {Path(self.resume).parent})")
        if self.tokenizer == "bpe" and not self.tokenizer_file:
            raise ConfigError("train.tokenizer_file: --tokenizer bpe needs a tokenizer file "
                              "(train one with `dynaformer data tokenizer --vocab N FILES --out tok.json`)")
        if self.tokenizer_file and self.tokenizer != "bpe":
            raise ConfigError(f"train.tokenizer_file: only used with --tokenizer bpe (tokenizer is '{self.tokenizer}')")
        if self.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:
                raise ConfigError("train.tensorboard: needs the tensorboard package: "
                                  "pip install 'dynaformer[tensorboard]'")
        if self.data.startswith("task:"):  # generated long-range tasks (data/tasks.py): byte-level
            from ..data.tasks import parse_task_spec

            parse_task_spec(self.data)
            if self.tokenizer != "byte":
                raise ConfigError(f"train.tokenizer: task data '{self.data}' needs the byte tokenizer")
            if self.objective != "clm":
                raise ConfigError(f"train.objective: task data '{self.data}' trains next-token answers (clm)")


# Fields that may change when a run is resumed: bookkeeping, and the per-rank batch split, which
# changes when a run moves to another world size (keep batch_size × world × grad_accum to continue exactly).
RESUMABLE_CHANGES = frozenset({"out", "resume", "progress_bar", "log_interval", "eval_interval", "ckpt_interval",
                               "keep_last", "threads", "compile", "device", "parallel", "max_bad_steps",
                               "ckpt_format", "batch_size", "grad_accum", "tensorboard"})


def check_compatible(model_causal: bool, objective: str, context_len: int | None = None,
                     short_context: int = 0) -> None:
    """Cross-field rules between the model and the training objective (and the staged context)."""
    if short_context and context_len is not None and (short_context >= context_len or context_len % short_context):
        raise ConfigError(f"train.short_context: must divide model.context_len={context_len} and be smaller, "
                          f"got {short_context}")
    if objective == "mlm" and model_causal:
        raise ConfigError("train.objective: mlm needs a bidirectional model (set model.causal=false)")
    if objective == "clm" and not model_causal:
        raise ConfigError("model.causal: a bidirectional model cannot train on next-token prediction "
                          "(use train.objective=mlm)")


def check_train_memory(model_cfg, train_cfg: TrainConfig) -> None:
    """Refuse, before any folder or tensor exists, a model and batch whose training would not fit in this
    machine's available memory (weights, gradients, optimizer state, one micro-batch's activations; the staged
    context's shorter, wider batch too). Training on a GPU is not checked against the host's memory."""
    import torch

    from ..model.memory import train_bytes
    from ..resources import check_fits_in_memory

    if train_cfg.device.startswith("cuda") or (train_cfg.device == "auto" and torch.cuda.is_available()):
        return
    C = model_cfg.context_len
    check_fits_in_memory(train_bytes(model_cfg, train_cfg.batch_size),
                         f"training this model (batch {train_cfg.batch_size} × context {C})")
    if train_cfg.short_context:
        rows = train_cfg.batch_size * C // train_cfg.short_context
        check_fits_in_memory(train_bytes(model_cfg, rows, train_cfg.short_context),
                             f"training this model at the staged context (batch {rows} × {train_cfg.short_context})")


def split_sections(overrides: dict, where: str) -> dict[str, dict]:
    """Flat field names or `model:` / `train:` sections → {"model": {...}, "train": {...}}; unknown keys
    are a ConfigError naming them (used by --config files and by compare grids)."""
    from ..configtools import field_types
    from ..model.config import ModelConfig

    sections = {"model": ModelConfig, "train": TrainConfig}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: expected a mapping of config overrides, got {overrides!r}")
    owners = {n: s for s, cls in sections.items() for n in field_types(cls)}
    out: dict[str, dict] = {s: {} for s in sections}
    for key, value in overrides.items():
        if key in sections:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key}: expected a mapping")
            for k in value:
                if k not in field_types(sections[key]):
                    raise ConfigError(f"{where}: unknown config key '{key}.{k}'")
            out[key].update(value)
        elif key in owners:
            out[owners[key]][key] = value
        else:
            raise ConfigError(f"{where}: unknown config key '{key}'")
    return out
