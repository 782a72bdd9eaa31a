"""Sliding-window attention with attention sinks (Xiao et al., ICLR 2024, "Efficient Streaming Language Models
with Attention Sinks", StreamingLLM), optionally with a learned sink logit per head (as in OpenAI's gpt-oss,
2025: one logit per head joins every softmax's denominator and carries no value).

A query at position p (counted from its row's first real token) sees the keys of its window, positions
p − W + 1 .. p, and the sinks: the row's first n tokens (n = sink_tokens), wherever they are. With a sink logit s_h,

    y_p = Σ_{j visible} exp(q·k_j/√D) v_j / (exp(s_h) + Σ_{j visible} exp(q·k_j/√D)).

The window part is the hard span z = W − 1 of kernels/span.py, so the planner (kernels/plan.py) picks its
kernel as for a fixed window; the sinks out of the window (at most n keys per query) are a small dense
product merged through the log-sum-exp:
- band: the CPU band kernel returns each window softmax's log-sum-exp (differentiable), and
  y = e^{lse_w − L}·y_w + Σ_{sinks} e^{s_j − L}·v_j with L = log(e^{lse_w} + Σ e^{s_j} + e^{s_h});
- dense (the window covers every key, no sink outside it and no sink logit): causal SDPA;
- otherwise (decode, masked, reference, padded batches, export): `reference_sink_attention`, one softmax over
  the window's scores, the sinks' scores and the sink logit (O(Tq·Tk), the reference and the short path).
"""

from __future__ import annotations

import math

import torch

from ._tiles import NEG_INF
from .attention import causal_attention, padding_bias
from .band import band_span_attention
from .plan import plan


def _sink_visible(q_pos: torch.Tensor, n: int, window: int) -> torch.Tensor:
    """(B|1, 1, Tq, n) bool: sink r (a row's r-th real token) joins query p's softmax apart from the window:
    it lies before the window, p − r ≥ W (a sink inside the window is counted there, once)."""
    r = torch.arange(n, device=q_pos.device)
    return (q_pos[:, None, :, None] - r) >= window


def visible_keys(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, n_sink: int) -> torch.Tensor:
    """(B|1, 1, Tq, Tk) bool: key at real position k seen by the query at real position p: 0 ≤ p − k < W (the
    window) or k < n_sink, k ≤ p (a sink). Each query keeps its own key (the diagonal), so that a padding
    query, whose output is never read, has a finite row."""
    d = q_pos[:, :, None] - k_pos[:, None, :]
    ok = (d >= 0) & ((d < window) | (k_pos[:, None, :] < n_sink))
    Tq, Tk = q_pos.shape[-1], k_pos.shape[-1]
    own = torch.arange(Tq, device=d.device)[:, None] + (Tk - Tq) == torch.arange(Tk, device=d.device)[None, :]
    return (ok | own)[:, None]


def reference_sink_attention(q, k, v, q_pos, k_pos, window: int, n_sink: int,
                             sink_logit: torch.Tensor | None = None, key_padding_mask: torch.Tensor | None = None,
                             extra_k: torch.Tensor | None = None, extra_v: torch.Tensor | None = None) -> torch.Tensor:
    """One softmax over [the range's visible keys, the cache's sinks before the range, the sink logit], in fp32.
    q: (B, H, Tq, D); k, v: (B, H, Tk, D), contiguous keys ending at the newest query; q_pos (B|1, Tq), k_pos
    (B|1, Tk) long real positions; extra_k, extra_v (B, H, n, D): the sinks a cache holds (positions 0..n−1),
    counted where the range does not hold them (r < the range's first position); sink_logit: (H,) or None."""
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    scale = 1.0 / math.sqrt(D)
    qf = q.float()
    bias = torch.zeros((), device=q.device).masked_fill(~visible_keys(q_pos, k_pos, window, n_sink), NEG_INF)
    if key_padding_mask is not None:
        bias = bias + padding_bias(key_padding_mask, Tq, Tk)
    cols = [(qf @ k.float().transpose(-1, -2)) * scale + bias]
    n = 0 if extra_k is None else extra_k.shape[-2]
    if n:
        r = torch.arange(n, device=q.device)
        ok = _sink_visible(q_pos, n, window) & (r < k_pos[:, :1, None])[:, None]
        cols.append(((qf @ extra_k.float().transpose(-1, -2)) * scale).masked_fill(~ok, NEG_INF))
    if sink_logit is not None:
        cols.append(sink_logit.float().view(1, H, 1, 1).expand(B, H, Tq, 1))
    p = torch.softmax(torch.cat(cols, -1), -1)
    y = p[..., :Tk] @ v.float()
    if n:
        y = y + p[..., Tk:Tk + n] @ extra_v.float()
    return y.to(q.dtype)


def _merge(y_w, lse_w, q, sink_k, sink_v, q_pos, window: int, sink_logit) -> torch.Tensor:
    """The window's softmax (output y_w, log-sum-exp lse_w (B, H, Tq)) merged with the sinks (positions
    0..n−1) before the window and the sink logit."""
    B, H, Tq, D = q.shape
    n = sink_k.shape[-2]
    parts = [lse_w.unsqueeze(-1)]
    s = None
    if n:
        s = (q.float() @ sink_k.float().transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(~_sink_visible(q_pos, n, window), NEG_INF)  # exp(−inf − L) = 0, with zero gradient
        parts.append(s)
    if sink_logit is not None:
        parts.append(sink_logit.float().view(1, H, 1, 1).expand(B, H, Tq, 1))
    L = torch.logsumexp(torch.cat(parts, -1), -1, keepdim=True)  # finite: the window holds the query itself
    y = torch.exp(lse_w.unsqueeze(-1) - L) * y_w.float()
    if s is not None:
        y = y + torch.exp(s - L) @ sink_v.float()
    return y.to(q.dtype)


def sink_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                          k_pos: torch.Tensor, window: int, n_sink: int, sink_logit: torch.Tensor | None = None,
                          key_padding_mask: torch.Tensor | None = None, extra_k: torch.Tensor | None = None,
                          extra_v: torch.Tensor | None = None, impl: str = "auto", chunk: int = 64) -> torch.Tensor:
    """Causal sink-window attention (module doc; arguments as `reference_sink_attention`). The window part's
    kernel is plan()'s; unpadded calls only reach the band and dense kernels, so positions there are
    k_pos = first + 0..Tk−1."""
    Tq, Tk, H = q.shape[-2], k.shape[-2], q.shape[1]
    z = q.new_full((1, H, 1), float(window - 1), dtype=torch.float32)
    grad = torch.is_grad_enabled() and (q.requires_grad or (sink_logit is not None and sink_logit.requires_grad))
    p = plan(impl, z, Tq, Tk, device=q.device, dtype=q.dtype, grad=grad, padded=key_padding_mask is not None,
             chunk=chunk)
    if p.kernel in ("dense", "band", "split"):
        first = int(k_pos[0, 0])  # the range's first position (unpadded: every row alike)
        if p.kernel == "dense" and sink_logit is None and (first == 0 or n_sink == 0):
            return causal_attention(q, k, v)  # every sink lies in the range, and the window covers the range
        if p.kernel != "dense":  # (split: no head's window covers more than another's; kept for completeness)
            held = min(n_sink, first)  # sinks before the range come from the cache, the others from the range
            sink_k = k[:, :, :n_sink - held] if held == 0 else torch.cat([extra_k[:, :, :held],
                                                                          k[:, :, :max(0, n_sink - first)]], 2)
            sink_v = v[:, :, :n_sink - held] if held == 0 else torch.cat([extra_v[:, :, :held],
                                                                          v[:, :, :max(0, n_sink - first)]], 2)
            y_w, lse_w = band_span_attention(q, k, v, z, 1.0, True, chunk=chunk, native=p.native, with_lse=True)
            return _merge(y_w, lse_w, q, sink_k, sink_v, q_pos, window, sink_logit)
    return reference_sink_attention(q, k, v, q_pos, k_pos, window, n_sink, sink_logit, key_padding_mask,
                                    extra_k, extra_v)


def first_real_keys(sink_k: torch.Tensor, sink_v: torch.Tensor, count: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, real: torch.Tensor | None) -> None:
    """Write into sink_k, sink_v (B, H, n, D) the keys of each row's first n real tokens that arrive in k, v
    (B, H, T, D); count (B,) long: how many each row holds already (updated in place). real: (B, T) bool,
    None when every new token is real."""
    n, T = sink_k.shape[-2], k.shape[-2]
    if real is None:
        c = int(count.min())
        if bool((count == c).all()):  # every row alike: a slice copy
            m = max(0, min(n - c, T))
            if m:
                sink_k[:, :, c:c + m] = k[:, :, :m]
                sink_v[:, :, c:c + m] = v[:, :, :m]
                count += m
            return
        real = torch.ones(k.shape[0], T, dtype=torch.bool, device=k.device)
    rank = count[:, None] + real.long().cumsum(1) - 1  # (B, T): the row's real-token index of each new token
    take = real & (rank < n)
    b, t = take.nonzero(as_tuple=True)
    if b.numel():
        r = rank[b, t]
        sink_k[b, :, r] = k[b, :, t]
        sink_v[b, :, r] = v[b, :, t]
    count += take.sum(1)
