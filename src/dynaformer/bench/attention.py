"""`dynaformer bench attention`: span attention versus dense causal SDPA, forward + backward, side by side.

Gradients flow to q, k, v and (for learned kinds) to the spans. `speedup` = dense_ms / span_ms. The FLOP
figures count query·key pairs: `needed_pairs` are those with m > 0 (the floor any exact kernel must
touch), `computed_pairs` those the band kernel computes, `dense_pairs` the causal triangle."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..kernels.span import band_flops, span_attention
from .common import time_interleaved


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq", type=int, default=4096, help="sequence length T")
    p.add_argument("--span", type=int, default=256, help="span z in tokens (the ramp R comes on top)")
    p.add_argument("--ramp", type=float, default=32.0)
    p.add_argument("--kind", choices=["per_head", "dynamic", "fixed"], default="dynamic",
                   help="per_head: z_h = span; dynamic: z_{t,h} ~ span·U(0.75, 1), a different span per "
                        "token and head; fixed: a hard window of `span` keys (no span gradient)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--impl", default="auto", help="auto | band | masked | dense | reference")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no_backward", action="store_true", help="time the forward pass only")


def run(args: argparse.Namespace) -> Iterator[dict]:
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
    else:
        z = torch.full((1, H, 1), float(args.span - 1))  # window of `span` keys: d ≤ span − 1
    z.requires_grad_(backward and not hard)
    go = torch.randn(B, H, T, D, dtype=dtype)

    def dense():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            out.backward(go)

    def span():
        out = span_attention(q, k, v, z, args.ramp, hard=hard, impl=args.impl, chunk=args.chunk)
        if backward:
            out.backward(go)

    times = time_interleaved({"dense": dense, "span": span}, args.repeats)
    computed, dense_pairs = band_flops(z.expand(B, H, T), T, T, args.ramp, hard, chunk=args.chunk)
    zz = z.detach().expand(B, H, T)
    reach = (zz.floor() + 1) if hard else torch.ceil(zz + args.ramp)
    needed = int(torch.minimum(reach, torch.arange(1, T + 1).float()).sum())
    yield {"bench": "attention", "kind": args.kind, "seq": T, "span": args.span, "ramp": args.ramp, "batch": B,
           "heads": H, "head_dim": D, "dtype": args.dtype, "backward": backward, "span_grad": bool(z.requires_grad),
           "impl": args.impl, "chunk": args.chunk, "threads": torch.get_num_threads(),
           "dense_ms": round(1000 * times["dense"], 2), "span_ms": round(1000 * times["span"], 2),
           "speedup": round(times["dense"] / times["span"], 3),
           "dense_pairs": dense_pairs, "computed_pairs": computed, "needed_pairs": needed,
           "floor_speedup": round(dense_pairs / needed, 2), "band_pair_speedup": round(dense_pairs / computed, 2)}
