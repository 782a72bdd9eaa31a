"""AdamW foreach versus fused on CPU, interleaved in one process: the optimizer step alone and the whole
training step (forward + backward + step) of a preset.

    python benchmarks/optimizer_step.py --config configs/tiny-cpu.yaml
"""

from __future__ import annotations

import argparse
import json

import torch

from dynaformer.bench.common import preset, time_interleaved
from dynaformer.model import Transformer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    cfg = preset(args.config)
    cfg.vocab_size = 65
    fns = {}
    for impl in ("foreach", "fused"):
        torch.manual_seed(0)
        model = Transformer(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **{impl: True})
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
    t = time_interleaved(fns, args.repeats, warmup=3)
    print(json.dumps({"bench": "optimizer_step", "config": args.config, "threads": torch.get_num_threads(),
                      **{f"{k}_ms": round(1000 * v, 2) for k, v in t.items()},
                      "train_speedup": round(t["foreach_train"] / t["fused_train"], 3)}))


if __name__ == "__main__":
    main()
