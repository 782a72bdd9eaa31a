"""Residual connections around each sub-layer (attention or MLP).

A residual module owns the sub-layer's norm, so kinds that normalise before the branch (pre-norm)
and after the sum (post-norm) share one interface: `forward(x, branch, ctx) -> new stream`.

Kinds (`ModelConfig.residual`), with F the branch and N an RMSNorm:

    prenorm     x ← x + F(N(x))                                   Xiong et al. 2020
    postnorm    x ← N(x + F(x))                                   Vaswani et al. 2017
    rezero      x ← x + α·F(x),            α = 0 at init          Bachlechner et al. 2020
    layerscale  x ← x + diag(λ)·F(N(x)),   λ = ε (CaiT depth rule) Touvron et al. 2021 (CaiT)
    deepnorm    x ← N(α·x + F(x)),         α = (2L)^¼, branch init gain β = (8L)^-¼   Wang et al. 2022
    dynamic     x ← x + c·s(τ)·m(p, x)·F(N(x))                    this project (docs/design.md §3)
    hyper, hyper_static, mhc, attnres: n streams or a stack of earlier outputs (model/streams.py, cited there)

Kinds whose stream is more than one (B, T, C) tensor also have a `Stream` (`STREAMS`, `make_stream`): the model
expands the embeddings into that state and reduces it before the final norm; for the others nothing changes.

Every kind offers what `Residual` writes down and is listed in `RESIDUALS` (its name is also a `ResidualKind`
of the config): it reports its learned coefficients through `coefficients(progress)` (floats, for
metrics.jsonl; {} for kinds that learn none; progress τ is used by the kinds whose coefficients depend on it),
which `residual_stats(model)` gathers over all sub-layers; `additive` tells diagnostics whether the new stream
is `x + update` (so update = output − input) or a normalised sum; `skip_scale` is the weight on the skip path;
`init_branch` rescales the branch's initial weights (DeepNorm's β; a no-op for the other kinds).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import decode_dyn_residual
from .config import ModelConfig
from .context import ForwardContext
from .layers import RMSNorm
from .layers import gate_parameter as _gate
from .layers import host_tensor as _host
from .streams import (
    AttnResidual,
    DepthStack,
    HyperConnection,
    HyperStaticConnection,
    HyperStreams,
    MHCConnection,
)

Branch = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class Residual(Protocol):
    """What a residual kind offers the block (the new stream), the initialisation, the diagnostics and the
    metrics."""

    additive: bool  # the new stream is x + update (update = output − input), else a normalised sum
    skip_scale: float  # the weight on the skip path

    def __call__(self, x: torch.Tensor, branch: Branch, ctx: ForwardContext) -> torch.Tensor:
        """The new stream from x (B, T, C) and the sub-layer `branch`; the module owns the sub-layer's norm."""
        ...

    def coefficients(self, progress: torch.Tensor | None = None) -> dict[str, float]:
        """The learned coefficients as floats ({} for kinds that learn none)."""
        ...

    def init_branch(self, branch: nn.Module) -> None:
        """Called by Transformer.reset_parameters after the default init of the branch's weights."""
        ...


class PreNormResidual(nn.Module):
    """x ← x + F(N(x)): the pre-norm transformer (Xiong et al. 2020, "On Layer Normalization in the
    Transformer Architecture"); the skip path is the identity, so gradients reach every layer."""

    additive, skip_scale = True, 1.0

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, branch: Branch, ctx: ForwardContext) -> torch.Tensor:
        return x + branch(self.norm(x))

    def coefficients(self, progress: torch.Tensor | None = None) -> dict[str, float]:
        return {}

    def init_branch(self, branch: nn.Module) -> None:
        pass  # the default init stands


class PostNormResidual(nn.Module):
    """x ← N(x + F(x)): the original transformer (Vaswani et al. 2017). The norm sits on the skip
    path, so gradients to early layers shrink with depth; it needs learning-rate warm-up."""

    additive, skip_scale = False, 1.0

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, x: torch.Tensor, branch: Branch, ctx: ForwardContext) -> torch.Tensor:
        return self.norm(x + branch(x))

    def coefficients(self, progress: torch.Tensor | None = None) -> dict[str, float]:
        return {}

    def init_branch(self, branch: nn.Module) -> None:
        pass  # the default init stands


class DeepNormResidual(PostNormResidual):
    """x ← N(α·x + F(x)) with α = (2L)^¼ and the branch's value, output and MLP weights initialised with
    gain β = (8L)^-¼ (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers", decoder-only
    constants; L = `cfg.depth`). Up-weighting the skip bounds each update, so post-norm trains deep."""

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.skip_scale = (2 * cfg.depth) ** 0.25
        self.init_gain = (8 * cfg.depth) ** -0.25
        self.gpt2_scale = 1.0 / math.sqrt(2 * cfg.n_layer)  # what Transformer.reset_parameters gave branch outputs

    def forward(self, x: torch.Tensor, branch: Branch, ctx: ForwardContext) -> torch.Tensor:
        return self.norm(torch.add(branch(x), x, alpha=self.skip_scale))

    @torch.no_grad()
    def init_branch(self, branch: nn.Module) -> None:
        """Called by Transformer.reset_parameters after the default init: scale by β the value part of the
        fused QKV (DeepNet keeps q, k at gain 1), the attention output and both MLP matrices; the
        output matrices get β in place of GPT-2's 1/√(2·n_layer)."""
        for name, p in branch.named_parameters():
            if p.dim() < 2 or getattr(p, "keep_init", False):
                continue
            if name == "qkv.weight":
                p[2 * p.shape[0] // 3 :].mul_(self.init_gain)
            elif name in ("proj.weight", "down.weight"):
                p.mul_(self.init_gain / self.gpt2_scale)
            else:
                p.mul_(self.init_gain)


class ReZeroResidual(nn.Module):
    """x ← x + α·F(x), α = 0 (Bachlechner et al. 2020, "ReZero is All You Need", arXiv 2003.04887): no norm,
    each sub-layer starts as the identity and learns how much to add."""

    additive, skip_scale = True, 1.0

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.alpha = _gate(torch.zeros(1))  # (1,), not 0-d: FSDP2 cannot shard scalar parameters

    def forward(self, x: torch.Tensor, branch: Branch, ctx: ForwardContext) -> torch.Tensor:
        return torch.addcmul(x, branch(x), self.alpha)

    @torch.no_grad()
    def coefficients(self, progress: torch.Tensor | None = None) -> dict[str, float]:
        return {"alpha": float(_host(self.alpha))}

    def init_branch(self, branch: nn.Module) -> None:
        pass  # the default init stands


def cait_layerscale_init(depth: int) -> float:
    """CaiT's ε by depth (Touvron et al. 2021, "Going deeper with Image Transformers", §2):
    0.1 up to 18 blocks, 1e-5 up to 24, 1e-6 beyond."""
    return 0.1 if depth <= 18 else 1e-5 if depth <= 24 else 1e-6


class LayerScaleResidual(nn.Module):
    """x ← x + diag(λ)·F(N(x)), λ ∈ R^d initialised to a small ε (LayerScale, CaiT)."""

    additive, skip_scale = True, 1.0

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        eps = cfg.layerscale_init if cfg.layerscale_init is not None else cait_layerscale_init(cfg.depth)
        self.scale = _gate(torch.full((cfg.d_model,), eps))

    def forward(self, x: torch.Tensor, branch: Branch, ctx: ForwardContext) -> torch.Tensor:
        return torch.addcmul(x, branch(self.norm(x)), self.scale)

    @torch.no_grad()
    def coefficients(self, progress: torch.Tensor | None = None) -> dict[str, float]:
        scale = _host(self.scale)
        return {"scale_mean": float(scale.mean()), "scale_absmax": float(scale.abs().max())}

    def init_branch(self, branch: nn.Module) -> None:
        pass  # the default init stands


class _Frozen(NamedTuple):
    """DynamicResidual's inference tables (no autograd), valid while `key` (the in-place versions of τ and of
    each gate) is unchanged; the weight of a token at position p is `base[p] + tanh(N(x) wᵀ) γ'`."""

    key: list[int]
    size: int  # positions covered: 0 .. size-1
    base: torch.Tensor  # (size, 1) c·s(τ)·(1 + β·φ(p)), in h's dtype
    base_list: list[float]  # the same as Python floats (addmm's beta when decoding one token)
    gamma_t: torch.Tensor | None  # (k, 1) γ' = c·s(τ)·γ; None without the content term
    w_t: torch.Tensor | None  # (C, k) wᵀ
    one: torch.Tensor | None  # (1, 1) a one, addmm's bias


class DynamicResidual(nn.Module):
    """Dynamic residual weighting (docs/design.md §3), pre-norm with a per-token weight on the branch:

        x ← x + c · s(τ) · m(p, x) · F(N(x))
        c·s(τ) = 1 + g + a·τ + b·τ²                    learned gain g (dyn_gain), schedule a, b (dyn_step),
                                                       τ = training progress (a buffer)
        m      = 1 + β·φ(p) + Σ_j γ_j·tanh(w_jᵀ N(x))  φ(p) = log((p+1)/P0)  (dyn_position, dyn_content)

    c·s(τ) is the product (1 + g)·(1 + a'·τ + b'·τ²) parametrised linearly: the same family of
    quadratic schedules, in fewer ops.

    p is the token's absolute position (its own prefix length: ctx.start + t), never the sequence
    length or a statistic over positions or the batch, so a token's weight does not change as the
    sequence grows and the KV cache stays valid. In encoder mode (ctx.causal false: no cache, every token
    sees the whole input) p + 1 is the example's sequence length instead: its number of real tokens
    (padding excluded), the same for all its tokens. g = a = b = β = 0 and w = 0 at init, so the weight is
    exactly 1 and the block is exactly pre-norm (γ starts at `dyn_gamma_init` so that w has a
    gradient; γ·tanh(0) is still 0). The skip path stays at 1.

    Cost: c·s(τ) is folded into the position term and into γ, so the weight is
    `base[p] + tanh(N(x) wᵀ)·γ'` — one scalar per token; the only (B, T, C)-sized work added to
    pre-norm is the d→k projection (k = dyn_rank ≤ 8) and folding the weight into the residual add
    (`addcmul`). Without grad (generation, evaluation) base and γ' are cached per parameter version
    and τ; a compiled decoding step (ctx.decoding) does the whole update in one call where pre-norm adds,
    so the weight costs decoding nothing measurable (the tensor-op path adds four small ops per sub-layer).
    """

    additive, skip_scale = True, 1.0

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        powers = ([0.0] if cfg.dyn_gain else []) + ([1.0, 2.0] if cfg.dyn_step else [])
        self.scale_names = (["gain"] if cfg.dyn_gain else []) + (["step_a", "step_b"] if cfg.dyn_step else [])
        self.scale_coef = _gate(torch.zeros(len(powers))) if powers else None  # (g, a, b) or a subset
        # τ^0, τ^1, τ^2 — a cached tensor, not a buffer: HF transformers re-initialises every module that holds a
        # non-persistent buffer after loading (hf/modeling.py), which would reset the gates.
        self.scale_powers, self._powers_t = powers, None
        self.pos_coef = _gate(torch.zeros(1)) if cfg.dyn_position else None  # β, (1,) for FSDP2
        if cfg.dyn_content:
            self.content_proj = _gate(torch.zeros(cfg.dyn_rank, cfg.d_model))  # w: (k, C)
            self.content_coef = _gate(torch.full((1, cfg.dyn_rank), cfg.dyn_gamma_init))  # γ: (1, k)
        else:
            self.content_proj = self.content_coef = None
        self._gates = [p for p in (self.scale_coef, self.pos_coef, self.content_coef, self.content_proj)
                       if p is not None]
        self.enabled = bool(self._gates)
        self.log_p0 = math.log(cfg.position_p0)
        self._phi: torch.Tensor | None = None  # (N, 1) φ(p), grown on demand (like Rotary's table)
        self._frozen: _Frozen | None = None  # inference tables, see _freeze

    def phi(self, end: int, device: torch.device) -> torch.Tensor:
        """(≥ end, 1) table of φ(p) = log((p+1)/P0), p = 0, 1, ..."""
        if self._phi is None or self._phi.shape[0] < end or self._phi.device != device:
            n = max(end, 2 * (0 if self._phi is None else self._phi.shape[0]), 256)
            p = torch.arange(n, device=device, dtype=torch.float64)
            self._phi = (torch.log1p(p) - self.log_p0).float().unsqueeze(-1)
        return self._phi

    def encoder_phi(self, ctx: ForwardContext, device: torch.device) -> torch.Tensor:
        """(B|1, 1, 1) φ = log(L/P0) with L each example's number of real tokens (encoder mode)."""
        if ctx.key_padding_mask is None:
            L = torch.full((1, 1, 1), float(ctx.length), device=device, dtype=torch.float64)
        else:
            L = ctx.key_padding_mask.sum(-1).to(device=device, dtype=torch.float64).clamp_min(1).view(-1, 1, 1)
        return (L.log() - self.log_p0).float()

    def scale(self, progress: torch.Tensor) -> torch.Tensor | None:
        """c · s(τ): a 0-d tensor, or None when both factors are off."""
        if self.scale_coef is None:
            return None
        powers = self._powers_t
        if powers is None or powers.device != progress.device:
            powers = self._powers_t = torch.tensor(self.scale_powers, device=progress.device)
        return 1 + torch.dot(self.scale_coef, progress.pow(powers).to(self.scale_coef.dtype))

    def folded(self, progress: torch.Tensor, phi: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The weight as `base + tanh(N(x) wᵀ) @ γ'ᵀ`: base = c·s(τ)·(1 + β·φ) over phi's positions (or a 0-d
        c·s(τ), or None for 1), γ' = c·s(τ)·γ as (1, k) (None without the content term)."""
        scale = self.scale(progress)
        base = scale
        if self.pos_coef is not None:
            base = 1 + self.pos_coef * phi if scale is None else torch.addcmul(scale, scale * self.pos_coef, phi)
        gamma = None
        if self.content_coef is not None:
            gamma = self.content_coef if scale is None else self.content_coef * scale
        return base, gamma

    def _apply(self, fn, *args, **kwargs):
        """.to(), .double(), .cuda(), ... replace parameter storage: drop the cached tables."""
        self._frozen = self._phi = self._powers_t = None
        return super()._apply(fn, *args, **kwargs)

    def _freeze(self, key: list, progress: torch.Tensor, end: int, device: torch.device, dtype: torch.dtype
                ) -> _Frozen:
        """Build the inference tables (see `_Frozen`) in h's dtype, covering at least positions 0 .. end-1."""
        phi = self.phi(end, device)
        base, gamma = self.folded(progress, phi)
        base = (torch.ones_like(phi) * (1 if base is None else base)).detach()  # always an (N, 1) table
        gamma_t = w_t = one = None
        if gamma is not None:
            gamma_t = gamma.detach().t().contiguous().to(dtype)
            w_t = self.content_proj.detach().t().contiguous().to(dtype)
            one = torch.ones(1, 1, device=device, dtype=dtype)
        self._frozen = _Frozen(key, phi.shape[0], base.to(dtype), base[:, 0].tolist(), gamma_t, w_t, one)
        return self._frozen

    def _tables(self, ctx: ForwardContext, h: torch.Tensor) -> _Frozen:
        """The inference tables covering this call's positions, rebuilt when τ or a gate changed in place."""
        key = [ctx.progress._version]
        for p in self._gates:
            key.append(p._version)
        f = self._frozen
        if f is None or f.key != key or f.size < ctx.start + ctx.length:
            f = self._freeze(key, ctx.progress, ctx.start + ctx.length, h.device, h.dtype)
        return f

    def inference_multiplier(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """multiplier() without autograd, in the fewest ops (decoding is dominated by per-op overhead).
        base (N, 1), γ' and wᵀ are cached; the cache key holds the in-place version of τ and of each gate,
        so it follows optimizer steps, load_state_dict and in-place edits; _apply (.to() etc.) drops it."""
        if not ctx.causal:  # per-example lengths: nothing to cache across calls
            return self.multiplier(h, ctx)
        start, end = ctx.start, ctx.start + ctx.length
        f = self._tables(ctx, h)
        if ctx.pos is not None:  # a padded batch: each row's own positions (all < end)
            base = f.base[ctx.pos]  # (B, T, 1)
            if f.w_t is None:
                return base
            return torch.matmul(torch.matmul(h, f.w_t).tanh_(), f.gamma_t).add_(base)
        if f.w_t is None:
            return f.base[start:end]  # (T, 1)
        if end - start == 1:  # decoding: mm, tanh, and one addmm that also adds base[p] (as addmm's beta)
            B = h.shape[0]
            z = torch.mm(h.view(B, -1), f.w_t).tanh_()  # (B, k)
            return torch.addmm(f.one, z, f.gamma_t, beta=f.base_list[start]).view(B, 1, 1)
        z = torch.matmul(h, f.w_t).tanh_()  # (B, T, k)
        return torch.matmul(z, f.gamma_t).add_(f.base[start:end])  # (B, T, 1)

    def multiplier(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | None:
        """The weight on the branch for each token, broadcastable to h (B, T, C): (B, T, 1), (T, 1), () or
        None (weight 1). h = N(x)."""
        start, T = ctx.start, ctx.length
        end = start + T
        phi = None
        if self.pos_coef is not None and not ctx.causal:
            phi = self.encoder_phi(ctx, h.device)
        elif self.pos_coef is not None:  # (T, 1), or (B, T, 1) at a padded batch's per-row positions
            table = self.phi(end, h.device)
            phi = table[start:end] if ctx.pos is None else table[ctx.pos]
        base, gamma = self.folded(ctx.progress, phi)
        if gamma is None:
            return base
        m = F.linear(torch.tanh(F.linear(h, self.content_proj)), gamma)  # (B, T, 1)
        return m + (1 if base is None else base)

    def forward(self, x: torch.Tensor, branch: Branch, ctx: ForwardContext) -> torch.Tensor:
        h = self.norm(x)
        if not self.enabled:
            return x + branch(h)
        if ctx.decoding and ctx.pos is None:  # the update in one compiled call (rows at one position)
            f = self._tables(ctx, h)
            return decode_dyn_residual(x, branch(h), h, f.w_t, f.gamma_t, f.base_list[ctx.start])
        m = self.multiplier(h, ctx) if torch.is_grad_enabled() else self.inference_multiplier(h, ctx)
        if m is None:
            return x + branch(h)
        return torch.addcmul(x, branch(h), m)

    @torch.no_grad()
    def coefficients(self, progress: torch.Tensor | None = None) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.scale_coef is not None:
            coef = _host(self.scale_coef)
            out.update(zip(self.scale_names, coef.tolist(), strict=True))
            if progress is not None:  # c·s(τ) at the current τ
                powers = torch.tensor(self.scale_powers, dtype=coef.dtype, device=coef.device)
                out["scale"] = 1 + float(torch.dot(coef, progress.to(coef).pow(powers)))
        if self.pos_coef is not None:
            out["beta"] = float(_host(self.pos_coef))
        if self.content_proj is not None:
            out["gamma_norm"] = float(_host(self.content_coef.norm()))
            out["w_norm"] = float(_host(self.content_proj.norm()))
        return out

    def init_branch(self, branch: nn.Module) -> None:
        pass  # the default init stands


@runtime_checkable
class Stream(Protocol):
    """What a residual kind that carries more than one (B, T, C) stream between sub-layers (model/streams.py)
    offers the model: the state its residual modules pass, built from the embeddings, and the (B, T, C) read
    from it that the final norm takes (and transformers' `hidden_states` show). Kinds without one pass x itself."""

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """The embeddings (B, T, C) → the state the first sub-layer receives."""
        ...

    def reduce(self, state: torch.Tensor) -> torch.Tensor:
        """The state after a sub-layer → (B, T, C)."""
        ...


RESIDUALS: dict[str, type[Residual]] = {
    "prenorm": PreNormResidual,
    "postnorm": PostNormResidual,
    "rezero": ReZeroResidual,
    "layerscale": LayerScaleResidual,
    "deepnorm": DeepNormResidual,
    "dynamic": DynamicResidual,
    "hyper": HyperConnection,
    "hyper_static": HyperStaticConnection,
    "mhc": MHCConnection,
    "attnres": AttnResidual,
}
# The kinds whose stream is not one (B, T, C) tensor, and the module that expands and reduces it.
STREAMS: dict[str, type[Stream]] = {
    "hyper": HyperStreams,
    "hyper_static": HyperStreams,
    "mhc": HyperStreams,
    "attnres": DepthStack,
}


def make_residual(cfg: ModelConfig, layer_idx: int) -> Residual:
    """One residual module for sub-layer `layer_idx` (0 .. 2·n_layer-1: attention, MLP, attention, ...)."""
    return RESIDUALS[cfg.residual](cfg, layer_idx)


def make_stream(cfg: ModelConfig) -> Stream | None:
    """The model's `Stream` for kinds that carry more than x between sub-layers; None for the others."""
    kind = STREAMS.get(cfg.residual)
    return None if kind is None else kind(cfg)


def residual_modules(model: nn.Module) -> list[Residual]:
    """The residual modules of a model in sub-layer order (attention, MLP, attention, ...)."""
    return [m for m in model.modules() if isinstance(m, tuple(RESIDUALS.values()))]


@torch.no_grad()
def residual_stats(model: nn.Module) -> dict[str, list[float]]:
    """Learned residual coefficients, one list per coefficient over sub-layers, keys prefixed `res_`
    (e.g. res_gain, res_beta, res_alpha); {} for kinds that learn none. Cheap: call at log steps."""
    progress = getattr(model, "progress", None)
    out: dict[str, list[float]] = {}
    for mod in residual_modules(model):
        for k, v in mod.coefficients(progress).items():
            out.setdefault(f"res_{k}", []).append(v)
    return out
