"""A decoding step's work in a few compiled calls (csrc/decode.cpp, built by decode_native.py): a token's attention
(rotary, the KV-cache write and attention over the keys its heads can see, dense or through the span mask, with
the dynamic span kind's spans predicted in the same call), its RMSNorms and the dynamic residual's update.

Decoding one token costs what its ops cost to dispatch, not what they compute: the tensor-op path spends ~20 ops
per layer on attention alone, each a few µs at this size. `plan.compiled_decode` says where these run; elsewhere
the model decodes with tensor ops, which compute the same functions (to float rounding)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from .decode_native import load

_NONE = torch.empty(0)


class SpanPredictor(NamedTuple):
    """Spans predicted from the token's own input: z = S·σ(a + v·x) (model/span.py, the dynamic kind)."""

    v: torch.Tensor  # (H, C) fp32
    a: torch.Tensor  # (H,) fp32
    s_max: float  # S


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: int, k_bufs: list[torch.Tensor],
                     v_bufs: list[torch.Tensor], head_lists: list[list[int]], slots: list[int],
                     z: torch.Tensor | None = None, ramp: float = 1.0, hard: bool = False, *,
                     predictor: SpanPredictor | None = None,
                     x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv (B, 3·H·D) fp32, the fused projection of each row's token at position `pos`; cos, sin (N > pos, D/2)
    the rotary tables; per group of heads its key and value buffers (B, G, capacity, D) (fp32 or bf16), its heads
    and the slot the new key goes to (keys 0 .. slot are attended, the newest last). Spans: z (1|B, H) in tokens,
    or a `predictor` applied to x (B, C) fp32 (the attention's input); neither: dense attention.
    Returns ((B, H·D) fp32, the heads' outputs side by side; the spans used, (1|B, H), or None)."""
    spans = z is not None or predictor is not None
    mode = 0 if not spans else 2 if hard else 1
    if predictor is None:
        y, _ = load().decode_attention(qkv, cos, sin, pos, k_bufs, v_bufs, head_lists, slots,
                                       _NONE if z is None else z, mode, float(ramp), _NONE, _NONE, _NONE, 0.0)
        return y, z
    return load().decode_attention(qkv, cos, sin, pos, k_bufs, v_bufs, head_lists, slots, _NONE, mode, float(ramp),
                                   x, predictor.v, predictor.a, float(predictor.s_max))


def decode_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x (..., C) fp32 contiguous over its last dimension, one compiled call."""
    return load().rms_norm(x, weight, eps)


def decode_dyn_residual(x: torch.Tensor, y: torch.Tensor, h: torch.Tensor | None, w_t: torch.Tensor | None,
                        gamma: torch.Tensor | None, base: float) -> torch.Tensor:
    """x + m·y per row, m = base + Σ_k γ_k·tanh(h·w_k) (w_t (C, k), gamma (k,); None: m = base); fp32, one call."""
    if w_t is None:
        return load().dyn_residual(x, y, _NONE, _NONE, _NONE, base)
    return load().dyn_residual(x, y, h, w_t, gamma, base)
