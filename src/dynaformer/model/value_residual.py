"""Value residual learning (ResFormer; Zhou et al., "Value Residual Learning For Alleviating Attention
Concentration In Transformers", ACL 2025, arXiv 2410.17897): every attention layer after the first attends with

    V'_n = λ_{n,1}·V_n + λ_{n,2}·V_1

where V_1 are the first layer's values of the same tokens. `--value_residual` switches it on for any residual
kind. λ starts at ResFormer's λ₁ = λ₂ = 0.5 and is learned per layer (the paper's learnable-λ variant; no weight
decay), so a model with it does not start as the same model without it. Each token's mixed value depends only
on that token, so the KV cache stores V'_n as it stores V_n, and causality and padding are untouched.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import gate_parameter, host_tensor


class ValueResidual(nn.Module):
    """The mix of one attention layer n ≥ 2 (0-based index ≥ 1): λ = (λ₁ on its own values, λ₂ on V_1)."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = gate_parameter(torch.tensor([0.5, 0.5]))

    def forward(self, v: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """v, first: (B, H, T, D) → λ₁·v + λ₂·first."""
        lam = self.mix.to(v.dtype)
        return lam[0] * v + lam[1] * first

    @torch.no_grad()
    def coefficients(self) -> dict[str, float]:
        own, first = host_tensor(self.mix).tolist()
        return {"own": own, "first": first}
