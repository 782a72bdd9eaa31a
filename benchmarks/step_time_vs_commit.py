"""Trainer.train_step ms/step on the tiny-cpu preset (text), this checkout against an earlier commit, interleaved
and in alternating order (each measurement a fresh process, 20 warm-up + 150 timed steps, 2 threads).

    python benchmarks/step_time_vs_commit.py REF [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = r'''
import sys, time, json
from dynaformer.cli import load_yaml_config
from dynaformer.configtools import from_dict
from dynaformer.model import ModelConfig
from dynaformer.train.config import TrainConfig
from dynaformer.train.rundir import open_run
from dynaformer.train.trainer import Trainer
cfg = load_yaml_config(sys.argv[2])
m = from_dict(ModelConfig, cfg["model"], "model")
t = from_dict(TrainConfig, {**cfg["train"], "out": sys.argv[1], "progress_bar": False, "threads": 2,
                            "max_steps": 10**6, "warmup_steps": 1}, "train")
tr = Trainer(open_run(m, t))
tr._t0 = time.perf_counter()
for _ in range(20):
    tr.train_step()
t0 = time.perf_counter()
for _ in range(150):
    tr.train_step()
print(json.dumps((time.perf_counter() - t0) / 150 * 1000))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", str(tmp / "old"), args.ref], check=True)
    try:
        srcs = {"old": tmp / "old" / "src", "new": ROOT / "src"}
        res: dict[str, list[float]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for name in ("new", "old") if r % 2 == 0 else ("old", "new"):
                out = tmp / f"run-{name}-{r}"
                p = subprocess.run([sys.executable, "-c", CODE, str(out), str(ROOT / "configs" / "tiny-cpu.yaml")],
                                   capture_output=True, text=True, env={"PYTHONPATH": str(srcs[name]),
                                                                        "PATH": "/usr/bin:/bin"}, check=True)
                res[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
        old, new = statistics.median(res["old"]), statistics.median(res["new"])
        print(json.dumps({"old_ms": res["old"], "new_ms": res["new"], "median_old": round(old, 2),
                          "median_new": round(new, 2), "new_over_old": round(new / old, 3)}))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "old")])
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
