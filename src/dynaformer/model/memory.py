"""Generous memory estimates from a config alone, so a size that comes from a user (flags, a grid, a checkpoint's
config.json) is refused before anything is allocated (resources.check_fits_in_memory). fp32 throughout: the
bound must hold for the widest dtype the CPU path uses."""

from __future__ import annotations

from .config import ModelConfig

BYTES = 4  # fp32


def param_bound(cfg: ModelConfig) -> int:
    """An upper bound of the parameter count: per layer attention 4·d² and an MLP of 3·d·d_ff (SwiGLU's three
    matrices; GELU has two), the mechanisms' small terms within 2·d² more; token embeddings V·d and an untied
    head V·d."""
    d, L, V = cfg.d_model, cfg.n_layer, cfg.vocab_size
    return L * (6 * d * d + 3 * d * cfg.ff_dim) + 2 * V * d + _stream_terms(cfg)[0]


def _stream_terms(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, saved floats per token) the residual-stream relatives (streams.py) add, bounded: mHC's
    projection from all n·d numbers to 2n + n² mappings and n streams for hyper-connections; AttnRes' stack of
    up to 2L + 1 outputs, read and extended by every sub-layer."""
    d, S, n = cfg.d_model, 2 * cfg.n_layer, cfg.hc_streams
    small = n * n + 4 * n + 2 * d + 8  # static mappings, scales, norms
    if cfg.residual in ("hyper", "hyper_static") or (cfg.residual == "mhc" and cfg.mhc_per_stream):
        return S * (d * (n + 2) + small), 8 * S * n * d
    if cfg.residual == "mhc":
        return S * (n * d * (n * n + 2 * n) + n * d + small), 8 * S * n * d
    if cfg.residual == "attnres":
        return S * d + d, 3 * (S + 1) ** 2 * d
    return 0, 0


def step_bytes(cfg: ModelConfig, T: int) -> int:
    """Peak memory of one forward + backward at length T, batch 1: the saved activations (≈ 24 floats per
    channel per layer, plus what a multi-stream residual keeps), the logits three times (logits, their float
    copy, the gradient), and the attention scores a quadratic kernel would hold."""
    act = 24 * T * cfg.d_model * cfg.n_layer + T * _stream_terms(cfg)[1]
    logits = 3 * T * cfg.vocab_size
    scores = 3 * T * T * cfg.n_head if cfg.span_impl in ("masked", "reference") else 0
    return BYTES * (act + logits + scores)


def train_bytes(cfg: ModelConfig, batch_size: int, T: int | None = None) -> int:
    """Training: weights, gradients and two Adam moments (16 bytes per parameter) and one micro-batch's
    forward + backward at length T (default: the context)."""
    return 4 * BYTES * param_bound(cfg) + batch_size * step_bytes(cfg, T or cfg.context_len)


def generate_bytes(cfg: ModelConfig, batch_size: int, total_tokens: int, max_len: int | None = None) -> int:
    """Generation: the weights, the token ids (int64) of every sequence, a KV cache over the window the model
    conditions on (keys and values of every layer) and one step's logits."""
    window = min(total_tokens, max_len or cfg.context_len)
    kv = 2 * cfg.n_layer * window * cfg.d_model * BYTES
    return BYTES * param_bound(cfg) + batch_size * (8 * total_tokens + kv + BYTES * cfg.vocab_size * window)
