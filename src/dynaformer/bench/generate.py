"""`dynaformer bench generate`: decoding tokens/s with the KV cache versus recomputing the window."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import torch

from ..model import Transformer
from ..model.generate import generate
from .common import preset


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="preset name or YAML (default: small)")
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)


def run(args: argparse.Namespace) -> Iterator[dict]:
    cfg = preset(args.config)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_len))
    record = {"bench": "generate", "params": model.num_params(), "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "threads": torch.get_num_threads()}
    generate(model, prompt, 8, temperature=0)  # warm-up
    for name, cached in (("cached", True), ("uncached", False)):
        t = time.perf_counter()
        generate(model, prompt, args.new_tokens, temperature=0, use_cache=cached,
                 max_len=args.prompt_len + args.new_tokens)
        record[f"{name}_tok_s"] = round(args.new_tokens / (time.perf_counter() - t), 1)
    record["cache_speedup"] = round(record["cached_tok_s"] / record["uncached_tok_s"], 3)
    yield record
