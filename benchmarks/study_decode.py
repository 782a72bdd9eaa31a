"""Decoding cost of the study's models (2 layers × 64 wide): each span and residual variant against the baseline,
one greedy token at a time after T tokens of context, side by side in one process.

    python benchmarks/study_decode.py --grid /path/to/grid --seed 0 --lengths 128,1024,2048,4096 --threads 2
    python benchmarks/study_decode.py --lengths 128,1024,4096 --tensor_ops     # untrained models of the main grid

With `--grid`, the trained model of every language-model variant of that grid folder (its cells/VARIANT/seedS/run)
decodes held-out text of its own run (learned spans depend on the content); without, the main grid's
(configs/grid-cpu.yaml) variants are built untrained (spans at their start) and decode random bytes.
`--tensor_ops` adds each model a second time decoding with tensor ops only (the compiled decoding step switched
off, as before it existed), so the two are compared in the same run. Every model prefills T tokens into its own
cache, then calls of `--per_call` tokens are timed round-robin (median). Prints one JSON object per length: ms per
token of each model and its speed against the baseline (baseline ms ÷ variant ms; ≥ 1: the variant is faster).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from dynaformer.bench.common import time_interleaved
from dynaformer.kernels import decode_with_tensor_ops
from dynaformer.model import Transformer


def trained_models(grid: Path, seed: int) -> tuple[dict[str, Transformer], np.ndarray]:
    from dynaformer.data import open_splits
    from dynaformer.runs import load_model

    models, text = {}, None
    for cell in sorted((grid / "cells").glob(f"*/seed{seed}")):
        if not (cell / "run").is_dir():
            continue
        models[cell.parent.name], _, _ = load_model(cell / "run")
        if text is None:
            text = np.asarray(open_splits(cell / "run" / "data").val)
    if "baseline" not in models:
        raise SystemExit(f"{grid}: no trained baseline cell for seed {seed}")
    return models, text


def untrained_models() -> tuple[dict[str, Transformer], np.ndarray]:
    import yaml

    from dynaformer.configtools import from_dict
    from dynaformer.model import ModelConfig

    grid = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "grid-cpu.yaml").read_text())
    base = grid["model"]
    models = {}
    for name, variant in grid["variants"].items():
        over = {k: v for k, v in (variant or {}).items() if k in ModelConfig.__dataclass_fields__}
        torch.manual_seed(0)
        models[name] = Transformer(from_dict(ModelConfig, {**base, **over}, "model")).eval()
    return models, np.random.default_rng(0).integers(0, 256, 1 << 16).astype(np.int64)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", type=Path, default=None, help="a trained grid folder (default: untrained main grid)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lengths", default="128,1024,2048,4096")
    ap.add_argument("--per_call", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default=None, help="comma-separated variants (default: all)")
    ap.add_argument("--tensor_ops", action="store_true", help="also time every model with tensor ops only")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models, text = trained_models(args.grid, args.seed) if args.grid else untrained_models()
    if args.variants:
        keep = {"baseline", *args.variants.split(",")}
        models = {k: m for k, m in models.items() if k in keep}
    arms = [(name, False) for name in models] + ([(name, True) for name in models] if args.tensor_ops else [])
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for T in (int(x) for x in args.lengths.split(",")):
        capacity = T + args.per_call * (args.repeats + 3) + 1
        seq = torch.as_tensor(text[: T].astype(np.int64))[None] % 256
        fns, state, caches = {}, {}, {}
        for name, plain in arms:
            key = f"{name}/tensor_ops" if plain else name
            model = models[name]
            with decode_with_tensor_ops() if plain else contextlib.nullcontext():
                cache = caches[key] = model.new_cache(1, capacity)
                state[key] = model(seq, cache=cache)[0][:, -1:].argmax(-1)

            def decode(key=key, model=model, plain=plain, state=state, caches=caches):
                tok, cache = state[key], caches[key]
                with decode_with_tensor_ops() if plain else contextlib.nullcontext():
                    for _ in range(args.per_call):
                        tok = model(tok, cache=cache)[0][:, -1:].argmax(-1)
                state[key] = tok

            fns[key] = decode
        t = time_interleaved(fns, args.repeats, warmup=1, clock=clock)
        ms = {k: 1000 * v / args.per_call for k, v in t.items()}
        speed = {k: ms["baseline"] / v for k, v in ms.items() if k != "baseline"}
        if args.tensor_ops:
            speed.update({k: ms["baseline/tensor_ops"] / v for k, v in ms.items() if k.endswith("/tensor_ops")})
        print(json.dumps({"bench": "study_decode", "context": T, "threads": args.threads, "clock": args.clock,
                          "trained": args.grid is not None, "cpu": torch.backends.cpu.get_cpu_capability(),
                          "load": round(os.getloadavg()[0], 2),
                          "ms_per_token": {k: round(v, 4) for k, v in ms.items()},
                          "speed_vs_baseline": {k: round(v, 3) for k, v in speed.items()},
                          "kv_bytes": {k: c.nbytes() for k, c in caches.items() if "/" not in k}}))


if __name__ == "__main__":
    main()
