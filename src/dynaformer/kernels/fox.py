"""Forgetting Attention (Lin, Nikishin, He & Courville, ICLR 2025, "Forgetting Transformer: Softmax Attention
with a Forget Gate", arXiv 2503.02130) and its adaptive computation pruning (Lin, Obando-Ceron, He & Courville
2025, arXiv 2504.06949).

Each head has a forget gate per token, f_t = σ(w_hᵀx_t + b_h), and attention logits get the decay bias

    D_ij = Σ_{l=j+1}^{i} log f_l = c_i − c_j,   c_t = Σ_{l≤t} log f_l,   o_i = Σ_j softmax_j(q_i·k_j/√d + D_ij) v_j.

Pruning drops the keys whose decay is below a threshold, D_ij < −θ: as log f ≤ 0, c is non-increasing, so
the kept keys of query i are a contiguous run ending at i, a hard span z_i = i − j_min(i) that the span
kernels (kernels/span.py) skip work with, as for any span. The paper sets its threshold from a bound on
|q·k|/√d that QK-norm provides (δ = −2U − log L + log ε); these models have no QK-norm and a bound taken over
the whole sequence would let later tokens change earlier outputs (and the KV cache), so θ here is a fixed
number of nats (`fox_prune`): each pruned weight is at most e^{2U − θ} of its query's own.

The bias rides through every kernel unchanged as one more query/key dimension: c_i − c_j differs from −c_j
by a constant per query, which the softmax ignores, so with u = −c (non-decreasing),

    q' = [q·√((d+1)/d), √(d+1)],   k' = [k, u],   v' = [v, 0]   ⇒   q'·k'/√(d+1) = q·k/√d + u_j,

the logits above up to the constant c_i, under the kernels' own scale 1/√(d+1). The KV cache stores k' (its
last column is u of each key), so a cached decode continues the cumulative sum and recomputes the same pruned spans. The
augmented tensors are fp32: u grows with the sequence, and bf16 would round it to whole nats.
"""

from __future__ import annotations

import math

import torch

from ._tiles import NEG_INF


def decay_bias(logf: torch.Tensor) -> torch.Tensor:
    """D (…, T, T) from log forget gates logf (…, T): D_ij = Σ_{l=j+1}^{i} log f_l for j ≤ i, −inf above the
    diagonal (the future). Computed from the cumulative sums, as the paper writes it."""
    c = logf.float().cumsum(-1)
    D = c.unsqueeze(-1) - c.unsqueeze(-2)
    T = logf.shape[-1]
    future = torch.ones(T, T, dtype=torch.bool, device=logf.device).triu_(1)
    return D.masked_fill(future, NEG_INF)


def reference_fox_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, logf: torch.Tensor,
                            prune: float = 0.0) -> torch.Tensor:
    """The dense definition: softmax(QKᵀ/√d + D) V, with the keys of D_ij < −prune dropped when prune > 0.
    q, k, v: (B, H, T, D); logf: (B, H, T) log forget gates. For tests."""
    D = decay_bias(logf)
    if prune > 0:
        D = D.masked_fill(D < -prune, NEG_INF)
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1]) + D
    return (torch.softmax(s, -1) @ v.float()).to(q.dtype)


def augment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, u: torch.Tensor):
    """(q', k', v') in fp32 with the decay as one more dimension (module doc); u = −c (B, H, T)."""
    d = q.shape[-1]
    one = q.new_ones((*q.shape[:-1], 1), dtype=torch.float32)
    qa = torch.cat([q.float() * math.sqrt((d + 1) / d), one * math.sqrt(d + 1)], -1)
    ka = torch.cat([k.float(), u.unsqueeze(-1).float()], -1)
    va = torch.cat([v.float(), torch.zeros_like(one)], -1)
    return qa, ka, va


def pruned_spans(u_keys: torch.Tensor, u_q: torch.Tensor, prune: float) -> torch.Tensor:
    """Hard spans z (B, H, Tq) fp32 of the kept keys: query i (the last Tq of Tk keys) keeps key j iff
    u_i − u_j ≤ prune (D_ij ≥ −prune); z_i = i − j_min(i). u_keys: (B, H, Tk) non-decreasing; u_q: (B, H, Tq)."""
    Tk, Tq = u_keys.shape[-1], u_q.shape[-1]
    j_min = torch.searchsorted(u_keys.contiguous(), (u_q - prune).contiguous(), side="left")
    i = torch.arange(Tk - Tq, Tk, device=u_q.device)
    return (i - j_min).clamp_min(0).float()
