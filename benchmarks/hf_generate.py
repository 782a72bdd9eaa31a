"""Greedy generation through the transformers wrapper vs dynaformer's own sampler (same model, same
tokens), and the cost of the wrapper's cache-rebuilding beam search.

    python benchmarks/hf_generate.py --preset tiny-cpu --prompt 64 --new 128 --threads 1

Prints one JSON object per measurement; ratios are what to compare (the variants run interleaved).
"""

from __future__ import annotations

import argparse
import json

import torch

from dynaformer.bench.common import preset, time_interleaved
from dynaformer.hf import DynaformerForCausalLM
from dynaformer.model import Transformer
from dynaformer.model.generate import generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny-cpu")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset)
    model = Transformer(cfg).eval()
    hf = DynaformerForCausalLM.from_dynaformer(model).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt))
    n, max_len = args.new, args.prompt + args.new
    ref = generate(model, prompt, n, temperature=0, max_len=max_len)
    assert torch.equal(hf.generate(prompt, max_new_tokens=n, do_sample=False), ref)
    fns = {
        "ours_cached": lambda: generate(model, prompt, n, temperature=0, max_len=max_len),
        "hf_cached": lambda: hf.generate(prompt, max_new_tokens=n, do_sample=False),
        "hf_uncached": lambda: hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=False),
    }
    t = time_interleaved(fns, repeats=args.repeats, warmup=1)
    base = {"preset": args.preset, "prompt": args.prompt, "new_tokens": n, "threads": args.threads,
            "torch": torch.__version__}
    for name, s in t.items():
        print(json.dumps({**base, "variant": name, "tok_s": round(n / s, 1),
                          "vs_ours_cached": round(t["ours_cached"] / s, 3)}))
    nb = max(8, n // 8)
    beams = {
        "hf_beam3_cached": lambda: hf.generate(prompt, max_new_tokens=nb, do_sample=False, num_beams=3),
        "hf_beam3_uncached": lambda: hf.generate(prompt, max_new_tokens=nb, do_sample=False, num_beams=3,
                                                 use_cache=False),
    }
    tb = time_interleaved(beams, repeats=max(2, args.repeats // 2), warmup=1)
    for name, s in tb.items():
        print(json.dumps({**base, "new_tokens": nb, "variant": name, "tok_s": round(nb / s, 1),
                          "vs_uncached": round(tb["hf_beam3_uncached"] / s, 3)}))


if __name__ == "__main__":
    main()
