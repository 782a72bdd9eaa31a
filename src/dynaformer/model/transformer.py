"""The decoder-only transformer (nanoGPT-shaped): embed → blocks → norm → tied head.

Initialisation (documented because results depend on it): every linear and embedding weight is
N(0, init_std); the output projection of each residual branch (attention `proj`, MLP `down`) is
N(0, init_std / √(2·n_layer)) as in GPT-2, so the stream's variance does not grow with depth; norm
gains start at 1; there are no biases.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import compiled_decode
from .attention import Attention
from .cache import KVCache
from .config import ModelConfig
from .context import ForwardContext, ForwardOutputs, padding_from_mask
from .layers import MLP, RMSNorm, Rotary
from .ragged import RaggedCache
from .residual import make_residual, make_stream
from .span import span_cache_bound


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, rotary: Rotary) -> None:
        super().__init__()
        self.attn = Attention(cfg, layer_idx, rotary)
        self.mlp = MLP(cfg)
        self.attn_res = make_residual(cfg, 2 * layer_idx)
        self.mlp_res = make_residual(cfg, 2 * layer_idx + 1)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else None  # None: no call per sub-layer

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.drop is None or not self.training:
            x = self.attn_res(x, lambda h: self.attn(h, ctx), ctx)
            return self.mlp_res(x, self.mlp, ctx)
        x = self.attn_res(x, lambda h: self.drop(self.attn(h, ctx)), ctx)
        return self.mlp_res(x, lambda h: self.drop(self.mlp(h)), ctx)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i, self.rotary) for i in range(cfg.n_layer))
        self.stream = make_stream(cfg)  # None unless the residual kind carries more than x (model/streams.py)
        # Whether the compiled decoding step can run each layer's attention: every span kind gives it its spans
        # (the span relatives attend themselves) and no value residual mixes the values.
        self._compiled_decoding = not cfg.value_residual and all(
            b.attn.span is None or hasattr(b.attn.span, "decode_spans") for b in self.blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        # Training progress τ = step / total_steps; the trainer sets it, inference keeps the last value.
        self.register_buffer("progress", torch.zeros(()))
        self.last_outputs: ForwardOutputs | None = None  # side outputs of the last forward (aux losses, spans)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2 or getattr(p, "keep_init", False):
                continue  # norm gains (ones) and mechanism parameters initialise themselves
            is_branch_out = name.endswith(("attn.proj.weight", "mlp.down.weight"))
            scale = 1.0 / math.sqrt(2 * self.cfg.n_layer) if is_branch_out else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)
        for block in self.blocks:  # residual kinds with their own branch init (DeepNorm's β)
            for res, branch in ((block.attn_res, block.attn), (block.mlp_res, block.mlp)):
                res.init_branch(branch)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel()

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for `batch` rows of up to `max_len` positions, its buffers and the rotary table for every
        one of those positions allocated now, so decoding allocates none of them per token."""
        p = self.embed.weight
        self.rotary.reserve(max_len, p.device)
        dtype = dtype or p.dtype
        keep = [b.attn.span.new_layer_cache(batch, max_len, self.cfg.head_dim, dtype, p.device)
                if hasattr(b.attn.span, "new_layer_cache")  # a cache of its own (model/span_relatives.py)
                else span_cache_bound(b.attn.span, float(self.progress)) for b in self.blocks]
        return KVCache(self.cfg.n_layer, batch, self.cfg.n_head, max_len, self.cfg.head_dim,
                       dtype=dtype, device=p.device, keep=keep)

    def aux_loss(self) -> torch.Tensor:
        """Auxiliary losses recorded by the last training forward (the span penalty), to add to the loss."""
        losses = self.last_outputs.aux_losses if self.last_outputs is not None else []
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.embed.weight.device)

    def hidden(self, idx: torch.Tensor, cache: KVCache | RaggedCache | None = None,
               key_padding_mask: torch.Tensor | None = None,
               states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """idx: (B, T) token ids → final normed hidden states (B, T, C).

        key_padding_mask: 1 or True = a real token, 0 or False = padding. Causal models: (B, cached + T), left or
        right padding (see context.padding_from_mask); a padded row then gives what it gives alone. Encoders:
        (B, T) bool. `states`, when given, receives the embeddings and each block's output (the last one normed),
        transformers' `hidden_states`. A `RaggedCache` (model/ragged.py) decodes independent sequences together,
        each at its own position against its own cache (no padding mask)."""
        B, T = idx.shape
        if cache is not None and not self.cfg.causal:
            raise ValueError("a bidirectional encoder (causal=False) has no KV cache")
        start = cache.length if cache is not None else 0
        pos = None
        if isinstance(cache, RaggedCache):
            if key_padding_mask is not None:
                raise ValueError("a RaggedCache's rows are unpadded; pass no key_padding_mask")
            pos = cache.begin(T, idx.device)
        elif key_padding_mask is not None and self.cfg.causal:
            pos, key_padding_mask = padding_from_mask(key_padding_mask.to(idx.device), B, start, T)
            if key_padding_mask is not None:  # padded positions hold arbitrary ids (often out of range): never read
                idx = idx.masked_fill(~key_padding_mask[:, start:], 0)
        x = self.embed(idx)  # (B, T, C)
        rows = cache.rows if isinstance(cache, RaggedCache) else [cache] if isinstance(cache, KVCache) else []
        decoding = (T == 1 and bool(rows) and key_padding_mask is None and self._compiled_decoding
                    and not torch.is_grad_enabled() and all(c.compiled_step and c.dtype == rows[0].dtype for c in rows)
                    and compiled_decode(x.dtype, rows[0].dtype, x.device))
        ctx = ForwardContext(start=start, length=T, progress=self.progress, cache=cache, causal=self.cfg.causal,
                             key_padding_mask=key_padding_mask, pos=pos, decoding=decoding)
        if states is not None:
            states.append(x)
        stream = self.stream
        if stream is not None:
            x = stream.expand(x)
        for block in self.blocks:
            x = block(x, ctx)
            if states is not None:
                states.append(x if stream is None else stream.reduce(x))
        if stream is not None:
            x = stream.reduce(x)
        x = self.norm(x)
        if states is not None:
            states[-1] = x
        self.last_outputs = ctx.outputs
        return x

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | RaggedCache | None = None,
                key_padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids → logits (B, T, V) and, with targets (B, T), the mean cross-entropy
        over targets ≠ -100. With a cache, idx holds only the new tokens and follows what it stores.
        key_padding_mask: (B, cached + T) for padded batches (see `hidden`); mark padded targets -100."""
        logits = self.head(self.hidden(idx, cache, key_padding_mask))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss
