"""Key/value cache for incremental decoding: one preallocated buffer per layer, or, for span attention,
a span-bounded buffer per group of heads that keeps only the keys those heads can still reach.

Both kinds answer `append` the same way: a list of `KeyGroup`s, each a set of heads with the keys and values
they can see, ending at the newest position. A dense cache has one group holding every head.

Decoding one token per row, the compiled step (kernels/decode.py) writes into the buffers itself: `step()` reserves
the slot of the new position in each group's buffer (compacting a full bounded buffer first) and the layer's
`k_bufs`, `v_bufs` and `head_lists` say where the buffers are and which heads each holds. Both ways leave the same
keys in the same slots, so prefill (`append`) and the compiled step take turns on one cache."""

from __future__ import annotations

from typing import NamedTuple

import torch

ALL_HEADS = slice(None)


class KeyGroup(NamedTuple):
    heads: slice | torch.Tensor  # which heads (an index into the head dimension)
    k: torch.Tensor  # (B, G, L, D): the keys these heads can see, the newest last
    v: torch.Tensor  # (B, G, L, D)


class LayerCache:
    """Every key so far in one buffer (B, H, max_len, D), allocated up front: appending is a copy into it."""

    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device) -> None:
        self.k = torch.empty(batch, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0
        self.k_bufs, self.v_bufs, self.head_lists = [self.k], [self.v], [list(range(n_head))]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> list[KeyGroup]:
        """Store k, v (B, H, T, D); return one group: every head, every key and value so far (B, H, L, D)."""
        T = k.shape[-2]
        end = self.length + T
        if end > self.k.shape[-2]:
            raise RuntimeError(f"KV cache overflow: {end} > {self.k.shape[-2]} positions")
        self.k.narrow(2, self.length, T).copy_(k)  # narrow + copy_: two ops, no Python-level indexing
        self.v.narrow(2, self.length, T).copy_(v)
        self.length = end
        return [KeyGroup(ALL_HEADS, self.k.narrow(2, 0, end), self.v.narrow(2, 0, end))]

    def step(self) -> list[int]:
        """Reserve one new position: [the slot its key and value go to]; keys 0 .. slot are the ones to attend."""
        if self.length >= self.k.shape[-2]:
            raise RuntimeError(f"KV cache overflow: {self.length + 1} > {self.k.shape[-2]} positions")
        self.length += 1
        return [self.length - 1]

    def nbytes(self) -> int:
        """Bytes held by the keys and values actually stored."""
        per_pos = self.k[:, :, :1].numel() * self.k.element_size()
        return 2 * per_pos * self.length


class _BoundedGroup:
    """Heads sharing one key bound: a buffer (2, B, G, keep + slack, D) filled up to `fill`."""

    __slots__ = ("heads", "keep", "buf", "kb", "vb", "fill")

    def __init__(self, heads: slice | torch.Tensor, keep: int, buf: torch.Tensor) -> None:
        self.heads, self.keep, self.buf, self.fill = heads, keep, buf, 0
        # (B, G, slots, D) views of the keys and the values; not unbind, whose views autograd forbids writing into
        self.kb, self.vb = buf[0], buf[1]

    def append(self, kn: torch.Tensor, vn: torch.Tensor) -> KeyGroup:
        """Store kn, vn (B, G, T, D); return the keys and values this call needs (at least the last `keep`)."""
        buf, fill, keep, T = self.buf, self.fill, self.keep, kn.shape[-2]
        if fill + T <= buf.shape[-2]:  # room left: write in place
            kb, vb = self.kb, self.vb
            kb.narrow(2, fill, T).copy_(kn)
            vb.narrow(2, fill, T).copy_(vn)
            self.fill = fill + T
            return KeyGroup(self.heads, kb.narrow(2, 0, fill + T), vb.narrow(2, 0, fill + T))
        # Full: the keys this call needs, then keep only the last `keep` of them at the front.
        old = min(fill, keep)
        ka = torch.cat([buf[0, :, :, fill - old : fill], kn], dim=2)
        va = torch.cat([buf[1, :, :, fill - old : fill], vn], dim=2)
        n = min(keep, ka.shape[-2])
        buf[0, :, :, :n] = ka[:, :, -n:]
        buf[1, :, :, :n] = va[:, :, -n:]
        self.fill = n
        return KeyGroup(self.heads, ka, va)

    def step(self) -> int:
        """Reserve the slot of one new key; a full buffer first keeps its last keep − 1 keys at the front, so
        after the step it holds the last `keep` keys, as `append` leaves it."""
        if self.fill == self.buf.shape[-2]:
            n = self.keep - 1
            self.buf[:, :, :, :n] = self.buf[:, :, :, self.fill - n : self.fill].clone()  # the ranges overlap
            self.fill = n
        self.fill += 1
        return self.fill - 1


class BoundedLayerCache:
    """Span-bounded cache: head h keeps only its last keep[h] keys (its reach: max span + ramp + slack), so the
    bytes fall with the spans. Heads with the same bound share a trimmed buffer of keep + keep/4 slots: new
    keys are written in place and the buffer is compacted (last keep keys moved to the front) when full.

    `append` returns one `KeyGroup` per bound; keys older than the reach are gone, which the span mask would
    have zeroed anyway."""

    def __init__(self, batch: int, keep: list[int], head_dim: int, dtype, device) -> None:
        by_keep: dict[int, list[int]] = {}
        for h, n in enumerate(keep):
            by_keep.setdefault(n, []).append(h)
        self.groups: list[_BoundedGroup] = []
        for n, heads in sorted(by_keep.items()):
            contiguous = heads == list(range(heads[0], heads[-1] + 1))
            index = slice(heads[0], heads[-1] + 1) if contiguous else torch.tensor(heads, device=device)
            if len(by_keep) == 1:
                index = ALL_HEADS  # one bound for every head: no per-group split
            slack = max(4, n // 4)  # compaction (a copy of `keep` keys) every `slack` tokens
            buf = torch.empty(2, batch, len(heads), n + slack, head_dim, dtype=dtype, device=device)
            self.groups.append(_BoundedGroup(index, n, buf))
        self.length = 0  # positions seen (not stored)
        self.k_bufs = [g.kb for g in self.groups]
        self.v_bufs = [g.vb for g in self.groups]
        self.head_lists = [heads for _, heads in sorted(by_keep.items())]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> list[KeyGroup]:
        """Store k, v (B, H, T, D); return per group of heads the keys and values (B, G, L, D) they can see."""
        out = [g.append(k, v) if g.heads is ALL_HEADS else g.append(k[:, g.heads], v[:, g.heads])
               for g in self.groups]
        self.length += k.shape[-2]
        return out

    def step(self) -> list[int]:
        """Reserve one new position: per group, the slot its key and value go to (keys 0 .. slot are attended)."""
        self.length += 1
        return [g.step() for g in self.groups]

    def nbytes(self) -> int:
        """Bytes allocated for keys and values (the full buffers, slack included)."""
        return sum(g.buf.numel() * g.buf.element_size() for g in self.groups)


class KVCache:
    """keep: per layer, None (keep every key), the per-head key bound of a span-bounded cache, or a layer cache
    its span kind built (model/cache_relatives.py)."""

    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None, keep: list | None = None) -> None:
        keep = keep or [None] * n_layer
        self.layers = [LayerCache(batch, n_head, max_len, head_dim, dtype, device) if kl is None
                       else BoundedLayerCache(batch, kl, head_dim, dtype, device) if isinstance(kl, list)
                       else kl for kl in keep]
        self.max_len = max_len
        self.dtype = dtype
        # The compiled decoding step writes into these two kinds' buffers (`step`, `k_bufs`, ...); a layer cache a
        # span relative brought decodes with tensor ops.
        self.compiled_step = all(type(layer) in (LayerCache, BoundedLayerCache) for layer in self.layers)

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
