"""Sampling: temperature, top-k, top-p (nucleus), seeded; with or without the KV cache.

Both paths see the same tokens at the same positions, so they produce identical samples. When the
sequence reaches `max_len` the model is conditioned on the last `max_len` tokens (as nanoGPT does);
the cached path then re-reads that window, which keeps the two paths equal.
"""

from __future__ import annotations

import math

import torch

from ..errors import DynaformerError
from ..resources import check_fits_in_memory
from .cache import KVCache
from .memory import generate_bytes
from .transformer import Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """logits: (B, V) → next token ids (B, 1). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def _last_logits(model: Transformer, ids: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """(B, V) logits of the last position only: the head runs on one token, not on the whole window."""
    return model.head(model.hidden(ids, cache)[:, -1])


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True, max_len: int | None = None,
             eos_id: int | None = None, cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """prompt: (B, T0) token ids → (B, T0 + n) with n ≤ max_new_tokens new tokens.

    cache_dtype: the KV cache's dtype (default: the model's). torch.bfloat16 under an fp32 model halves the bytes
    each decoded token reads (the cost of decoding at long contexts) and rounds the cached keys and values to
    bf16, so the logits move by about 1e-2 and greedy tokens may differ; opt-in for that reason."""
    if max_len is not None and max_len < 1:
        raise DynaformerError(f"generate: max_len must be a positive number of tokens, got {max_len}")
    max_len = max_len or model.cfg.context_len
    check_fits_in_memory(generate_bytes(model.cfg, prompt.size(0), prompt.size(1) + max_new_tokens, max_len),
                         f"generate: {max_new_tokens} new tokens")
    if prompt.dim() != 2 or prompt.size(1) == 0:
        raise DynaformerError("generate: the prompt must hold at least one token")
    if prompt.size(1) > max_len:
        raise DynaformerError(
            f"generate: the prompt has {prompt.size(1)} tokens but the model takes at most {max_len} "
            f"(its context_len; pass a larger max_len to extrapolate)")
    bad_top = (top_k is not None and top_k <= 0) or (top_p is not None and not 0 < top_p <= 1)
    if not 0 <= temperature < math.inf or bad_top:
        raise DynaformerError("generate: need a finite temperature ≥ 0, top_k > 0 and 0 < top_p ≤ 1")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device).manual_seed(seed)
    B, T0 = prompt.shape
    # Every token this call can produce, in one buffer written in place: no per-token concatenation.
    seq = torch.empty(B, T0 + max_new_tokens, dtype=prompt.dtype, device=device)
    seq[:, :T0] = prompt
    n, cache = T0, None
    try:
        for _ in range(max_new_tokens):
            window = seq[:, max(0, n - max_len) : n]
            if not use_cache:
                logits = _last_logits(model, window)
            elif cache is None or cache.length >= max_len:
                # (Re)fill the cache from the window: the first step, or after the window slid.
                # Sized to what this call can hold, not to max_len (a context of 10⁹ must not allocate it).
                cache = model.new_cache(B, min(max_len, T0 + max_new_tokens), dtype=cache_dtype)
                logits = _last_logits(model, window, cache)
            else:
                logits = _last_logits(model, seq[:, n - 1 : n], cache)
            nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (B, 1)
            seq[:, n : n + 1] = nxt
            n += 1
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
    finally:
        model.train(was_training)
    return seq[:, :n]
