"""`dynaformer bench tasks`: generation speed of each long-range task (tokens/s) and the time to
evaluate a model on the suite (default: a ≈1M-parameter model, 1,000 examples of length 1,024)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import numpy as np
import torch

from ..data.tasks import TASKS, make_task
from ..eval.longrange import evaluate_longrange
from ..model import ModelConfig, Transformer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--length", type=int, default=1024, help="example length (default: 1024)")
    p.add_argument("--examples", type=int, default=1000, help="evaluation examples in all (default: 1000)")
    p.add_argument("--gen_examples", type=int, default=2000, help="examples per task for the generation timing")
    p.add_argument("--d_model", type=int, default=144, help="model width (144 with 4 layers: ≈1.0M parameters)")
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--skip_eval", action="store_true")


def run(args: argparse.Namespace) -> Iterator[dict]:
    L = args.length
    for name in TASKS:
        task = make_task(name)
        lo, hi = task.distance_range(L)
        d = np.random.default_rng(0).integers(lo, hi + 1, args.gen_examples)
        warm = min(16, args.gen_examples)
        task.generate(warm, L, d[:warm])  # warm-up
        t = time.perf_counter()
        b = task.generate(args.gen_examples, L, d)
        dt = time.perf_counter() - t
        yield {"bench": "task_generation", "task": name, "length": L, "examples": args.gen_examples,
               "tok_s": round(b.tokens.size / dt), "ms": round(1000 * dt, 2)}
    if args.skip_eval:
        return
    cfg = ModelConfig(n_layer=args.n_layer, n_head=4, d_model=args.d_model, context_len=L)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    n_dist = 5  # the default fractions give 5 distances for most tasks
    n_per = max(1, args.examples // (len(TASKS) * n_dist))
    t = time.perf_counter()
    res = evaluate_longrange(model, L, n_per_distance=n_per, batch_size=args.batch_size)
    dt = time.perf_counter() - t
    n = sum(len(r["distance"]) * r["n"] for r in res["tasks"].values())
    yield {"bench": "longrange_eval", "params": model.num_params(), "length": L, "examples": n,
           "seconds": round(dt, 2), "examples_s": round(n / dt, 2), "threads": torch.get_num_threads()}
