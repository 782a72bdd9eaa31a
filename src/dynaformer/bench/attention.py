"""`dynaformer bench attention`: span attention versus dense causal SDPA, forward + backward, side by side.

Gradients flow to q, k, v and (for learned kinds) to the spans. `speedup` = dense_ms / span_ms. The FLOP
figures count query·key pairs: `needed_pairs` are those with m > 0 (the floor any exact kernel must
touch), `computed_pairs` those the band kernel computes, `dense_pairs` the causal triangle."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..kernels import (
    SPAN_IMPLS,
    band_flops,
    band_span_attention,
    keys_reached,
    span_attention,
    symmetric_span_attention,
)
from ..kernels.fox import augment, pruned_spans
from ..kernels.plan import uses_native
from ..kernels.sink import sink_window_attention
from ..model import ModelConfig, Transformer
from ..model.span_stats import span_stats
from .common import time_interleaved


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq", type=int, default=4096, help="sequence length T")
    p.add_argument("--span", type=int, default=256, help="span z in tokens (the ramp R comes on top)")
    p.add_argument("--ramp", type=float, default=32.0)
    p.add_argument("--kind", choices=["per_head", "dynamic", "fixed", "fox", "sink_window"], default="dynamic",
                   help="per_head: z_h = span; dynamic: z_{t,h} ~ span·U(0.75, 1), a different span per "
                        "token and head; fixed: a hard window of `span` keys (no span gradient); fox: forget "
                        "gates decaying --fox_prune nats over about `span` tokens, pruned, against its unpruned "
                        "form and a dynamic span of the same reach; sink_window: a window of `span` keys plus "
                        "--sinks first tokens with learned sink logits, against the plain window")
    p.add_argument("--fox_prune", type=float, default=16.0, help="fox: the pruning threshold θ in nats")
    p.add_argument("--sinks", type=int, default=4, help="sink_window: the number of sink tokens")
    p.add_argument("--long_heads", type=int, default=0,
                   help="per_head: this many heads get a span covering the whole sequence (the rest --span)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--impl", default="auto", choices=SPAN_IMPLS, help="the span kernel (kernels/plan.py)")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--recompute", action="store_true",
                   help="band kernel: keep only the log-sum-exp and recompute P in the backward (the mode "
                        "large calls switch to automatically)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_backward", action="store_true", help="time the forward pass only")
    p.add_argument("--encoder", action="store_true",
                   help="bidirectional: symmetric spans (the ramp on both sides) versus dense bidirectional SDPA")
    p.add_argument("--contention", action="store_true",
                   help="measure twice: on the machine as it is, then with one busy competing process (a pure "
                        "Python spin loop, one core); report both speedups and loaded/idle")
    p.add_argument("--model", action="store_true",
                   help="time a whole training step instead (4 layers, 256 wide, 8 heads, seq T, batch 1, AdamW): "
                        "dense versus dynamic spans ≤ --span (span_max = span − ramp)")


def span_model_config(seq: int, span: int, ramp: int = 32, kind: str = "dynamic", n_layer: int = 4,
                      d_model: int = 256, n_head: int = 8) -> tuple[ModelConfig, ModelConfig]:
    """(dense, span) configs of the benchmark model: the span model's reach z + R stays ≤ `span`; learned spans
    start at 7/8 of their maximum."""
    base = dict(n_layer=n_layer, d_model=d_model, n_head=n_head, context_len=seq)
    s_max = span - ramp
    return ModelConfig(**base), ModelConfig(**base, span=kind, span_max=s_max, span_ramp=ramp,
                                            span_init=0.875 * s_max, span_window=span)


@contextlib.contextmanager
def busy_process() -> Iterator[None]:
    """One competing process spinning on a core for the duration (what a shared machine does to a job)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it reach the scheduler's steady state
        yield
    finally:
        proc.kill()
        proc.wait()


def measure(fns: dict, repeats: int, contention: bool, warmup: int = 2) -> tuple[dict, dict | None]:
    """Interleaved median times of fns; with `contention`, again under one busy competing process."""
    idle = time_interleaved(fns, repeats, warmup=warmup)
    if not contention:
        return idle, None
    with busy_process():
        return idle, time_interleaved(fns, repeats, warmup=1)


def contention_fields(idle: dict, loaded: dict | None, fast: str = "span", base: str = "dense") -> dict:
    """Speedup of `fast` over `base` idle and under load, each variant's slowdown, and loaded/idle speedup."""
    if loaded is None:
        return {}
    s_idle, s_loaded = idle[base] / idle[fast], loaded[base] / loaded[fast]
    return {f"loaded_{base}_ms": round(1000 * loaded[base], 1), f"loaded_{fast}_ms": round(1000 * loaded[fast], 1),
            f"{base}_slowdown": round(loaded[base] / idle[base], 2),
            f"{fast}_slowdown": round(loaded[fast] / idle[fast], 2),
            "loaded_speedup": round(s_loaded, 3), "loaded_over_idle": round(s_loaded / s_idle, 3)}


def run_model(args: argparse.Namespace) -> Iterator[dict]:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (args.batch, args.seq))
    fns, models = {}, {}
    for name, cfg in zip(("dense", "span"), span_model_config(args.seq, args.span, int(args.ramp)), strict=True):
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        models[name] = model

        def step(model=model, opt=opt):
            _, loss = model(x, x)
            (loss + model.aux_loss()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = step
    times, loaded = measure(fns, args.repeats, args.contention, warmup=1)
    stats = span_stats(models["span"])
    yield {"bench": "attention_model_step", "seq": args.seq, "span": args.span, "batch": args.batch,
           "params": models["dense"].num_params(), "threads": torch.get_num_threads(),
           "dense_step_ms": round(1000 * times["dense"], 1), "span_step_ms": round(1000 * times["span"], 1),
           "step_speedup": round(times["dense"] / times["span"], 3),
           "mean_span": round(sum(sum(r) for r in stats["span_mean"]) / sum(len(r) for r in stats["span_mean"]), 1),
           "attn_pairs_frac": stats.get("attn_pairs_frac"), **contention_fields(times, loaded)}


def run_relative(args: argparse.Namespace) -> Iterator[dict]:
    """fox: pruned (the span kernels over the kept keys) vs unpruned (dense SDPA over the augmented q, k) vs a
    dynamic span of the same reach vs dense SDPA; sink_window: sinks + window (band kernel and merged sinks)
    vs the plain hard window vs dense SDPA. Forward + backward, gradients to the gates / sink logits too."""
    torch.manual_seed(0)
    B, H, T, D = args.batch, args.heads, args.seq, args.head_dim
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    backward = not args.no_backward
    q, k, v = (torch.randn(B, H, T, D, dtype=dtype, requires_grad=backward) for _ in range(3))
    go = torch.randn(B, H, T, D, dtype=dtype)
    pos = torch.arange(T)[None]

    def timed(fn):
        def call():
            out = fn()
            if backward:
                out.backward(go)
        return call

    fns = {"dense": timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))}
    if args.kind == "fox":  # −log f ≈ θ/span per token (× U(0.75, 1.25)): the pruned reach is about `span`
        step = (args.fox_prune / args.span) * (0.75 + 0.5 * torch.rand(B, H, T))
        logf = (-step).requires_grad_(backward)
        z_dyn = (args.span * (0.75 + 0.25 * torch.rand(B, H, T))).requires_grad_(backward)

        def fox(prune: float):
            u = -logf.cumsum(-1)
            qa, ka, va = augment(q, k, v, u)
            z = pruned_spans(u.detach(), u.detach(), prune) if prune > 0 else torch.full((1, H, 1), 2.0**30)
            return span_attention(qa, ka, va, z, 1.0, True, impl=args.impl, chunk=args.chunk)[..., :D]

        fns |= {"fox_unpruned": timed(lambda: fox(0.0)), "fox_pruned": timed(lambda: fox(args.fox_prune)),
                "dynamic_span": timed(lambda: span_attention(q, k, v, z_dyn, args.ramp, impl=args.impl,
                                                             chunk=args.chunk))}
        with torch.no_grad():
            u = -logf.cumsum(-1)
            zf = pruned_spans(u, u, args.fox_prune)
        pairs = {"fox_pruned": band_flops(zf, T, T, 1.0, True, chunk=args.chunk, dtype=dtype)[0],
                 "dynamic_span": band_flops(z_dyn.detach(), T, T, args.ramp, False, chunk=args.chunk,
                                            dtype=dtype)[0]}
        base = "fox_unpruned"
    else:
        logit = torch.zeros(H, requires_grad=backward)
        n, W = args.sinks, args.span
        fns |= {"sink_window": timed(lambda: sink_window_attention(q, k, v, pos, pos, W, n, logit, impl=args.impl,
                                                                   chunk=args.chunk)),
                "window": timed(lambda: span_attention(q, k, v, torch.full((1, H, 1), W - 1.0), 1.0, True,
                                                       impl=args.impl, chunk=args.chunk))}
        zw = torch.full((B, H, T), W - 1.0)
        pairs = {"window": band_flops(zw, T, T, 1.0, True, chunk=args.chunk, dtype=dtype)[0]}
        pairs["sink_window"] = pairs["window"] + B * H * T * n
        base = "window"
    times, _ = measure(fns, args.repeats, False)
    dense_pairs = B * H * T * (T + 1) // 2
    yield {"bench": "attention_relative", "kind": args.kind, "seq": T, "span": args.span, "batch": B, "heads": H,
           "head_dim": D, "dtype": args.dtype, "backward": backward, "impl": args.impl, "chunk": args.chunk,
           "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
           **({"fox_prune": args.fox_prune} if args.kind == "fox" else {"sinks": args.sinks}),
           **{f"{name}_ms": round(1000 * t, 2) for name, t in times.items()},
           **{f"{name}_over_{base}": round(times[name] / times[base], 3) for name in times if name != base},
           "dense_pairs": dense_pairs, **{f"{name}_pairs_frac": round(c / dense_pairs, 4) for name, c in pairs.items()},
           "kernel": "compiled" if uses_native(dtype) else "python"}


def run(args: argparse.Namespace) -> Iterator[dict]:
    if args.model:
        yield from run_model(args)
        return
    if args.kind in ("fox", "sink_window"):
        yield from run_relative(args)
        return
    torch.manual_seed(0)
    B, H, T, D = args.batch, args.heads, args.seq, args.head_dim
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    backward = not args.no_backward
    q, k, v = (torch.randn(B, H, T, D, dtype=dtype, requires_grad=backward) for _ in range(3))
    hard = args.kind == "fixed"
    if args.kind == "dynamic":
        z = args.span * (0.75 + 0.25 * torch.rand(B, H, T))
    elif args.kind == "per_head":
        z = torch.full((1, H, 1), float(args.span))
        z[:, : args.long_heads] = float(T)
    else:
        z = torch.full((1, H, 1), float(args.span - 1))  # window of `span` keys: d ≤ span − 1
    z.requires_grad_(backward and not hard)
    go = torch.randn(B, H, T, D, dtype=dtype)

    def dense():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=not args.encoder)
        if backward:
            out.backward(go)

    def span():
        if args.encoder:
            out = symmetric_span_attention(q, k, v, z, args.ramp, hard, impl=args.impl, chunk=args.chunk)
        elif args.recompute:
            out = band_span_attention(q, k, v, z, args.ramp, hard, chunk=args.chunk, keep_scores=False)
        else:
            out = span_attention(q, k, v, z, args.ramp, hard=hard, impl=args.impl, chunk=args.chunk)
        if backward:
            out.backward(go)

    times, loaded = measure({"dense": dense, "span": span}, args.repeats, args.contention)
    if args.encoder:
        yield {"bench": "attention_encoder", "kind": args.kind, "seq": T, "span": args.span, "ramp": args.ramp,
               "batch": B, "heads": H, "head_dim": D, "dtype": args.dtype, "backward": backward,
               "impl": args.impl, "chunk": args.chunk, "threads": torch.get_num_threads(),
               "dense_ms": round(1000 * times["dense"], 2), "span_ms": round(1000 * times["span"], 2),
               "speedup": round(times["dense"] / times["span"], 3), **contention_fields(times, loaded)}
        return
    computed, dense_pairs = band_flops(z.expand(B, H, T), T, T, args.ramp, hard, chunk=args.chunk, dtype=dtype)
    zz = z.detach().expand(B, H, T)
    reach = keys_reached(zz, args.ramp, hard)
    needed = int(torch.minimum(reach, torch.arange(1, T + 1).float()).sum())
    yield {"bench": "attention", "kind": args.kind, "seq": T, "span": args.span, "long_heads": args.long_heads,
           "ramp": args.ramp, "batch": B,
           "heads": H, "head_dim": D, "dtype": args.dtype, "backward": backward, "span_grad": bool(z.requires_grad),
           "impl": "band (recompute)" if args.recompute else args.impl, "chunk": args.chunk,
           "threads": torch.get_num_threads(),
           "dense_ms": round(1000 * times["dense"], 2), "span_ms": round(1000 * times["span"], 2),
           "speedup": round(times["dense"] / times["span"], 3),
           "dense_pairs": dense_pairs, "computed_pairs": computed, "needed_pairs": needed,
           "floor_speedup": round(dense_pairs / needed, 2), "band_pair_speedup": round(dense_pairs / computed, 2),
           "kernel": "compiled" if uses_native(dtype) else "python", **contention_fields(times, loaded)}
