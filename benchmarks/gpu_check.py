"""The GPU path, checked in one run on a CUDA machine (issue: the FlexAttention span path is unverified).

1. Parity: FlexAttention span attention (kernels/flex.py) against the dense reference, for dynamic, per-head
   and fixed spans, Tk > Tq and lengths that are not multiples of the block: outputs and the gradients of
   q, k, v and the spans, in fp32 (tolerance 1e-4 relative) .
2. Speed: span (FlexAttention) versus dense causal SDPA, bf16, forward + backward, at T = 4k, 8k and 16k,
   B = 1, H = 8, D = 64, spans ≤ 256; interleaved medians.
3. Dense MFU of the `small` preset in bf16 autocast: model FLOPs per step (eval/compute.py:
   6·params·tokens + attention) over the step time, against the GPU's dense bf16 peak (--peak_tflops, or
   a table of known GPUs).

    python benchmarks/gpu_check.py [--out results.json]

Prints one JSON object per check and exits 1 if a parity check fails. Run it as one prepared script: the
lent GPU time is short.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dynaformer.bench.common import preset, time_interleaved
from dynaformer.eval.compute import flops_per_token
from dynaformer.kernels.flex import flex_span_attention
from dynaformer.kernels.span import reference_span_attention
from dynaformer.model import Transformer

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def spans(kind: str, B: int, H: int, Tq: int, device) -> tuple[torch.Tensor, bool]:
    if kind == "dynamic":
        return 20 + 200 * torch.rand(B, H, Tq, device=device), False
    if kind == "per_head":
        return 20 + 200 * torch.rand(1, H, 1, device=device), False
    return torch.full((1, H, 1), 127.0, device=device), True


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def _output_and_grads(y: torch.Tensor, wrt: list[torch.Tensor], go: torch.Tensor) -> list[torch.Tensor]:
    return [y.detach(), *torch.autograd.grad(y, wrt, go)]


def _fwd_bwd(fn, *args) -> None:
    fn(*args).backward(torch.ones_like(args[0]))


def parity(device) -> list[dict]:
    out = []
    for kind in ("dynamic", "per_head", "fixed"):
        torch.manual_seed(0)
        B, H, Tq, Tk, D = 2, 4, 700, 900, 64
        q, k, v = (torch.randn(B, H, T, D, device=device, requires_grad=True) for T in (Tq, Tk, Tk))
        z, hard = spans(kind, B, H, Tq, device)
        z.requires_grad_(not hard)
        go = torch.randn(B, H, Tq, D, device=device)
        wrt = [q, k, v] + ([z] if not hard else [])
        results = [_output_and_grads(fn(q, k, v, z, 32.0, hard), wrt, go)
                   for fn in (reference_span_attention, flex_span_attention)]
        errs = {name: rel(a, b) for name, a, b in zip(["out", "dq", "dk", "dv", "dz"], results[1], results[0],
                                                      strict=False)}
        out.append({"check": "flex_parity", "kind": kind, "errors": errs, "ok": max(errs.values()) <= 1e-4})
    return out


def speed(device) -> list[dict]:
    out = []
    for T in (4096, 8192, 16384):
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, 8, T, 64, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        z = (192 + 32 * torch.rand(1, 8, T, device=device)).requires_grad_()
        fns = {"dense": functools.partial(_fwd_bwd, functools.partial(F.scaled_dot_product_attention, is_causal=True),
                                          q, k, v),
               "span": functools.partial(_fwd_bwd, flex_span_attention, q, k, v, z, 32.0)}
        t = time_interleaved(fns, repeats=10, warmup=3, device=device)
        out.append({"check": "flex_speed", "seq": T, "dense_ms": round(1000 * t["dense"], 3),
                    "span_ms": round(1000 * t["span"], 3), "speedup": round(t["dense"] / t["span"], 3)})
    return out


def mfu(device, peak_tflops: float | None) -> dict:
    cfg = preset("small")
    torch.manual_seed(0)
    model = Transformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    B, T = 32, cfg.context_len
    x = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time_interleaved({"step": step}, repeats=10, warmup=3, device=device)["step"]
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), math.nan)
    per_token = flops_per_token(model, T)["train"]
    achieved = per_token * B * T / t / 1e12
    return {"check": "dense_mfu", "gpu": name, "preset": "small", "batch": B, "seq": T,
            "params": model.num_params(), "step_ms": round(1000 * t, 2), "model_tflops": round(achieved, 2),
            "peak_tflops": peak, "mfu": round(achieved / peak, 4) if peak == peak else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="also write the results here (JSON list)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, TFLOP/s")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    started = time.time()
    results = [*parity(device), *speed(device), mfu(device, args.peak_tflops)]
    for r in results:
        print(json.dumps(r))
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "wall_s": round(time.time() - started, 1),
                                        "results": results}, indent=1))
    return 0 if all(r.get("ok", True) for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
