"""Attention kernels. Model code calls these; which implementation runs is decided here."""

from .attention import causal_attention

__all__ = ["causal_attention"]
