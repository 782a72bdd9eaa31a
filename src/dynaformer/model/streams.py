"""Residual kinds that carry more than one (B, T, C) stream between sub-layers: the residual-stream relatives
the study compares the dynamic residual with.

    hyper         hyper-connections, dynamic (DHC)     Zhu et al., "Hyper-Connections", ICLR 2025, arXiv 2409.19606
    hyper_static  hyper-connections, static (SHC)      the same paper
    mhc           manifold-constrained HC              Xie et al. (DeepSeek), "mHC: Manifold-Constrained
                                                       Hyper-Connections", arXiv 2512.24880
    attnres       Attention Residuals, full form       Kimi Team, "Attention Residuals", arXiv 2603.15031

The stream between sub-layers is the state these kinds pass: n copies (B, T, n, C) for hyper-connections and
mHC; for AttnRes the embedding and every earlier sub-layer's output, stacked (B, T, k, C). Each kind's `Stream`
(residual.py) builds that state from the embeddings (`expand`) and reads one (B, T, C) from it for the final norm
(`reduce`). Every coefficient is computed from the token's own state, so the kinds are causal, need nothing from
the KV cache but the attention keys and values, and see a padded row as it is alone.

Each sub-layer (attention, MLP) is one layer of these papers: it owns its branch's pre-norm N, so F(N(·)) is the
branch. With H ∈ R^{n×C} the streams of one token (rows), A[s, t] weighs source stream s into output t:

    hyper-connections (per layer; H̄ = RMSNorm of each stream):
        a_pre = A_m + s_α·tanh(H̄ W_m),  A_r' = A_r + s_α·tanh(H̄ W_r),  b = B + s_β·tanh(H̄ W_β)
        h = Σ_s a_pre[s]·H_s,   H'_t = Σ_s A_r'[s, t]·H_s + b_t·F(N(h))
    Init (the paper's, §3 and Appendix A): A_m = e_{k mod n} for sub-layer k, A_r = I, B = 1, W = 0, s_α = s_β =
    0.01. Every stream then holds the pre-norm stream x and the final sum is n·x, which the final RMSNorm maps to
    N(x): the model starts as pre-norm, equal up to the final norm's ε. `hyper_static` has no dynamic terms.

    mHC (per layer; x̃ = RMSNorm of vec(H) ∈ R^{nC}, the paper's §4.2; with `mhc_per_stream`, of each stream alone
    as in HC, the form hyper-connections 0.4.11 computes):
        pre = σ(α_pre·x̃φ_pre + b_pre),  post = 2σ(α_post·x̃φ_post + b_post),
        A = Sinkhorn-Knopp(α_res·mat(x̃φ_res) + b_res, t_max rounds),
        h = Σ_s pre[s]·H_s,   H'_t = Σ_s A[s, t]·H_s + post_t·F(N(h))
    Sinkhorn-Knopp: exp, then alternately make each output stream's weights sum to 1 and each source stream's,
    t_max = 20 rounds (the paper's); the last step is exact, so Σ_t H'_t = Σ_s H_s + Σ_t post_t·F: the mixing
    neither adds nor loses signal. Init (HC's, as the reference code sets it): b_pre = e_{k mod n}, b_res = I,
    b_post = 1, φ = 0, α = 0.01. This is not pre-norm: streams stay equal (A is doubly stochastic) but each branch
    enters with weight post = 2σ(1) ≈ 1.46, and h = (σ(1) + (n−1)/2)·x, which the branch's norm removes.

    AttnRes, full form (v_0 = the embedding, v_i = the i-th sub-layer's output; w_l ∈ R^C a learned pseudo-query):
        h_l = Σ_{i<l} softmax_i(w_lᵀ RMSNorm(v_i))·v_i,   v_l = F(N(h_l)),   final = the same with its own w
    The keys' RMSNorm has no gain (a gain would only rescale w_l elementwise). w = 0 at init, so every layer reads
    the mean of v_0..v_{l-1}, which is the pre-norm stream x_l divided by l: the branch's norm sees N(x_l), and the
    model starts as pre-norm, equal up to the norms' ε. The block form (attention over block sums) saves memory at
    depth; at the study's 2-4 blocks the full form costs little, so it is the one here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .context import ForwardContext
from .layers import RMSNorm, gate_parameter, host_tensor


def sinkhorn_knopp(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """(…, n, n) logits → a doubly stochastic matrix: exp, then `iters` rounds of normalising over dim −2 (each
    column sums to 1) and then dim −1 (each row sums to 1, exactly at the end). The max over dim −2 is taken out
    first (no effect on the result, which the first column normalisation makes scale-free) so exp cannot
    overflow."""
    m = (logits - logits.amax(dim=-2, keepdim=True).detach()).exp()
    for _ in range(iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def _stack_sum(state: torch.Tensor) -> torch.Tensor:
    """(B, T, k, C) → (B, T, C): the single stream a standard residual would hold."""
    return state.sum(dim=-2)


class HyperStreams(nn.Module):
    """Hyper-connections' and mHC's stream: n copies of the embeddings in, their sum out (the paper's)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n = cfg.hc_streams

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-2).expand(*x.shape[:-1], self.n, x.shape[-1])

    def reduce(self, state: torch.Tensor) -> torch.Tensor:
        return _stack_sum(state)


class _MultiStream(nn.Module):
    """What hyper-connections and mHC share: the static mappings, the branch's norm, the width and depth
    connections, and the diagnostics. Subclasses give `mappings(H) -> (pre (…, n), mix (…, n, n), post (…, n))`."""

    additive, skip_scale = False, 1.0  # the diagnostics read `update_and_skip`

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        n = self.n = cfg.hc_streams
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)  # the branch's pre-norm
        pre = torch.zeros(n)
        pre[layer_idx % n] = 1.0  # A_m = e_{k mod n}
        self.static_pre = gate_parameter(pre)
        self.static_mix = gate_parameter(torch.eye(n))  # A_r = I, [source, output]
        self.static_post = gate_parameter(torch.ones(n))

    def mappings(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, h: torch.Tensor, branch, ctx: ForwardContext) -> torch.Tensor:
        """h: (B, T, n, C) → (B, T, n, C)."""
        pre, mix, post = self.mappings(h)
        pre, mix, post = pre.to(h.dtype), mix.to(h.dtype), post.to(h.dtype)
        x = torch.matmul(pre.unsqueeze(-2), h).squeeze(-2)  # (B, T, C): the branch's input
        y = branch(self.norm(x))
        mixed = torch.matmul(mix.transpose(-1, -2), h)  # (…, n, C): output t = Σ_s mix[s, t]·h_s
        return torch.addcmul(mixed, post.unsqueeze(-1), y.unsqueeze(-2))

    @staticmethod
    def update_and_skip(x: torch.Tensor, out: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the branch-to-stream ratio: the change of the streams' sum, against that sum."""
        skip = _stack_sum(x)
        return _stack_sum(out) - skip, skip

    def init_branch(self, branch: nn.Module) -> None:
        pass  # the default init stands


class HyperConnection(_MultiStream):
    """Hyper-connections (Zhu et al., ICLR 2025, arXiv 2409.19606): dynamic (`hyper`, DHC) or static
    (`hyper_static`, SHC). See the module docstring for the equations and the init."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, dynamic: bool = True) -> None:
        super().__init__(cfg, layer_idx)
        self.dynamic = dynamic
        if dynamic:
            n = self.n
            self.coef_norm = RMSNorm(cfg.d_model, cfg.norm_eps)  # H̄: each stream normed
            self.proj = gate_parameter(torch.zeros(cfg.d_model, n + 2))  # [W_m | W_r | W_β], zero at init
            self.alpha_scale = gate_parameter(torch.full((1,), 0.01))  # s_α, (1,) for FSDP2
            self.beta_scale = gate_parameter(torch.full((1,), 0.01))  # s_β

    def mappings(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not self.dynamic:
            return self.static_pre, self.static_mix, self.static_post
        n = self.n
        d = torch.tanh(torch.matmul(self.coef_norm(h), self.proj))  # (B, T, n, n+2): row s from stream s
        alpha = d[..., : n + 1] * self.alpha_scale
        pre = alpha[..., 0] + self.static_pre  # (B, T, n)
        mix = alpha[..., 1:] + self.static_mix  # (B, T, n, n)
        post = d[..., n + 1] * self.beta_scale + self.static_post  # (B, T, n)
        return pre, mix, post

    @torch.no_grad()
    def coefficients(self, progress: torch.Tensor | None = None) -> dict[str, float]:
        mix = host_tensor(self.static_mix)
        out = {"post_mean": float(host_tensor(self.static_post).mean()),
               "mix_offdiag": float((mix - torch.diag(torch.diagonal(mix))).abs().mean())}
        if self.dynamic:
            out["dyn_alpha"] = float(host_tensor(self.alpha_scale))
            out["dyn_beta"] = float(host_tensor(self.beta_scale))
        return out


class HyperStaticConnection(HyperConnection):
    """Static hyper-connections (SHC): the learned matrices alone, the same for every token."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx, dynamic=False)


class MHCConnection(_MultiStream):
    """Manifold-constrained hyper-connections (mHC; Xie et al., arXiv 2512.24880): H_pre = σ(·), H_post = 2σ(·),
    the residual mixing projected onto the doubly stochastic matrices by `mhc_sinkhorn_iters` rounds of
    Sinkhorn-Knopp. See the module docstring for the equations and the init (which is not pre-norm)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        n, C = self.n, cfg.d_model
        self.iters = cfg.mhc_sinkhorn_iters
        self.per_stream = cfg.mhc_per_stream
        if self.per_stream:  # each stream gives its own pre, mix row (as source) and post
            self.coef_norm = RMSNorm(C, cfg.norm_eps)
            self.proj = gate_parameter(torch.zeros(C, n + 2))  # [φ_pre | φ_res | φ_post]
        else:  # the paper: all n·C numbers of the token give all 2n + n² mappings
            self.coef_norm = RMSNorm(n * C, cfg.norm_eps)
            self.proj = gate_parameter(torch.zeros(n * C, 2 * n + n * n))  # [φ_pre | φ_post | φ_res]
        self.alpha_pre = gate_parameter(torch.full((1,), 0.01))
        self.alpha_res = gate_parameter(torch.full((1,), 0.01))
        self.alpha_post = gate_parameter(torch.full((1,), 0.01))

    def mappings(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        # In float32 whatever the autocast dtype: Sinkhorn divides by sums of exponentials.
        if self.per_stream:
            z = torch.matmul(self.coef_norm(h), self.proj).float()  # (B, T, n, n+2)
            pre_d, mix_d, post_d = z[..., 0], z[..., 1 : n + 1], z[..., n + 1]
        else:
            z = torch.matmul(self.coef_norm(h.flatten(-2)), self.proj).float()  # (B, T, 2n + n²)
            pre_d, post_d, mix_d = z[..., :n], z[..., n : 2 * n], z[..., 2 * n :].unflatten(-1, (n, n))
        pre = torch.sigmoid(self.alpha_pre.float() * pre_d + self.static_pre.float())
        post = 2 * torch.sigmoid(self.alpha_post.float() * post_d + self.static_post.float())
        mix = sinkhorn_knopp(self.alpha_res.float() * mix_d + self.static_mix.float(), self.iters)
        return pre, mix, post

    @torch.no_grad()
    def coefficients(self, progress: torch.Tensor | None = None) -> dict[str, float]:
        mix = sinkhorn_knopp(host_tensor(self.static_mix).float(), self.iters)
        return {"post_mean": float(2 * torch.sigmoid(host_tensor(self.static_post)).mean()),
                "mix_diag": float(torch.diagonal(mix).mean()),
                "dyn_alpha_res": float(host_tensor(self.alpha_res))}


def depth_attention(state: torch.Tensor, query: torch.Tensor, eps: float) -> torch.Tensor:
    """AttnRes' read of the depth stack: state (B, T, k, C), query (C,) → Σ_i softmax_i(qᵀ RMSNorm(v_i))·v_i."""
    keys = F.rms_norm(state, (state.shape[-1],), None, eps)
    weights = torch.matmul(keys, query.to(state.dtype)).softmax(dim=-1)  # (B, T, k)
    return torch.matmul(weights.unsqueeze(-2), state).squeeze(-2)


class DepthStack(nn.Module):
    """AttnRes' stream: the embeddings as v_0 in, the final pseudo-query's read of all outputs out."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.query = gate_parameter(torch.zeros(cfg.d_model))  # the output's pseudo-query, zero: the mean

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-2)

    def reduce(self, state: torch.Tensor) -> torch.Tensor:
        return depth_attention(state, self.query, self.eps)


class AttnResidual(nn.Module):
    """Attention Residuals, full form (Kimi Team, arXiv 2603.15031): the branch reads a softmax attention over
    the embedding and every earlier sub-layer's output, with a learned pseudo-query per sub-layer (zero at init:
    the mean, which the branch's norm makes the pre-norm input). See the module docstring."""

    additive, skip_scale = False, 1.0

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.query = gate_parameter(torch.zeros(cfg.d_model))  # w_l

    def forward(self, state: torch.Tensor, branch, ctx: ForwardContext) -> torch.Tensor:
        """state: (B, T, k, C) = v_0 … v_{k−1} → (B, T, k+1, C) with this sub-layer's output appended."""
        y = branch(self.norm(depth_attention(state, self.query, self.eps)))
        return torch.cat([state, y.unsqueeze(-2)], dim=-2)

    @staticmethod
    def update_and_skip(x: torch.Tensor, out: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the branch-to-stream ratio: the new output against the sum of the earlier ones."""
        return out[..., -1, :], _stack_sum(x)

    @torch.no_grad()
    def coefficients(self, progress: torch.Tensor | None = None) -> dict[str, float]:
        return {"query_norm": float(host_tensor(self.query).norm())}

    def init_branch(self, branch: nn.Module) -> None:
        pass  # the default init stands
