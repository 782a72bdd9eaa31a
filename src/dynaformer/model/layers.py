"""Small building blocks: RMSNorm, rotary positions, the MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import compiled_decode, decode_rms_norm
from .config import ModelConfig


def host_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a parameter's full value (FSDP shards parameters as DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def gate_parameter(t: torch.Tensor) -> nn.Parameter:
    """A mechanism parameter: no weight decay, initialised by its module (Transformer.reset_parameters skips it)."""
    p = nn.Parameter(t)
    p.no_weight_decay = True
    p.keep_init = True
    return p


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), with a learned gain and no bias."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (not torch.is_grad_enabled() and x.is_cpu and x.dtype is torch.float32 and x.dim() == 3 and x.shape[1] == 1
                and compiled_decode(x.dtype, x.dtype, "cpu")):
            return decode_rms_norm(x, self.weight, self.eps)  # a decoding step: one call, not ATen's seven ops
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding (Su et al. 2021, RoFormer), applied to q and k by absolute position.

    The cos/sin table covers every position up front: `reserve(n)` (the KV cache calls it with its capacity) builds
    it to n, so decoding only slices it; a call beyond the table grows it, so positions past the training context
    work (extrapolation).
    """

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self._cos: torch.Tensor | None = None  # (N, D/2) for positions 0 .. N-1
        self._sin: torch.Tensor | None = None
        self._cos2: torch.Tensor | None = None  # (N, D): [cos, cos] and [−sin, sin], the no-grad path's tables
        self._sin2: torch.Tensor | None = None

    def reserve(self, length: int, device: torch.device) -> None:
        """Make the table cover positions 0 .. length-1 on `device`."""
        if self._cos is None or self._cos.shape[0] < length or self._cos.device != device:
            n = max(length, 2 * (0 if self._cos is None else self._cos.shape[0]), 256)
            # Built as normal tensors even under inference_mode, so a later training step can use them.
            with torch.inference_mode(False), torch.no_grad():
                t = torch.arange(n, device=device, dtype=torch.float64)
                freqs = torch.outer(t, self.inv_freq.to(device=device, dtype=torch.float64).clone())
                self._cos, self._sin = freqs.cos().float(), freqs.sin().float()
                h = self._cos.shape[-1]
                self._cos2, self._sin2 = self._cos.repeat(1, 2), self._sin.repeat(1, 2)
                self._sin2[:, :h].neg_()

    def half_tables(self, end: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (N ≥ end, D/2) fp32, for positions 0 .. N-1 (the compiled decoding step's input)."""
        self.reserve(end, device)
        return self._cos, self._sin

    def forward(self, x: torch.Tensor, start: int, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., T, D) at positions start .. start+T-1, or (..., B, H, T, D) at per-row positions pos (B, T)
        (padded batches; every pos < start + T)."""
        T = x.shape[-2]
        self.reserve(start + T, x.device)
        grad = torch.is_grad_enabled() and x.requires_grad
        cos, sin = (self._cos, self._sin) if grad else (self._cos2, self._sin2)
        if pos is not None:  # (B, 1, T, ·): broadcast over heads
            cos, sin = cos[pos].unsqueeze(-3), sin[pos].unsqueeze(-3)
        else:
            cos, sin = cos[start : start + T], sin[start : start + T]  # (T, ·)
        if cos.dtype != x.dtype:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if grad:
            return _Rotate.apply(x, cos, sin)
        # No autograd (decoding pays per op, not per element): three ops on full rows, the same products and sums
        # as _rotate_into: x·[cos, cos] + [x2, x1]·[−sin, sin].
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """out = x rotated by +θ (sign 1) or −θ (sign −1), half-split pairing (GPT-NeoX convention):
    (x1, x2) → (x1·cos − x2·sin, x2·cos + x1·sin). Four ops writing into one buffer: no concatenation."""
    h = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin, value=sign)


class _Rotate(torch.autograd.Function):
    """Rotary rotation with a hand-written backward (the inverse rotation): 4 ops each way instead of
    autograd's 7 forward and ~10 backward for the cat formulation."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        out = torch.empty_like(x)
        _rotate_into(out, x, cos, sin, 1.0)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        out = torch.empty_like(g)
        _rotate_into(out, g, cos, sin, -1.0)
        return out, None, None


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.up = nn.Linear(cfg.d_model, (2 if self.swiglu else 1) * cfg.ff_dim, bias=False)
        self.down = nn.Linear(cfg.ff_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.swiglu:
            gate, val = h.chunk(2, dim=-1)
            h = F.silu(gate) * val
        else:
            h = F.gelu(h, approximate="tanh")
        return self.down(h)
