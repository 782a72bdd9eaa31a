"""Batched greedy generation through the transformers wrapper: 16 prompts of mixed lengths, generated one at a
time (batch 1) or left-padded in batches of 4 and 16 (attention_mask), for each span kind.

    python benchmarks/batched_generate.py --preset tiny-cpu --new 64 --threads 1

Each batch's rows are checked against the prompts generated alone (same tokens) before anything is timed.
Prints one JSON object per (span kind, batch size): generated tokens per second over all 16 prompts.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from dynaformer.bench.common import preset
from dynaformer.hf import DynaformerForCausalLM
from dynaformer.model import Transformer


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


def run_all(hf, prompts: list[torch.Tensor], batch: int, new: int) -> list[torch.Tensor]:
    """Every prompt's generated tokens, `batch` prompts per generate() call."""
    out = []
    for s in range(0, len(prompts), batch):
        ids, mask = left_pad(prompts[s : s + batch])
        gen = hf.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                          pad_token_id=0)
        out += list(gen[:, ids.shape[1]:])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-cpu")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--spans", default="none,dynamic")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 129, (args.prompts,), generator=g).tolist()  # mixed: 8 to 128 tokens
    for span in args.spans.split(","):
        torch.manual_seed(0)
        cfg = preset(args.preset)
        cfg.span, cfg.context_len = span, 256  # prompt + new tokens stay inside the context
        if span != "none":
            cfg.span_max, cfg.span_init = 64, 16.0
        model = Transformer(cfg).eval()
        hf = DynaformerForCausalLM.from_dynaformer(model).eval()
        prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in lengths]
        ref = run_all(hf, prompts, 1, args.new)
        for batch in (4, 16):
            assert all(torch.equal(a, b) for a, b in zip(run_all(hf, prompts, batch, args.new), ref, strict=True))
        times: dict[int, list[float]] = {1: [], 4: [], 16: []}
        for _ in range(args.repeats):  # interleaved, best of repeats
            for batch in times:
                t0 = time.perf_counter()
                run_all(hf, prompts, batch, args.new)
                times[batch].append(time.perf_counter() - t0)
        for batch, ts in times.items():
            s = min(ts)
            print(json.dumps({"preset": args.preset, "span": span, "batch": batch, "prompts": args.prompts,
                              "prompt_lengths": f"{min(lengths)}-{max(lengths)}", "new_tokens": args.new,
                              "tok_s": round(args.prompts * args.new / s, 1),
                              "vs_batch1": round(min(times[1]) / s, 2), "threads": args.threads,
                              "cpu": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
