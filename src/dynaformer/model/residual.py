"""Residual connections around each sub-layer (attention or MLP).

A residual module owns the sub-layer's norm, so kinds that normalise before the branch (pre-norm)
and after the sum (post-norm) share one interface: `forward(x, branch, ctx) -> new stream`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .config import ModelConfig
from .context import ForwardContext
from .layers import RMSNorm

Branch = Callable[[torch.Tensor], torch.Tensor]


class PreNormResidual(nn.Module):
    """x ← x + F(N(x)): the pre-norm transformer (Xiong et al. 2020, "On Layer Normalization in the
    Transformer Architecture"); the skip path is the identity, so gradients reach every layer."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, branch: Branch, ctx: ForwardContext) -> torch.Tensor:
        return x + branch(self.norm(x))


RESIDUALS: dict[str, type[nn.Module]] = {"prenorm": PreNormResidual}


def make_residual(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """One residual module for sub-layer `layer_idx` (0 .. 2·n_layer-1: attention, MLP, attention, ...)."""
    return RESIDUALS[cfg.residual](cfg, layer_idx)
