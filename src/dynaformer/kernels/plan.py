"""Which attention kernel runs for a call: the one place that decides (docs/design.md §4). The model calls
`span_attention` (kernels/span.py) and `symmetric_span_attention` (kernels/span_symmetric.py), which execute
`plan()`; `band_flops` (kernels/span.py) counts the work of the same plan, so a FLOP count never disagrees
with what runs.

The kernel names (`KERNELS`), one vocabulary for causal models and encoders:
- reference: dense scores + log-mask (causal: tests only; the encoder's reference is its masked SDPA),
- decode: a handful of queries without autograd (causal),
- masked: SDPA with the span log-mask as a float mask (short queries, padded batches, CUDA; the encoder's
  fallback where the band would not pay),
- dense: causal SDPA without a mask (every span covers every key, so the mask is identically 1),
- band: the CPU band kernel (causal: kernels/band.py, compiled or Python; encoder: kernels/span_symmetric.py),
- split: dense SDPA for the heads whose spans cover everything, band for the rest (causal),
- flex: FlexAttention on CUDA (causal; unverified, never chosen by auto: kernels/flex.py).
What a config or caller may ask for (`SPAN_IMPLS`, the config's `span_impl`) is `auto` or one of the kernels
that make sense on request: band, masked, reference, flex.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Literal, NamedTuple, get_args

import torch

from ..errors import DynaformerError
from .band_native import available as native_available
from .decode_native import available as decode_native_available
from .reach import keys_reached

Kernel = Literal["reference", "decode", "masked", "dense", "band", "split", "flex"]
KERNELS: tuple[str, ...] = get_args(Kernel)
SpanImpl = Literal["auto", "band", "masked", "reference", "flex"]
SPAN_IMPLS: tuple[str, ...] = get_args(SpanImpl)

# From one chunk of queries up, the band kernel beats the masked SDPA (measured at T = 128); decoding steps
# of at most this many queries without autograd take the decode path.
DECODE_QUERIES = 16


class SpanPlan(NamedTuple):
    kernel: str  # one of KERNELS
    cover: torch.Tensor | None = None  # split: (H,) bool, the heads that run dense
    native: bool = False  # causal band and split: the compiled band kernel (else the Python one)


def heads_covering(z: torch.Tensor, Tq: int, Tk: int) -> torch.Tensor:
    """(H,) bool: heads whose every query (in every batch row) sees all its causal keys with weight 1
    (z_i ≥ i + Tk − Tq)."""
    pos = torch.arange(Tq, device=z.device, dtype=z.dtype) + (Tk - Tq)
    return (z >= pos).all(-1).all(0)


def uses_native(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether the causal band kernel runs compiled (csrc/band_span.cpp) for inputs of this dtype and device:
    on CPU where it builds; fp64 (the gradient checks) and non-CPU tensors take the Python kernel."""
    return torch.device(device).type == "cpu" and dtype != torch.float64 and native_available()


_TENSOR_OPS_ONLY = [0]  # > 0 inside decode_with_tensor_ops()


def compiled_decode(q_dtype: torch.dtype, cache_dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether a one-token decoding step without autograd runs compiled (kernels/decode.py): fp32 queries over an
    fp32 or bf16 cache on a CPU where the step builds. Padded batches and everything else decode with tensor ops.
    (Asked several times per layer and token, so it avoids building objects.)"""
    return (q_dtype is torch.float32 and (cache_dtype is torch.float32 or cache_dtype is torch.bfloat16)
            and (device if isinstance(device, str) else device.type) == "cpu" and not _TENSOR_OPS_ONLY[0]
            and decode_native_available())


@contextlib.contextmanager
def decode_with_tensor_ops() -> Iterator[None]:
    """Within, decode with tensor ops only, as before the compiled step existed (benchmarks time both side by
    side in one process; tests compare them)."""
    _TENSOR_OPS_ONLY[0] += 1
    try:
        yield
    finally:
        _TENSOR_OPS_ONLY[0] -= 1


def check_span_impl(impl: str, q: torch.Tensor) -> None:
    """Refuse a span kernel that cannot run on q's device (and, for FlexAttention on CPU, with autograd)."""
    if impl not in SPAN_IMPLS:
        raise DynaformerError(f"model.span_impl: unknown kernel {impl!r}; choose one of {', '.join(SPAN_IMPLS)}")
    if q.is_cuda and impl == "flex":
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError as e:  # pragma: no cover
            raise DynaformerError("model.span: this torch has no FlexAttention for the CUDA span path; "
                                  "set model.span_impl=masked") from e
    if impl == "band" and q.is_cuda:
        raise DynaformerError("model.span_impl: 'band' is the CPU kernel; use auto, masked or flex on CUDA")
    if impl == "flex" and not q.is_cuda and torch.is_grad_enabled():
        raise DynaformerError("model.span_impl: FlexAttention has no backward on CPU; use auto or band")


def plan(impl: str, z: torch.Tensor, Tq: int, Tk: int, *, device: torch.device | str = "cpu",
         dtype: torch.dtype = torch.float32, causal: bool = True, ramp: float = 0.0, hard: bool = False,
         grad: bool = False, padded: bool = False, chunk: int = 64) -> SpanPlan:
    """The kernel for queries (B, H, Tq) of `dtype` on `device` over Tk keys with spans z (B|1, H, Tq|1).
    causal=False: an encoder (Tq = Tk; its choice needs the ramp and hardness of the spans). grad: autograd
    will differentiate the call; padded: a key padding mask hides padding (of the causal kernels, only the
    reference, decode and masked ones take one; the encoder's band kernel takes one too)."""
    if impl not in SPAN_IMPLS:
        raise ValueError(f"unknown span attention impl {impl!r}; choose one of {', '.join(SPAN_IMPLS)}")
    device = torch.device(device)
    if impl == "auto" and torch.compiler.is_exporting():
        # torch.export / ONNX: a graph cannot branch on the spans' values (which heads cover all keys, how far
        # they reach), so the exported model takes the masked SDPA, exact for every span and length.
        return SpanPlan("masked")
    if not causal:
        return _encoder_plan(impl, z, Tq, device, ramp, hard, chunk)
    few = Tq <= DECODE_QUERIES and not grad
    if padded:
        return SpanPlan("reference" if impl == "reference" else "decode" if few else "masked")
    if impl == "band":
        return SpanPlan("band", native=uses_native(dtype, device))
    if impl != "auto":
        return SpanPlan(impl)
    if few:
        return SpanPlan("decode")
    cover = heads_covering(z.detach(), Tq, Tk)
    if bool(cover.all()):
        return SpanPlan("dense")
    if device.type == "cuda":
        return SpanPlan("masked")
    if bool(cover.any()) and Tq >= chunk and z.shape[1] > 1:
        return SpanPlan("split", cover, uses_native(dtype, device))
    if Tq < chunk:
        return SpanPlan("masked")
    return SpanPlan("band", native=uses_native(dtype, device))


def _encoder_plan(impl: str, z: torch.Tensor, T: int, device: torch.device, ramp: float, hard: bool,
                  chunk: int) -> SpanPlan:
    """auto takes the band kernel off CUDA when the spans leave a good part of the sequence out (a chunk's
    window, 2·reach + C keys, under 3/4 of them), else the masked SDPA. The encoder has no FlexAttention
    kernel and its reference is the masked SDPA, so flex and reference run that."""
    if impl == "band":
        return SpanPlan("band")
    if impl == "auto" and device.type != "cuda" and T > 2 * chunk:
        reach = float(keys_reached(z.detach().float(), ramp, hard).max())
        if 2 * reach + chunk < 0.75 * T:
            return SpanPlan("band")
    return SpanPlan("masked")
