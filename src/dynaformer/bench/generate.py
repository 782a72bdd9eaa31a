"""`dynaformer bench generate`: decoding tokens/s with the KV cache versus recomputing the window; with
`--context N`, a dense model versus a span model (span-bounded KV cache) decoding after N tokens of context, and
with `--tensor_ops` / `--bf16_cache` both again without the compiled decoding step / with a bf16 KV cache."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from collections.abc import Iterator

import torch

from ..kernels import decode_with_tensor_ops
from ..model import Transformer
from ..model.generate import generate
from .common import preset, time_interleaved


def machine() -> dict:
    """What a timing depends on besides the code: threads, the CPU kind (AVX2 / AVX512) and the load average."""
    return {"threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
            "load": round(os.getloadavg()[0], 2)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset name or YAML (default: small)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--context", type=int, default=None,
                   help="dense vs span decoding after this many tokens of context (4 layers, 256 wide, 8 heads; "
                        "span model: dynamic spans with reach ≤ --span)")
    p.add_argument("--span", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="--context timing: wall (perf_counter) or cpu (process CPU time: steadier on a shared machine; "
                        "use --threads 1)")
    p.add_argument("--tensor_ops", action="store_true",
                   help="--context: also time both models decoding with tensor ops only (the compiled step off)")
    p.add_argument("--bf16_cache", action="store_true",
                   help="--context: also time both models with a bf16 KV cache (opt-in; changes the logits slightly)")


def run(args: argparse.Namespace) -> Iterator[dict]:
    if args.context:
        yield from run_context(args)
        return
    cfg = preset(args.config)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len))
    record = {"bench": "generate", "params": model.num_params(), "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, **machine()}
    generate(model, prompt, 8, temperature=0)  # warm-up
    max_len = args.prompt_len + args.new_tokens
    for name, cached in (("cached", True), ("uncached", False)):
        t = time.perf_counter()
        generate(model, prompt, args.new_tokens, temperature=0, use_cache=cached, max_len=max_len)
        record[f"{name}_tok_s"] = round(args.new_tokens / (time.perf_counter() - t), 1)
    record["cache_speedup"] = round(record["cached_tok_s"] / record["uncached_tok_s"], 3)
    yield record


@torch.no_grad()
def run_context(args: argparse.Namespace) -> Iterator[dict]:
    from .attention import span_model_config

    T, per_call = args.context, 16
    max_len = T + per_call * (args.repeats + 2) + 1
    prompt = torch.randint(0, 256, (1, T))
    variants = [("", torch.float32, False)]
    if getattr(args, "tensor_ops", False):
        variants.append(("_tensor_ops", torch.float32, True))
    if getattr(args, "bf16_cache", False):
        variants.append(("_bf16_cache", torch.bfloat16, False))
    state, fns, prefill, caches = {}, {}, {}, {}
    for kind, cfg in zip(("dense", "span"), span_model_config(max_len, args.span), strict=True):
        torch.manual_seed(0)
        model = Transformer(cfg).eval()
        for suffix, dtype, plain in variants:
            name = kind + suffix
            with decode_with_tensor_ops() if plain else contextlib.nullcontext():
                cache = caches[name] = model.new_cache(1, max_len, dtype=dtype)
                t = time.perf_counter()
                logits, _ = model(prompt, cache=cache)
                prefill[name] = time.perf_counter() - t
            state[name] = logits[:, -1:].argmax(-1)

            def decode(name=name, model=model, plain=plain):
                tok, cache = state[name], caches[name]
                with decode_with_tensor_ops() if plain else contextlib.nullcontext():
                    for _ in range(per_call):
                        logits, _ = model(tok, cache=cache)
                        tok = logits[:, -1:].argmax(-1)
                state[name] = tok

            fns[name] = decode
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = time_interleaved(fns, args.repeats, warmup=1, clock=clock)
    dense_bytes, span_bytes = caches["dense"].nbytes(), caches["span"].nbytes()
    record = {"bench": "generate_context", "context": T, "span": args.span, "clock": args.clock, **machine(),
              "dense_kv_bytes": dense_bytes, "span_kv_bytes": span_bytes,
              "kv_ratio": round(span_bytes / dense_bytes, 4),
              "dense_tok_s": round(per_call / times["dense"], 1), "span_tok_s": round(per_call / times["span"], 1),
              "tok_s_speedup": round(times["dense"] / times["span"], 3),
              "dense_prefill_s": round(prefill["dense"], 3), "span_prefill_s": round(prefill["span"], 3)}
    for suffix, _, _ in variants[1:]:
        record[f"dense{suffix}_tok_s"] = round(per_call / times["dense" + suffix], 1)
        record[f"span{suffix}_tok_s"] = round(per_call / times["span" + suffix], 1)
        record[f"tok_s_speedup{suffix}"] = round(times["dense" + suffix] / times["span" + suffix], 3)
    yield record
