"""What a forward pass knows besides the hidden states (positions, training progress, the cache, padding), and
what it reports besides them (`ForwardOutputs`: auxiliary losses, spans), collected as it runs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import KVCache


@dataclass
class ForwardOutputs:
    """Side outputs of one forward pass. Modules add to it through `ForwardContext.outputs`; the Transformer keeps
    the last forward's (`Transformer.aux_loss`, `Transformer.last_spans`), so nothing is stored on submodules."""

    aux_losses: list[torch.Tensor] = field(default_factory=list)  # to add to the training loss (span penalty)
    spans: dict[int, torch.Tensor] = field(default_factory=dict)  # layer → spans z (1|B, H, 1|T), detached


@dataclass
class ForwardContext:
    start: int  # index of the first token of this call in the sequence (> 0 when decoding with a cache)
    length: int  # number of new tokens in this call
    progress: torch.Tensor  # training progress τ ∈ [0, 1], a scalar buffer of the model
    cache: KVCache | None = None
    causal: bool = True
    key_padding_mask: torch.Tensor | None = None  # (B, T) bool, True = a real token (encoder batches)
    # Padded causal batches (`attention_mask`); both None for unpadded input, which keeps the fast kernels.
    pos: torch.Tensor | None = None  # (B, T) long: each token's position counted from its row's first real token
    key_mask: torch.Tensor | None = None  # (B, start + T) bool over every key so far, True = a real token
    outputs: ForwardOutputs = field(default_factory=ForwardOutputs)


def padding_from_mask(attention_mask: torch.Tensor, batch: int, start: int,
                      length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(pos (B, T), key_mask (B, start + T)) from a transformers-style attention_mask over every token so far
    (cached ones first): 1 = real token, 0 = padding, padding only before and/or after a row's real tokens.
    (None, None) when nothing is padded, so unpadded batches run exactly as without a mask.

    Positions count from each row's first real token, so a left-padded row sees the positions (rotary, the
    dynamic residual's p) it would see alone; padded keys are masked out in every attention kind."""
    L = start + length
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != (batch, L):
        raise ValueError(f"attention_mask must have shape (batch, cached + new tokens) = ({batch}, {L}), got "
                         f"{tuple(attention_mask.shape)}")
    m = attention_mask.to(torch.long)
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (a real token)")
    if bool(m.all()):
        return None, None
    # A row may be padded on the left, on the right or both, but its real tokens must be contiguous:
    # at most one 0 → 1 step, counting a leading 1 as a step.
    steps = (m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]
    if bool((steps > 1).any()):
        row = int((steps > 1).nonzero()[0, 0])
        raise ValueError(f"attention_mask row {row} has padding between real tokens; only left or right "
                         f"padding is supported (each row's real tokens must be contiguous)")
    left = (m.cumsum(1) == 0).sum(1)  # (B,) leading padding
    idx = torch.arange(start, L, device=m.device)
    pos = (idx[None, :] - left[:, None]).clamp_min(0)  # (B, T); padding before a row's start gets 0
    return pos, m.bool()
