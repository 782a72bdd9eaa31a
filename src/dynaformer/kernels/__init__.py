"""Attention kernels. Model code calls these; which implementation runs is decided here."""

from .attention import bidirectional_attention, causal_attention
from .span import reference_span_attention, span_attention

__all__ = ["bidirectional_attention", "causal_attention", "reference_span_attention", "span_attention"]
