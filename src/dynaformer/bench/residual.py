"""`dynaformer bench residual`: the cost of dynamic residual weighting (all factors on) against pre-norm,
side by side in one process: training step (forward, backward, AdamW) and cached generation tokens/s.

Targets (issue #3): dynamic_ms / prenorm_ms ≤ 1.02 and dynamic generation tok/s ≥ 0.98 × prenorm (gen_ratio:
whole generate() calls, prefill included; decode_ratio: the cached one-token step alone).

The residual-stream relatives (model/streams.py: hyper, hyper_static, mhc, attnres; and `value_residual`, pre-norm
with the value residual on) are timed in the same rounds (`--relatives`): `{kind}_ms`, `{kind}_ratio` (÷ prenorm_ms),
`{kind}_gen_ratio` and `{kind}_decode_ratio` (their tok/s ÷ prenorm's), `{kind}_decode_tok_s`."""

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
RELATIVES = ("hyper", "hyper_static", "mhc", "attnres", "value_residual")
CONTROL = "prenorm_control"  # a second, identical pre-norm model: its ratio to prenorm is the noise floor


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset name or YAML (default: small)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--context", type=int, default=None, help="sequence length (default: the preset's context_len)")
    p.add_argument("--steps", type=int, default=10,
                   help="timed training steps per variant (interleaved); 0: time generation only")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=64, help="generated tokens per timed generation")
    p.add_argument("--gen_repeats", type=int, default=10,
                   help="timed generations, and timed calls of 16 decode steps, per variant (interleaved)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="training step precision (autocast)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: perf_counter; cpu: process CPU time (steadier on a shared machine; use --threads 1)")
    p.add_argument("--factors", default="gain,step,position,content",
                   help="factors of the dynamic model that are on (comma-separated; default: all four)")
    p.add_argument("--relatives", default=",".join(RELATIVES),
                   help=f"residual-stream relatives timed alongside (comma-separated, or 'none'; default: "
                        f"{','.join(RELATIVES)})")
    p.add_argument("--no_control", action="store_true",
                   help="skip the A/A control (a second pre-norm model timed alongside, to show the noise floor)")


def _relatives(args: argparse.Namespace) -> tuple[str, ...]:
    names = tuple(k.strip() for k in args.relatives.split(",") if k.strip() and k.strip() != "none")
    unknown = [k for k in names if k not in RELATIVES]
    if unknown:
        raise DynaformerError(f"bench residual: --relatives: unknown kind '{unknown[0]}' "
                              f"(choose from {', '.join(RELATIVES)}, or none)")
    return names


def _models(args: argparse.Namespace) -> dict[str, Transformer]:
    base = preset(args.config)
    factors = {f.strip() for f in args.factors.split(",") if f.strip()}
    unknown = factors - {"gain", "step", "position", "content"}
    if unknown:
        raise DynaformerError(f"bench residual: --factors: unknown factor '{sorted(unknown)[0]}' "
                              f"(choose from gain, step, position, content)")
    models = {}
    for name in KINDS + _relatives(args) + (() if args.no_control else (CONTROL,)):
        kind = "prenorm" if name in (CONTROL, "value_residual") else name
        cfg = dataclasses.replace(base, residual=kind, dyn_gain="gain" in factors, dyn_step="step" in factors,
                                  dyn_position="position" in factors, dyn_content="content" in factors,
                                  value_residual=name == "value_residual")
        torch.manual_seed(0)
        models[name] = Transformer(cfg).to(args.device)
        models[name].progress.fill_(0.5)
    return models


def _train_times(args: argparse.Namespace, models: dict[str, Transformer], clock) -> dict[str, float]:
    """Seconds per training step (forward, backward, AdamW) of each model, interleaved."""
    device = torch.device(args.device)
    cfg = models["prenorm"].cfg
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.context or cfg.context_len), device=device)
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
    return time_interleaved(fns, args.steps, device=device, clock=clock)


@torch.no_grad()
def _decode_times(args: argparse.Namespace, models: dict[str, Transformer], clock,
                  per_call: int = 16) -> dict[str, float]:
    """Seconds per decoded token (one cached forward and a greedy pick) of each model after the prompt, calls of
    `per_call` tokens interleaved: the decode step alone, without generate()'s prefill."""
    device = torch.device(args.device)
    prompt = torch.randint(0, models["prenorm"].cfg.vocab_size, (1, args.prompt_len), device=device)
    capacity = args.prompt_len + per_call * (args.gen_repeats + 2) + 1
    state, fns = {}, {}
    for kind, model in models.items():
        model.eval()
        cache = model.new_cache(1, capacity)
        state[kind] = model(prompt, cache=cache)[0][:, -1:].argmax(-1)

        def decode(kind=kind, model=model, cache=cache):
            tok = state[kind]
            for _ in range(per_call):
                tok = model(tok, cache=cache)[0][:, -1:].argmax(-1)
            state[kind] = tok

        fns[kind] = decode
    times = time_interleaved(fns, args.gen_repeats, warmup=1, device=device, clock=clock)
    return {k: t / per_call for k, t in times.items()}


def run(args: argparse.Namespace) -> Iterator[dict]:
    device = torch.device(args.device)
    models = _models(args)
    cfg = models["prenorm"].cfg
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    record = {"bench": "residual", "config": args.config or "small", "batch": args.batch_size,
              "seq": args.context or cfg.context_len, "dtype": args.dtype, "clock": args.clock, "factors": args.factors,
              "device": str(device), **machine(), "steps": args.steps}
    if args.steps > 0:
        train = _train_times(args, models, clock)
        record.update(prenorm_ms=round(1000 * train["prenorm"], 2), dynamic_ms=round(1000 * train["dynamic"], 2),
                      ratio=round(train["dynamic"] / train["prenorm"], 4))
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), device=device)
    max_len = args.prompt_len + args.new_tokens
    gen_fns = {kind: (lambda model=model: generate(model, prompt, args.new_tokens, temperature=0, max_len=max_len))
               for kind, model in models.items()}
    gen = time_interleaved(gen_fns, args.gen_repeats, warmup=1, device=device, clock=clock)
    decode = _decode_times(args, models, clock)
    for kind in KINDS:
        record[f"{kind}_gen_tok_s"] = round(args.new_tokens / gen[kind], 2)
        record[f"{kind}_decode_tok_s"] = round(1 / decode[kind], 2)
    record["gen_ratio"] = round(gen["prenorm"] / gen["dynamic"], 4)  # dynamic tok/s ÷ prenorm tok/s
    record["decode_ratio"] = round(decode["prenorm"] / decode["dynamic"], 4)  # the same, decode step alone
    for kind in _relatives(args):
        if args.steps > 0:
            record[f"{kind}_ms"] = round(1000 * train[kind], 2)
            record[f"{kind}_ratio"] = round(train[kind] / train["prenorm"], 4)
        record[f"{kind}_decode_tok_s"] = round(1 / decode[kind], 2)
        record[f"{kind}_gen_ratio"] = round(gen["prenorm"] / gen[kind], 4)
        record[f"{kind}_decode_ratio"] = round(decode["prenorm"] / decode[kind], 4)
    if CONTROL in models:  # the same measurements for two identical pre-norm models: ≈ 1 ± noise
        if args.steps > 0:
            record["control_ratio"] = round(train[CONTROL] / train["prenorm"], 4)
        record["control_gen_ratio"] = round(gen["prenorm"] / gen[CONTROL], 4)
        record["control_decode_ratio"] = round(decode["prenorm"] / decode[CONTROL], 4)
    yield record
