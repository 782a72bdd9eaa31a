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
    # Padded batches; None for unpadded input, which keeps the fast kernels. (B, start + T) bool over every key
    # so far, True = a real token (an encoder has no cache: (B, T)).
    key_padding_mask: torch.Tensor | None = None
    pos: torch.Tensor | None = None  # padded causal batches: (B, T) long, positions from each row's first real token
    first_values: torch.Tensor | None = None  # value residual: the first layer's values of these tokens (B, H, T, D)
    # One token per row, unpadded (a KVCache, or a RaggedCache's rows at their own positions), no autograd: the
    # compiled decoding step (kernels/decode.py).
    decoding: bool = False
    outputs: ForwardOutputs = field(default_factory=ForwardOutputs)


def padding_from_mask(key_padding_mask: torch.Tensor, batch: int, start: int,
                      length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(pos (B, T), key_padding_mask (B, start + T) bool) of a causal call from its padding mask over every
    token so far (cached ones first; transformers' attention_mask convention): 1 or True = a real token, 0 or
    False = padding, padding only before and/or after a row's real tokens. (None, None) when nothing is
    padded, so unpadded batches run exactly as without a mask.

    Positions count from each row's first real token, so a left-padded row sees the positions (rotary, the
    dynamic residual's p) it would see alone; padded keys are masked out in every attention kind."""
    L = start + length
    if key_padding_mask.dim() != 2 or tuple(key_padding_mask.shape) != (batch, L):
        raise ValueError(f"key_padding_mask must have shape (batch, cached + new tokens) = ({batch}, {L}), got "
                         f"{tuple(key_padding_mask.shape)}")
    m = key_padding_mask.to(torch.long)
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("key_padding_mask must hold only 0 (padding) and 1 (a real token)")
    if bool(m.all()):
        return None, None
    # A row may be padded on the left, on the right or both, but its real tokens must be contiguous:
    # at most one 0 → 1 step, counting a leading 1 as a step.
    steps = (m[:, 1:] > m[:, :-1]).sum(1) + m[:, 0]
    if bool((steps > 1).any()):
        row = int((steps > 1).nonzero()[0, 0])
        raise ValueError(f"key_padding_mask row {row} has padding between real tokens; only left or right "
                         f"padding is supported (each row's real tokens must be contiguous)")
    left = (m.cumsum(1) == 0).sum(1)  # (B,) leading padding
    idx = torch.arange(start, L, device=m.device)
    pos = (idx[None, :] - left[:, None]).clamp_min(0)  # (B, T); padding before a row's start gets 0
    return pos, m.bool()
