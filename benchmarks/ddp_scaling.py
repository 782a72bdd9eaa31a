"""Throughput of two gloo ranks of one thread each versus one rank of one thread (same per-rank
batch), on a compute-bound preset. Runs `dynaformer train` under torchrun and reads tokens/s from
metrics.jsonl (the median over log intervals after the first).

    python benchmarks/ddp_scaling.py [--config small] [--steps 30] [--batch_size 4]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dynaformer.train.metrics import read_metrics


def run(nproc: int, out: Path, args: argparse.Namespace) -> float:
    train = ["train", "--config", f"configs/{args.config}.yaml", "--out", str(out), "--max_steps", str(args.steps),
             "--batch_size", str(args.batch_size), "--log_interval", "5", "--eval_interval", "0",
             "--eval_tokens", "2048", "--threads", "1", "--progress_bar", "false", "--data", "builtin:stories"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "dynaformer.cli", *train]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "dynaformer.cli", *train]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rates = [r["tok_s"] for r in read_metrics(out / "metrics.jsonl") if "tok_s" in r][1:]
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="small")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch_size", type=int, default=4)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    one = run(1, root / "one", args)
    two = run(2, root / "two", args)
    print(json.dumps({"bench": "ddp_scaling", "config": args.config, "batch_per_rank": args.batch_size,
                      "one_rank_tok_s": round(one, 1), "two_ranks_tok_s": round(two, 1),
                      "scaling": round(two / one, 3)}))


if __name__ == "__main__":
    main()
