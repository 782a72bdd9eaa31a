"""Compute accounting: parameters, analytic FLOPs per token (attention counted over the keys each
query actually computes), a torch FlopCounter cross-check, KV-cache bytes, and run timings.

Span hook: an attention module may define `attended_keys(T: int) -> float`, the mean number of keys
per query its kernel computes for a length-T sequence (after tile quantisation), and
`kv_cache_len(T: int) -> int`, the positions its KV cache keeps. Without them attention is dense
causal: (T + 1) / 2 keys per query and T cached positions.
"""

from __future__ import annotations

import statistics

import torch

from ..model import Transformer


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [blk.attn for blk in getattr(model, "blocks", [])]


def attended_keys(model: torch.nn.Module, T: int) -> list[float]:
    """Mean keys computed per query, per layer (the span hook, or dense causal)."""
    out = []
    for attn in attention_modules(model):
        fn = getattr(attn, "attended_keys", None)
        out.append(float(fn(T)) if callable(fn) else (T + 1) / 2)
    return out


def matmul_params(model: Transformer) -> int:
    """Parameters that take part in a matmul per token (all 2-D weights except the embedding lookup;
    the tied head counts once, as a matmul)."""
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() >= 2 and not name.startswith("embed."))
    if model.cfg.tie_embeddings:
        n += model.embed.weight.numel()
    return n


def measured_attention_fraction(model: torch.nn.Module, windows: torch.Tensor) -> float | None:
    """Query·key pairs the span kernels compute / dense causal pairs, from a forward over real text
    windows (N, T) (spans are content-dependent); None for a model without spans."""
    try:
        from ..model.span_stats import span_stats
    except ImportError:
        return None
    was = model.training
    model.eval()
    with torch.no_grad():
        model(windows.to(next(model.parameters()).device))
        stats = span_stats(model, windows.shape[1])
    model.train(was)
    return stats.get("attn_pairs_frac")


def flops_per_token(model: Transformer, T: int, attention_fraction: float | None = None) -> dict:
    """Analytic forward FLOPs per token at sequence length T (multiply-add = 2 FLOPs):
    2·(matmul params) + per layer 4·d_model·keys (QKᵀ and PV). Training ≈ 3× forward. Keys per query
    come from the `attended_keys` hook, else from a measured `attention_fraction` of dense causal."""
    d = model.cfg.d_model
    keys = attended_keys(model, T)
    if attention_fraction is not None and not any(callable(getattr(a, "attended_keys", None))
                                                  for a in attention_modules(model)):
        keys = [k * attention_fraction for k in keys]
    dense = 4 * d * (T + 1) / 2 * len(keys)
    attn = sum(4 * d * k for k in keys)
    fwd = 2 * matmul_params(model) + attn
    return {"T": T, "forward": fwd, "train": 3 * fwd, "attention": attn, "attention_dense": dense,
            "attention_fraction": attn / dense if dense else 1.0, "keys_per_layer": keys}


def counted_flops_per_token(model: torch.nn.Module, T: int) -> float | None:
    """torch.utils.flop_counter over one forward (counts what the ops report; SDPA counts the full
    T×T square, so it over-counts causal attention — a cross-check on the matmul part)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover
        return None
    x = torch.zeros(1, T, dtype=torch.long, device=next(model.parameters()).device)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / T


@torch.no_grad()
def kv_cache_bytes(model: Transformer, T: int) -> dict:
    """Bytes the KV cache holds after prefilling T tokens: measured (cache.nbytes()) and analytic."""
    cfg = model.cfg
    per_pos = 2 * cfg.n_head * cfg.head_dim * next(model.parameters()).element_size()
    lens = []
    for attn in attention_modules(model):
        fn = getattr(attn, "kv_cache_len", None)
        lens.append(min(T, int(fn(T))) if callable(fn) else T)
    measured = None
    try:
        cache = model.new_cache(1, T)
        x = torch.zeros(1, T, dtype=torch.long, device=next(model.parameters()).device)
        model(x, cache=cache)
        measured = int(cache.nbytes())
    except (RuntimeError, AttributeError):
        pass
    return {"T": T, "analytic": int(per_pos * sum(lens)), "measured": measured,
            "dense": int(per_pos * T * cfg.n_layer)}


def run_timings(metrics: list[dict]) -> dict:
    """Median tokens/s and ms/step of a run's logged training windows (the first is warm-up)."""
    recs = [r for r in metrics if "tok_s" in r and r.get("tok_s")]
    if len(recs) > 1:
        recs = recs[1:]
    if not recs:
        return {"tok_s": None, "ms_step": None}
    return {"tok_s": statistics.median(r["tok_s"] for r in recs),
            "ms_step": statistics.median(r["ms_step"] for r in recs)}


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory of this process: CUDA max allocated, or the peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"
    except ImportError:  # pragma: no cover
        return 0, "unavailable"


def compute_summary(model: Transformer, metrics: list[dict], context_len: int, kv_context: int | None = None,
                    windows: torch.Tensor | None = None) -> dict:
    """windows: real (N, context_len) inputs to measure the span kernels' computed fraction on."""
    kv_T = kv_context or context_len
    frac = measured_attention_fraction(model, windows) if windows is not None else None
    return {"params": model.num_params(), "params_non_embedding": model.num_params(embeddings=False),
            "flops": flops_per_token(model, context_len, frac), "counted_forward_flops": counted_flops_per_token(
                model, context_len), "kv_cache": kv_cache_bytes(model, kv_T), **run_timings(metrics)}

