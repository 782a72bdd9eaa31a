"""Masked-LM corruption (Devlin et al. 2019, BERT): choose 15% of positions; of those, 80% become
[MASK], 10% a random token, 10% stay. Targets are the original tokens there, -100 elsewhere."""

from __future__ import annotations

import torch


def mask_tokens(x: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator,
                rate: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (B, T) token ids in [0, vocab_size) → (inputs, targets), both (B, T)."""
    chosen = torch.rand(x.shape, generator=generator) < rate
    kind = torch.rand(x.shape, generator=generator)
    random_tokens = torch.randint(0, vocab_size, x.shape, generator=generator)
    inputs = torch.where(chosen & (kind < 0.8), torch.full_like(x, mask_id), x)
    inputs = torch.where(chosen & (kind >= 0.8) & (kind < 0.9), random_tokens, inputs)
    targets = torch.where(chosen, x, torch.full_like(x, -100))
    return inputs, targets


def step_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """The masking of step n depends only on (seed, n, rank): resume stays bit-exact."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_009 + rank)
