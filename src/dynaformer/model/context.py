"""What a forward pass knows besides the hidden states: positions, training progress, the cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import KVCache


@dataclass
class ForwardContext:
    start: int  # absolute position of the first token of this call (> 0 when decoding with a cache)
    length: int  # number of new tokens in this call
    progress: torch.Tensor  # training progress τ ∈ [0, 1], a scalar buffer of the model
    cache: KVCache | None = None
    causal: bool = True
    key_padding_mask: torch.Tensor | None = None  # (B, T) bool, True = a real token (encoder batches)

    def positions(self, device: torch.device) -> torch.Tensor:
        """(T,) absolute positions of the tokens of this call: each token's own prefix length."""
        return torch.arange(self.start, self.start + self.length, device=device)
