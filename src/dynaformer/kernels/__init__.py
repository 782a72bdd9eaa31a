"""Attention kernels. Model code calls these; which implementation runs is decided here (kernels/plan.py).

Layout: attention.py (dense causal and bidirectional SDPA), span.py (span attention: the simple kernels and
the dispatcher), plan.py (which kernel runs; FLOP counts), band.py (the causal CPU band kernel, Python and
compiled), band_native.py + csrc/ (the compiled kernel's build), span_symmetric.py (the encoder's band
kernel), flex.py (FlexAttention on GPU, unverified), _tiles.py (pieces the Python band kernels share)."""

from .attention import bidirectional_attention, causal_attention
from .band import band_span_attention
from .plan import band_flops, check_span_impl, plan
from .span import reference_span_attention, span_attention
from .span_symmetric import symmetric_span_attention

__all__ = ["band_flops", "band_span_attention", "bidirectional_attention", "causal_attention", "check_span_impl",
           "plan", "reference_span_attention", "span_attention", "symmetric_span_attention"]
