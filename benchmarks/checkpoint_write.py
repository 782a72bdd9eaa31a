"""Checkpoint write time for a ~10M-parameter model (the `small` preset) with its AdamW state.

    python benchmarks/checkpoint_write.py [--config small] [--repeats 5]

Prints one JSON object: bytes written and the median seconds of `save_checkpoint` (gathering state,
safetensors + torch.save, SHA-256 manifest, fsync, rename)."""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dynaformer.bench.common import preset
from dynaformer.model import Transformer
from dynaformer.train.checkpoint import save_checkpoint
from dynaformer.train.state import model_state, optimizer_state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cfg = preset(args.config)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (1, 16))
    model(x, x)[1].backward()
    opt.step()
    root = Path(tempfile.mkdtemp())
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        state = {"step": i, "optimizer": optimizer_state(model, opt, False), "torch_rng": torch.get_rng_state()}
        path = save_checkpoint(root, i, model_state(model, False), {"model": {}}, state)
        times.append(time.perf_counter() - t)
    size = sum(p.stat().st_size for p in path.iterdir())
    shutil.rmtree(root)
    print(json.dumps({"bench": "checkpoint_write", "params": model.num_params(), "bytes": size,
                      "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}))


if __name__ == "__main__":
    main()
