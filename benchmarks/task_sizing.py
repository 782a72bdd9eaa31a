"""Sizing: when does a grid's reference learn each task? Trains one cell of a grid (its model and train sections,
a variant's overrides, CLI overrides) with a checkpoint every `--every` steps, then scores each checkpoint on the
grid's long-range evaluation (exact match by distance). One JSON line per checkpoint on stdout and in OUT/sizing.jsonl.

    python benchmarks/task_sizing.py configs/grid-cpu.yaml --seed 0 --every 80 --out /tmp/s0 [--set train.lr=2e-3 ...]

The shortest evaluated distance is the one the study's "learned" criterion reads."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml

from dynaformer.eval.longrange import evaluate_longrange
from dynaformer.runs import load_model
from dynaformer.study.cell import task_params
from dynaformer.study.grid import load_grid, resolve
from dynaformer.train import distributed
from dynaformer.train.rundir import locked_run
from dynaformer.train.trainer import Trainer, resolve_device


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("grid")
    ap.add_argument("--variant", default="baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=80, help="checkpoint (and score) every N steps")
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], help="section.field=value (YAML value)")
    ap.add_argument("--n", type=int, default=40, help="examples per distance")
    a = ap.parse_args()

    grid = load_grid(a.grid)
    base = {k: dict(v) for k, v in grid.base.items()}
    for s in a.set:
        key, val = s.split("=", 1)
        sec, field = key.split(".", 1)
        base.setdefault(sec, {})[field] = yaml.safe_load(val)
    mcfg, tcfg = resolve(base, grid.variants, a.variant)
    tcfg.seed, tcfg.out = a.seed, str(Path(a.out) / "run")
    tcfg.ckpt_interval, tcfg.keep_last, tcfg.resume, tcfg.progress_bar = a.every, 0, "auto", False
    torch.set_num_threads(max(1, tcfg.threads))
    t0 = time.time()
    dist = distributed.init_distributed(resolve_device(tcfg.device))
    with locked_run(mcfg, tcfg, dist) as run:
        summary = Trainer(run, dist).fit()
    train_s = time.time() - t0
    ev = grid.eval
    rows = []
    for ckpt in sorted(Path(tcfg.out).glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        model, _, _ = load_model(ckpt)
        model.eval()
        lr = evaluate_longrange(model, mcfg.context_len, ev["tasks"], a.n, ev["fractions"],
                                batch_size=ev["batch_size"], params=task_params(tcfg.data))
        row = {"step": int(ckpt.name.split("-")[1]), "seed": a.seed, "variant": a.variant, "set": a.set,
               "shortest": {t: r["exact"][0] for t, r in lr["tasks"].items()},
               "by_distance": {t: dict(zip(r["distance"], r["exact"], strict=True)) for t, r in lr["tasks"].items()},
               "train_s": round(train_s, 1), "cpu": torch.backends.cpu.get_cpu_capability()}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(Path(a.out) / "sizing.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"done: {summary.get('step', '?')} steps in {train_s:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
