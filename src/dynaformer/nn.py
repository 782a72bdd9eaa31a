"""The two mechanisms as drop-in modules for any PyTorch model, built from plain arguments (no `ModelConfig`):

- `SpanAttention`: causal (or bidirectional) multi-head self-attention with rotary positions in which each head
  attends only as far back as its learned span reaches (Sukhbaatar et al. 2019, "Adaptive Attention Span in
  Transformers"; `span="dynamic"` makes the span depend on each token's content). The kernel is chosen by the
  same planner as in `Transformer` (kernels/plan.py): band kernels on CPU where spans are short, SDPA otherwise.
- `DynamicResidual`: a pre-norm residual connection whose branch is weighted by the training progress, the
  token's position and its content (docs/design.md §3); identity-at-init (exactly pre-norm until trained).

Both take the training progress τ ∈ [0, 1] from a `Progress` you share between them and set from your loop.
The span penalty (the pressure that keeps spans short) is each `SpanAttention.aux_loss()`, to add to your loss.

    from dynaformer.nn import DynamicResidual, Progress, SpanAttention

    class Block(nn.Module):
        def __init__(self, d, heads, progress):
            super().__init__()
            self.attn = SpanAttention(d, heads, span="dynamic", span_max=512, progress=progress)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU("tanh"), nn.Linear(4 * d, d, bias=False))
            self.res_attn = DynamicResidual(d, progress=progress)
            self.res_mlp = DynamicResidual(d, progress=progress)

        def forward(self, x):
            x = self.res_attn(x, self.attn)    # x + w(τ, p, x) · attn(norm(x))
            return self.res_mlp(x, self.mlp)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .model.attention import Attention
from .model.config import ModelConfig
from .model.context import ForwardContext, padding_from_mask
from .model.layers import Rotary
from .model.residual import make_residual

__all__ = ["DynamicResidual", "Progress", "SpanAttention"]


class Progress(nn.Module):
    """Training progress τ = step / total steps, shared by the modules that read it. Set it from the training
    loop (`progress.set(step, total)`); it is a buffer, so it is saved and restored with the model."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("value", torch.zeros(()))

    @torch.no_grad()
    def set(self, step: int, total: int) -> None:
        self.value.fill_(min(1.0, max(0.0, step / max(1, total))))


def _context(x: torch.Tensor, progress: Progress | None, causal: bool,
             key_padding_mask: torch.Tensor | None) -> ForwardContext:
    B, T = x.shape[:2]
    tau = progress.value if progress is not None else x.new_zeros(())
    pos = None
    if key_padding_mask is not None and causal:
        pos, key_padding_mask = padding_from_mask(key_padding_mask.to(x.device), B, 0, T)
    return ForwardContext(start=0, length=T, progress=tau, causal=causal, key_padding_mask=key_padding_mask,
                          pos=pos)


class SpanAttention(nn.Module):
    """Self-attention (B, T, d_model) → (B, T, d_model) with a learned attention span per head ("per_head") or
    per head and token ("dynamic"), a fixed window ("fixed"), or none ("none": dense). Spans are in tokens:
    `span_max` bounds them, `span_ramp` is the soft edge, `span_init` the start. key_padding_mask (B, T):
    True = a real token (left or right padding)."""

    def __init__(self, d_model: int, n_head: int, *, span: str = "dynamic", span_max: int = 256,
                 span_ramp: int = 32, span_init: float = 32.0, span_window: int = 256, span_penalty: float = 2e-5,
                 span_tile: int = 64, causal: bool = True, rope_base: float = 10000.0, impl: str = "auto",
                 progress: Progress | None = None) -> None:
        super().__init__()
        self.cfg = ModelConfig(d_model=d_model, n_head=n_head, span=span, span_max=span_max, span_ramp=span_ramp,
                               span_init=span_init, span_window=span_window, span_penalty=span_penalty,
                               span_tile=span_tile, causal=causal, rope_base=rope_base, span_impl=impl,
                               context_len=max(span_max, span_window), n_layer=1)
        self.cfg.validate()
        self.rotary = Rotary(self.cfg.head_dim, rope_base)
        self.attn = Attention(self.cfg, 0, self.rotary)
        self.progress = [progress]  # a list: shared with other modules, not registered as this one's child
        self._aux: torch.Tensor | None = None
        self.last_spans: torch.Tensor | None = None  # (B|1, H, T|1) spans in tokens of the last call

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        ctx = _context(x, self.progress[0], self.cfg.causal, key_padding_mask)
        y = self.attn(x, ctx)
        losses = ctx.outputs.aux_losses
        self._aux = torch.stack(losses).sum() if losses else None
        self.last_spans = ctx.outputs.spans.get(0)
        return y

    def aux_loss(self) -> torch.Tensor:
        """The span penalty of the last training call (0 for kinds without one): add it to the loss."""
        return self._aux if self._aux is not None else torch.zeros((), device=self.rotary.inv_freq.device)


class DynamicResidual(nn.Module):
    """x ← x + w · branch(norm(x)), w = c·s(τ) · (1 + β·φ(p) + Σ γ_j tanh(w_jᵀ norm(x))): learned gain and
    progress schedule (`step`), position term (`position`; φ(p) = log((p+1)/p0)), content term (`content`,
    rank `rank`). All start at zero, so the module is exactly pre-norm at init. `layer` (0, 1, ... over the
    model's sub-layers) only matters for bit-equality with `Transformer`'s own initialisation."""

    def __init__(self, d_model: int, *, step: bool = True, position: bool = True, content: bool = True,
                 gain: bool = True, rank: int = 4, p0: float | None = None, context_len: int = 1024,
                 gamma_init: float = 0.1, norm_eps: float = 1e-6, causal: bool = True, layer: int = 0,
                 progress: Progress | None = None) -> None:
        super().__init__()
        heads = 2 if d_model % 4 == 0 else 1
        self.cfg = ModelConfig(d_model=d_model, n_head=heads, residual="dynamic", dyn_step=step,
                               dyn_position=position, dyn_content=content, dyn_gain=gain, dyn_rank=rank,
                               dyn_p0=p0, context_len=context_len, dyn_gamma_init=gamma_init, norm_eps=norm_eps,
                               causal=causal)
        self.res = make_residual(self.cfg, layer)
        self.progress = [progress]

    def forward(self, x: torch.Tensor, branch: Callable[[torch.Tensor], torch.Tensor],
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.res(x, branch, _context(x, self.progress[0], self.cfg.causal, key_padding_mask))
