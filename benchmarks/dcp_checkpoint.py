"""Checkpoint save under torchrun (FSDP2, gloo on CPU): full state gathered to rank 0 and written as
safetensors, against DCP (every rank writes its own shards). Reports save time and rank 0's peak resident
memory during the save (VmHWM after malloc_trim and a reset through /proc/self/clear_refs; Linux, glibc).

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/dcp_checkpoint.py --preset small
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/dcp_checkpoint.py --preset 113m

Each format is saved `--repeats` times after `--steps` optimizer steps (so AdamW's moments exist); the
median time and the largest peak are printed as one JSON line by rank 0.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dynaformer.model import ModelConfig, Transformer
from dynaformer.train.checkpoint import save_checkpoint, save_dcp_checkpoint
from dynaformer.train.config import TrainConfig
from dynaformer.train.distributed import init_distributed, shutdown, wrap_model
from dynaformer.train.optim import make_optimizer, no_decay_names
from dynaformer.train.state import model_state, optimizer_state, sharded_state

PRESETS = {
    "small": dict(n_layer=6, n_head=6, d_model=384, context_len=256),  # configs/small.yaml
    "113m": dict(n_layer=16, n_head=12, d_model=768, context_len=256),
}


def _mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> None:
    # Hand freed heap back first (glibc keeps it resident, and a later allocation reusing it would not
    # show), then VmHWM := VmRSS.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--context", type=int, default=64, help="tokens per training row (the steps only fill AdamW)")
    args = ap.parse_args()

    info = init_distributed(torch.device("cpu"))
    torch.manual_seed(0)
    mcfg = ModelConfig(**PRESETS[args.preset])
    tcfg = TrainConfig(lr=1e-4)
    model = Transformer(mcfg)
    params = model.num_params()
    no_decay = no_decay_names(model)
    wrap_model(model, "fsdp", info, torch.device("cpu"))
    opt = make_optimizer(model, tcfg, no_decay)
    for _ in range(args.steps):
        x = torch.randint(0, mcfg.vocab_size, (args.batch_size, args.context))
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    root = Path(tempfile.mkdtemp(prefix="dcp-bench-")) if info.is_main else None
    obj = [str(root)]
    dist.broadcast_object_list(obj, src=0)
    root = Path(obj[0])
    config = {"model": {}, "train": {}}
    results = {}
    for fmt in ("full", "dcp"):
        times, peaks, base = [], [], []
        for r in range(args.repeats):
            run_dir = root / f"{fmt}-{r}"
            if info.is_main:
                run_dir.mkdir(parents=True)
            dist.barrier()
            _reset_peak()
            base.append(_mib("VmRSS"))
            t0 = time.perf_counter()
            if fmt == "full":
                weights = model_state(model, True)
                optim = optimizer_state(model, opt, True)
                if info.is_main:
                    save_checkpoint(run_dir, 1, weights, config, {"optimizer": optim, "step": 1})
                del weights, optim
                dist.barrier()
            else:
                tensors, groups = sharded_state(model, opt)
                save_dcp_checkpoint(run_dir, 1, tensors, config, {"param_groups": groups, "step": 1})
                del tensors
            times.append(time.perf_counter() - t0)
            peaks.append(_mib("VmHWM"))
        size = sum(p.stat().st_size for p in (root / f"{fmt}-0" / "step-1").rglob("*") if p.is_file())
        results[fmt] = {"save_s": round(statistics.median(times), 3), "rank0_peak_mib": round(max(peaks), 1),
                        "rank0_rss_before_mib": round(statistics.median(base), 1),
                        "rank0_extra_mib": round(max(p - b for p, b in zip(peaks, base, strict=True)), 1),
                        "bytes": size}
    if info.is_main:
        print(json.dumps({"preset": args.preset, "params": params, "world": info.world,
                          "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, **results}))
        shutil.rmtree(root, ignore_errors=True)
    dist.barrier()
    shutdown(info)


if __name__ == "__main__":
    main()
