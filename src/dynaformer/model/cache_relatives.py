"""KV caches of the span relatives (model/span_relatives.py), answering `append` as model/cache.py's do.

- `SinkLayerCache` (sink_window): W + n keys per head whatever the length — each row's first n real tokens
  (the sinks, kept apart, filled per row so that a left-padded row keeps its own) and a span-bounded buffer
  of the last W.
- `DecayLayerCache` (fox): every key, unbounded (pruning depends on the forget gates, so no length bounds
  what a later query may keep), with the decay as one more fp32 key dimension (kernels/fox.py).
"""

from __future__ import annotations

import torch

from ..kernels.sink import first_real_keys
from .cache import BoundedLayerCache, KeyGroup, LayerCache


class SinkLayerCache:
    """The sinks (B, H, n, D) and the last `window` keys (model/cache.py's BoundedLayerCache, one group)."""

    def __init__(self, batch: int, n_head: int, window: int, n_sink: int, head_dim: int, dtype, device) -> None:
        self.window = BoundedLayerCache(batch, [window] * n_head, head_dim, dtype, device)
        self.sink_k = torch.zeros(batch, n_head, n_sink, head_dim, dtype=dtype, device=device)
        self.sink_v = torch.zeros_like(self.sink_k)
        self.count = torch.zeros(batch, dtype=torch.long, device=device)  # sinks held per row
        self.full = n_sink == 0

    @property
    def length(self) -> int:
        return self.window.length

    def append(self, k: torch.Tensor, v: torch.Tensor, real: torch.Tensor | None = None) -> list[KeyGroup]:
        """Store k, v (B, H, T, D); real (B, T) bool marks the real tokens among them (None: all are). Returns
        one group: every head, the last keys (at least W, newest last)."""
        if not self.full:
            first_real_keys(self.sink_k, self.sink_v, self.count, k, v, real)
            self.full = bool((self.count == self.sink_k.shape[-2]).all())
        return self.window.append(k, v)

    def sinks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sink_k, sink_v) (B, H, n, D): row b's first count[b] real tokens (the rest is never visible)."""
        return self.sink_k, self.sink_v

    def nbytes(self) -> int:
        return self.window.nbytes() + 2 * self.sink_k.numel() * self.sink_k.element_size()


class DecayLayerCache(LayerCache):
    """A dense cache of the augmented keys and values (head_dim + 1, fp32: the last key column is the
    accumulated decay u of each key)."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, device) -> None:
        super().__init__(batch, n_head, max_len, head_dim + 1, torch.float32, device)

    def last_decay(self) -> torch.Tensor | float:
        """u of the newest stored key (B, H, 1), or 0.0 before the first."""
        if self.length == 0:
            return 0.0
        return self.k[:, :, self.length - 1, -1:]
