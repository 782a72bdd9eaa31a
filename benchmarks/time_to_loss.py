"""Time to validation loss for a preset on tiny-shakespeare (char-level), the core's performance goal, measured
side by side with a nanoGPT-style baby GPT.

Trains in this process (the clock starts before data preparation and includes every evaluation and
checkpoint), then prints one JSON object per run: the (elapsed_s, val_loss) curve and the first time the
validation loss reached --target. With --reference, each round also trains the reference right after ours, in
the same process and on the same machine state, and prints the ratio of the two times.

    python benchmarks/time_to_loss.py --config configs/tiny-cpu.yaml --target 1.88 [--reference] [--rounds N]
        [--key value ...]

The reference is nanoGPT's CPU "baby GPT" recipe (its README: 4 layers, 4 heads, 128 channels, context 64,
batch 12, 2,000 iterations, lr 1e-3 with 100 warm-up iterations and cosine to 1e-4, AdamW β2 0.99, weight
decay 0.1, clipping 1.0, no dropout, evaluation every 250 iterations over 20 batches), written here from that
description: learned positions, LayerNorm without bias, GELU MLP, tied embeddings, N(0, 0.02) initialisation.
Its time to target is the first evaluation at or below --target, else its whole run (nanoGPT's published
figure: 1.886 after 2,000 iterations, 107 s on these 2-core machines).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynaformer.cli import build_configs, make_parser
from dynaformer.data import CharTokenizer, read_text
from dynaformer.train.metrics import read_metrics
from dynaformer.train.rundir import open_run
from dynaformer.train.trainer import Trainer

BABY = dict(n_layer=4, n_head=4, d=128, block=64, batch=12, iters=2000, lr=1e-3, min_lr=1e-4, warmup=100,
            eval_interval=250, eval_iters=20, weight_decay=0.1, beta2=0.99, grad_clip=1.0)


class _Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv, self.proj = nn.Linear(d, 3 * d, bias=False), nn.Linear(d, d, bias=False)
        self.fc, self.out = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class BabyGPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_layer: int, n_head: int, block: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.blocks = nn.ModuleList(_Block(d, n_head) for _ in range(n_layer))
        self.ln = nn.LayerNorm(d, bias=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # idx: (B, T)
        x = self.tok(idx) + self.pos(torch.arange(idx.size(1)))
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.ln(x)).flatten(0, 1), targets.flatten())


def reference_run(target: float, seed: int = 1337) -> dict:
    """nanoGPT's baby-GPT recipe on the same text: the clock includes data preparation and evaluations."""
    c = BABY
    t0 = time.perf_counter()
    text, _ = read_text("builtin:default", c["block"])
    tok = CharTokenizer.fit(text)
    ids = torch.from_numpy(tok.encode_array(text).astype(np.int64))
    n = int(0.9 * len(ids))
    splits = {"train": ids[:n], "val": ids[n:]}
    torch.manual_seed(seed)
    model = BabyGPT(tok.vocab_size, c["d"], c["n_layer"], c["n_head"], c["block"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": rest, "weight_decay": 0.0}], lr=c["lr"], betas=(0.9, c["beta2"]))

    def batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = splits[split]
        ix = torch.randint(len(data) - c["block"], (c["batch"],))
        return (torch.stack([data[i : i + c["block"]] for i in ix]),
                torch.stack([data[i + 1 : i + 1 + c["block"]] for i in ix]))

    def lr_at(it: int) -> float:
        if it < c["warmup"]:
            return c["lr"] * (it + 1) / (c["warmup"] + 1)
        ratio = (it - c["warmup"]) / (c["iters"] - c["warmup"])
        return c["min_lr"] + 0.5 * (1 + math.cos(math.pi * min(1.0, ratio))) * (c["lr"] - c["min_lr"])

    curve, hit = [], None
    for it in range(c["iters"] + 1):
        if it % c["eval_interval"] == 0:
            model.eval()
            with torch.no_grad():
                val = float(torch.stack([model(*batch("val")) for _ in range(c["eval_iters"])]).mean())
            model.train()
            curve.append((round(time.perf_counter() - t0, 2), round(val, 4)))
            if hit is None and val <= target:
                hit = curve[-1][0]
        if it == c["iters"]:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(it)
        loss = model(*batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), c["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    wall = time.perf_counter() - t0
    return {"bench": "time_to_loss_reference", "recipe": "nanoGPT baby GPT (CPU)", "steps": c["iters"],
            "final_val_loss": curve[-1][1], "wall_s": round(wall, 2), "time_to_target_s": hit,
            "time_for_comparison_s": hit if hit is not None else round(wall, 2), "curve": curve}


def our_run(rest: list[str], target: float, keep: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ttl-")) / "run"
    args = make_parser().parse_args(["train", *rest, "--out", str(out), "--progress_bar", "false"])
    t0 = time.perf_counter()
    model_cfg, train_cfg = build_configs(args)
    trainer = Trainer(open_run(model_cfg, train_cfg))
    summary = trainer.fit()
    wall = time.perf_counter() - t0
    curve = [(r["elapsed_s"], r["val_loss"]) for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r]
    hit = next((t for t, v in curve if v <= target), None)
    result = {"bench": "time_to_loss", "args": rest, "params": summary["params"], "steps": summary["step"],
              "final_val_loss": round(curve[-1][1], 4), "wall_s": round(wall, 2),
              "train_elapsed_s": summary["elapsed_s"], "target": target, "time_to_target_s": hit,
              "dtype": trainer.precision.dtype, "optimizer": train_cfg.optimizer,
              "curve": [(round(t, 2), round(v, 4)) for t, v in curve]}
    if not keep:
        shutil.rmtree(out.parent, ignore_errors=True)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=1.88)
    ap.add_argument("--keep", action="store_true", help="keep the run folder")
    ap.add_argument("--reference", action="store_true", help="also train nanoGPT's baby GPT, right after ours")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of (ours, reference)")
    known, rest = ap.parse_known_args()
    env = {"cpu": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
           "torch": torch.__version__}
    for _ in range(known.rounds):
        ours = our_run(rest, known.target, known.keep)
        print(json.dumps({**ours, **env}), flush=True)
        if known.reference:
            ref = reference_run(known.target)
            ratio = (ours["time_to_target_s"] / ref["time_for_comparison_s"]
                     if ours["time_to_target_s"] is not None else None)
            print(json.dumps({**ref, **env, "ratio_ours_to_reference": ratio and round(ratio, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
