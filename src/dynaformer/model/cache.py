"""Key/value cache for incremental decoding: one preallocated buffer per layer."""

from __future__ import annotations

import torch


class LayerCache:
    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device) -> None:
        self.k = torch.empty(batch, n_head, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D); return every cached key and value so far (B, H, L, D)."""
        T = k.shape[-2]
        end = self.length + T
        if end > self.k.shape[-2]:
            raise RuntimeError(f"KV cache overflow: {end} > {self.k.shape[-2]} positions")
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def nbytes(self) -> int:
        """Bytes held by the keys and values actually stored."""
        per_pos = self.k[:, :, :1].numel() * self.k.element_size()
        return 2 * per_pos * self.length


class KVCache:
    def __init__(self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
                 dtype=torch.float32, device=None) -> None:
        self.layers = [LayerCache(batch, n_head, max_len, head_dim, dtype, device) for _ in range(n_layer)]
        self.max_len = max_len

    @property
    def length(self) -> int:
        return self.layers[0].length

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
