"""Sequence classification on top of the transformer (encoder mode, or a causal model read at its
last token): pooled final hidden state → linear head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .transformer import Transformer


class SequenceClassifier(nn.Module):
    """Mean-pools the non-padding hidden states of an encoder (causal=False), or takes the last real
    token's state of a causal model, then applies a linear head to `n_classes` logits."""

    def __init__(self, cfg: ModelConfig, n_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = Transformer(cfg)
        self.classifier = nn.Linear(cfg.d_model, n_classes)
        nn.init.zeros_(self.classifier.weight)  # start at the uniform prediction
        nn.init.zeros_(self.classifier.bias)

    @property
    def progress(self) -> torch.Tensor:
        return self.backbone.progress

    def forward(self, idx: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, mask: (B, T) (mask True on real tokens, padding on the right) → logits (B, K), loss."""
        if self.cfg.causal:
            h = self.backbone.hidden(idx)  # (B, T, C); right padding never reaches earlier tokens
            last = mask.long().sum(1).clamp(min=1) - 1
            pooled = h[torch.arange(idx.size(0), device=idx.device), last]
        else:
            h = self.backbone.hidden(idx, key_padding_mask=mask)
            m = mask.unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)  # (B, C)
        logits = self.classifier(pooled)
        loss = F.cross_entropy(logits.float(), labels) if labels is not None else None
        return logits, loss
