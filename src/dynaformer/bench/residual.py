"""`dynaformer bench residual`: the cost of dynamic residual weighting (all factors on) against pre-norm,
side by side in one process: training step (forward, backward, AdamW) and cached generation tokens/s.

Targets (issue #3): dynamic_ms / prenorm_ms ≤ 1.02 and dynamic generation tok/s ≥ 0.98 × prenorm."""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterator

import torch

from ..errors import DynaformerError
from ..model import Transformer
from ..model.generate import generate
from .common import preset, time_interleaved
from .generate import machine

KINDS = ("prenorm", "dynamic")
CONTROL = "prenorm_control"  # a second, identical pre-norm model: its ratio to prenorm is the noise floor


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset name or YAML (default: small)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--context", type=int, default=None, help="sequence length (default: the preset's context_len)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per variant (interleaved)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64, help="generated tokens per timed generation")
    p.add_argument("--gen_repeats", type=int, default=10, help="timed generations per variant (interleaved)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="training step precision (autocast)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process CPU time (steadier on a shared machine; use --threads 1)")
    p.add_argument("--factors", default="gain,step,position,content",
                   help="factors of the dynamic model that are on (comma-separated; default: all four)")
    p.add_argument("--no_control", action="store_true",
                   help="skip the A/A control (a second pre-norm model timed alongside, to show the noise floor)")


def _models(args: argparse.Namespace) -> dict[str, Transformer]:
    base = preset(args.config)
    factors = {f.strip() for f in args.factors.split(",") if f.strip()}
    unknown = factors - {"gain", "step", "position", "content"}
    if unknown:
        raise DynaformerError(f"bench residual: --factors: unknown factor '{sorted(unknown)[0]}' "
                              f"(choose from gain, step, position, content)")
    models = {}
    for name in KINDS + (() if args.no_control else (CONTROL,)):
        kind = "prenorm" if name == CONTROL else name
        cfg = dataclasses.replace(base, residual=kind, dyn_gain="gain" in factors, dyn_step="step" in factors,
                                  dyn_position="position" in factors, dyn_content="content" in factors)
        torch.manual_seed(0)
        models[name] = Transformer(cfg).to(args.device)
        models[name].progress.fill_(0.5)
    return models


def run(args: argparse.Namespace) -> Iterator[dict]:
    device = torch.device(args.device)
    models = _models(args)
    cfg = models["prenorm"].cfg
    T = args.context or cfg.context_len
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, T), device=device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else None

    fns = {}
    for kind, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

        def step(model=model, opt=opt):
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[kind] = step
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    train = time_interleaved(fns, args.steps, device=device, clock=clock)

    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    max_len = args.prompt_len + args.new_tokens
    gen_fns = {kind: (lambda model=model: generate(model, prompt, args.new_tokens, temperature=0, max_len=max_len))
               for kind, model in models.items()}
    gen = time_interleaved(gen_fns, args.gen_repeats, warmup=1, device=device, clock=clock)

    record = {"bench": "residual", "config": args.config or "small", "batch": args.batch_size, "seq": T,
              "dtype": args.dtype, "clock": args.clock, "factors": args.factors, "device": str(device),
              **machine(),
              "steps": args.steps, "prenorm_ms": round(1000 * train["prenorm"], 2),
              "dynamic_ms": round(1000 * train["dynamic"], 2),
              "ratio": round(train["dynamic"] / train["prenorm"], 4)}
    for kind in KINDS:
        record[f"{kind}_gen_tok_s"] = round(args.new_tokens / gen[kind], 2)
    record["gen_ratio"] = round(gen["prenorm"] / gen["dynamic"], 4)  # dynamic tok/s ÷ prenorm tok/s
    if CONTROL in models:  # the same measurements for two identical pre-norm models: ≈ 1 ± noise
        record["control_ratio"] = round(train[CONTROL] / train["prenorm"], 4)
        record["control_gen_ratio"] = round(gen["prenorm"] / gen[CONTROL], 4)
    yield record
