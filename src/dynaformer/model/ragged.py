"""Independent sequences decoded in one forward (iteration-level batching, as Orca's selective batching does):
`RaggedCache` holds one `KVCache` per row, each with its own length, dense or span-bounded. A forward over it
runs every token-wise op (embedding, norms, QKV, MLP, residuals, head) batched over the rows, and attention row
by row, each row against its own cache (model/attention.py). Each row sees its own positions (rotary, the
dynamic residual's p): `Transformer.hidden` passes them as the context's per-row `pos`.

Rows may join and leave between forwards: the cache object is cheap, built per step from the rows' caches, and
no row's cache is padded or copied, so a span-bounded row keeps its bounded memory.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from .cache import KVCache, LayerCache
from .context import ForwardContext


class RaggedCache:
    """A batch of rows, row b continuing the sequence that `caches[b]` holds. `begin` (called by the forward)
    fixes each row's starting position for that call."""

    def __init__(self, caches: Sequence[KVCache]) -> None:
        if not caches:
            raise ValueError("RaggedCache needs at least one row's cache")
        self.rows = list(caches)
        self._starts: list[int] | None = None

    @property
    def length(self) -> int:
        """The longest row's length: position tables are built to cover every row."""
        return max(c.length for c in self.rows)

    def begin(self, length: int, device: torch.device) -> torch.Tensor:
        """A forward of `length` new tokens per row starts: (B, length) positions, each row's own."""
        self._starts = [c.length for c in self.rows]
        starts = torch.tensor(self._starts, device=device)
        return starts[:, None] + torch.arange(length, device=device)

    def contexts(self, ctx: ForwardContext) -> list[ForwardContext]:
        """Per row, the context of a single-sequence call against that row's own cache (sharing ctx's outputs),
        as `begin` fixed it: the same start in every layer, though each layer's attention grows the cache."""
        if self._starts is None:
            raise RuntimeError("RaggedCache.begin must run before attention (Transformer.hidden calls it)")
        return [ForwardContext(start=s, length=ctx.length, progress=ctx.progress, cache=c, causal=True,
                               outputs=ctx.outputs) for s, c in zip(self._starts, self.rows, strict=True)]


def reserved_bytes(cache: KVCache) -> int:
    """Bytes a cache holds for keys and values from the start (its buffers are allocated up front): what a
    server charges a sequence against its memory budget."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, LayerCache):
            total += layer.k.nbytes + layer.v.nbytes  # the whole buffer, not only the positions filled so far
        else:
            total += layer.nbytes()  # a bounded cache's buffers, slack included
    return total


def clone_cache(cache: KVCache) -> KVCache:
    """An independent copy of a cache, buffers and bookkeeping: the sequence it holds, continued twice (a server's
    n choices of one prompt share its prefill). A deep copy, so every cache kind (dense, span-bounded, a span
    relative's own) copies whole, and views of one buffer (a bounded group's keys and values) stay views of the
    one copied buffer: torch's deepcopy copies a storage once and rebuilds its views on the copy."""
    return copy.deepcopy(cache)
