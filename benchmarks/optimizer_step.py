"""Optimizers on CPU, interleaved in one process: the optimizer step alone and the whole training step
(forward + backward + step) of a preset, for AdamW foreach, AdamW fused and Muon (train/optim.py: Muon on the
blocks' matrices, fused AdamW on the rest), built as the trainer builds them.

    python benchmarks/optimizer_step.py --config configs/tiny-cpu.yaml [--batch_size 12] [--clock cpu]

--clock cpu times with the process's CPU time (time.process_time): on one thread that is the work done, and a
busy machine inflates it far less than wall time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dynaformer.model import Transformer
from dynaformer.presets import preset
from dynaformer.timing import time_interleaved
from dynaformer.train.config import TrainConfig
from dynaformer.train.optim import make_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = p.parse_args()
    cfg = preset(args.config)
    cfg.vocab_size = 65
    fns = {}
    for impl in ("foreach", "fused", "muon"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        if impl == "foreach":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
        else:
            opt = make_optimizer(model, TrainConfig(lr=1e-4, optimizer="adamw" if impl == "fused" else "muon"))
        x = torch.randint(0, cfg.vocab_size, (args.batch_size, cfg.context_len))
        _, loss = model(x, x)
        loss.backward()

        def opt_step(opt=opt):
            opt.step()

        def train_step(model=model, opt=opt, x=x):
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)  # keep the grads: opt_step times a real update

        fns[f"{impl}_opt"], fns[f"{impl}_train"] = opt_step, train_step
    t = time_interleaved(fns, args.repeats, warmup=3,
                         clock=time.process_time if args.clock == "cpu" else time.perf_counter)
    print(json.dumps({"bench": "optimizer_step", "config": args.config, "batch_size": args.batch_size,
                      "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
                      "clock": args.clock,
                      **{f"{k}_ms": round(1000 * v, 2) for k, v in t.items()},
                      "fused_vs_foreach_train": round(t["foreach_train"] / t["fused_train"], 3),
                      "muon_vs_fused_train": round(t["muon_train"] / t["fused_train"], 3)}))


if __name__ == "__main__":
    main()
