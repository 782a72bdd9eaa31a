"""Time to validation loss for a preset on tiny-shakespeare (char-level), the core's performance goal.

Trains in this process (the clock starts before data preparation and includes every evaluation and
checkpoint), then prints one JSON object: the (elapsed_s, val_loss) curve and the first time the
validation loss reached --target.

    python benchmarks/time_to_loss.py --config configs/tiny-cpu.yaml --target 1.88 [--key value ...]

Reference from ../shared/data/README.md: nanoGPT's CPU baby GPT (4L/4H/128, context 64, batch 12,
2,000 iterations) reached val loss 1.886 in 107 s on these 2-core machines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dynaformer.cli import build_configs, make_parser
from dynaformer.train.metrics import read_metrics
from dynaformer.train.rundir import open_run
from dynaformer.train.trainer import Trainer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--keep", action="store_true", help="keep the run folder")
    known, rest = ap.parse_known_args()
    out = Path(tempfile.mkdtemp(prefix="ttl-")) / "run"
    args = make_parser().parse_args(["train", *rest, "--out", str(out), "--progress_bar", "false"])
    t0 = time.perf_counter()
    model_cfg, train_cfg = build_configs(args)
    trainer = Trainer(open_run(model_cfg, train_cfg))
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    curve = [(r["elapsed_s"], r["val_loss"]) for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    hit = next((t for t, v in curve if v <= known.target), None)
    result = {"bench": "time_to_loss", "args": rest, "params": summary["params"], "steps": summary["step"],
              "final_val_loss": round(curve[-1][1], 4), "wall_s": round(wall, 2),
              "train_elapsed_s": summary["elapsed_s"], "target": known.target,
              "time_to_target_s": hit, "curve": [(round(t, 2), round(v, 4)) for t, v in curve]}
    print(json.dumps(result))
    if not known.keep:
        shutil.rmtree(out.parent, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
