"""Multi-head causal self-attention: fused QKV, rotary positions, SDPA, optional KV cache."""

from __future__ import annotations

import torch
from torch import nn

from ..kernels import bidirectional_attention, causal_attention
from .config import ModelConfig
from .context import ForwardContext
from .layers import Rotary


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: Rotary) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout
        self.rotary = rotary  # shared across layers; holds no parameters

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary(qkv[:2], ctx.start).unbind(0)  # rotate q and k in one pass; each (B, H, T, D)
        v = qkv[2]
        if ctx.cache is not None:
            k, v = ctx.cache.layers[self.layer_idx].append(k, v)  # (B, H, L, D), L = start + T
        p = self.dropout if self.training else 0.0
        if ctx.causal:
            y = causal_attention(q, k, v, p)  # (B, H, T, D)
        else:
            y = bidirectional_attention(q, k, v, ctx.key_padding_mask, p)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
