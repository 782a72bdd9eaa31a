"""AdamW with decay only on matrices, and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import TrainConfig


def no_weight_decay(p: torch.Tensor) -> bool:
    """Norm gains, biases, scalars and mechanism gates (tagged `no_weight_decay`) are not decayed."""
    return p.dim() < 2 or getattr(p, "no_weight_decay", False)


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters that take no weight decay. Read them before FSDP2 sharding, which
    replaces the parameters (and drops their tags) but keeps their names."""
    return {n for n, p in model.named_parameters() if no_weight_decay(p)}


def make_optimizer(model: nn.Module, cfg: TrainConfig, no_decay: set[str] | None = None) -> torch.optim.AdamW:
    no_decay = no_decay_names(model) if no_decay is None else no_decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if n not in no_decay]
    rest = [p for n, p in named if n in no_decay]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    # The fused kernel (one pass over each tensor) is ≈ 3× faster than foreach on CPU (measured: 0.9 vs
    # 3.1 ms per step for tiny-cpu); sharded (DTensor) parameters keep the foreach implementation.
    fused = all(type(p) is torch.nn.Parameter and p.dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                               torch.float16) for _, p in named)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                             **({"fused": True} if fused else {"foreach": True}))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to lr · min_lr_ratio at `max_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * t))
