"""`dynaformer bench train`: one training step (forward, backward, AdamW) of a preset in fp32 and
bf16 autocast, optionally compiled, side by side."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import torch

from ..model import Transformer
from .common import preset, time_interleaved


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset name or YAML (default: small)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--context", type=int, default=None, help="sequence length (default: the preset's context_len)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd variants")


def run(args: argparse.Namespace) -> Iterator[dict]:
    cfg = preset(args.config)
    T = args.context or cfg.context_len
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, T))
    fns = {}
    variants = [("fp32", None, False), ("bf16", torch.bfloat16, False)]
    if args.compile:
        variants += [("fp32_compiled", None, True), ("bf16_compiled", torch.bfloat16, True)]
    for name, dtype, compiled in variants:
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        fwd = torch.compile(model) if compiled else model

        def step(fwd=fwd, opt=opt, dtype=dtype):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                _, loss = fwd(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = step
    times = time_interleaved(fns, args.steps)
    tokens = args.batch_size * T
    record = {"bench": "train", "params": Transformer(cfg).num_params(), "batch": args.batch_size, "seq": T,
              "threads": torch.get_num_threads()}
    for name, t in times.items():
        record[f"{name}_ms"] = round(1000 * t, 2)
        record[f"{name}_tok_s"] = round(tokens / t, 1)
    record["bf16_speedup"] = round(times["fp32"] / times["bf16"], 3)
    yield record
