"""Attention kernels. Model code calls these; which implementation runs is decided here."""

from .attention import bidirectional_attention, causal_attention

__all__ = ["bidirectional_attention", "causal_attention"]
