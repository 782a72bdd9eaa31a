"""Attention kernels. Model code calls these; which implementation runs is decided here (kernels/plan.py).

Layout: attention.py (dense causal and bidirectional SDPA), span.py (span attention: the simple kernels, the
dispatcher and its FLOP count), plan.py (the kernel names and which kernel runs), reach.py (how far a span
reaches), band.py (the causal CPU band kernel, Python and compiled), band_native.py + csrc/ (the compiled
kernel's build), decode.py + decode_native.py (the compiled one-token decoding step and its build),
span_symmetric.py (the encoder's band kernel), flex.py (FlexAttention on GPU, unverified), _tiles.py (pieces the
Python band kernels share)."""

from .attention import bidirectional_attention, causal_attention
from .band import band_span_attention
from .decode import SpanPredictor, decode_attention, decode_dyn_residual, decode_rms_norm
from .plan import KERNELS, SPAN_IMPLS, SpanImpl, check_span_impl, compiled_decode, decode_with_tensor_ops, plan
from .reach import keys_reached
from .span import band_flops, reference_span_attention, span_attention
from .span_symmetric import symmetric_span_attention

__all__ = ["KERNELS", "SPAN_IMPLS", "SpanImpl", "SpanPredictor", "band_flops", "band_span_attention",
           "bidirectional_attention", "causal_attention", "check_span_impl", "compiled_decode", "decode_attention",
           "decode_dyn_residual", "decode_rms_norm", "decode_with_tensor_ops", "keys_reached", "plan",
           "reference_span_attention", "span_attention", "symmetric_span_attention"]
