"""Attention kernels. Model code calls these; which implementation runs is decided here."""

from .attention import bidirectional_attention, causal_attention
from .span import check_span_impl, reference_span_attention, span_attention
from .span_symmetric import symmetric_span_attention

__all__ = ["bidirectional_attention", "causal_attention", "check_span_impl", "reference_span_attention",
           "span_attention", "symmetric_span_attention"]
