"""Cached greedy decoding after a long context: our dense model vs transformers' `LlamaForCausalLM` of the same
shape (4 layers, 256 wide, 8 heads, MLP ≈ 0.5 M weights per layer, tied 256-token vocabulary, random weights).

    python benchmarks/decode_vs_llama.py --context 4096 --threads 2 --repeats 10 [--tensor_ops] [--bf16_cache]

Each model prefills the same `--context` random tokens into its own KV cache (ours: `Transformer.new_cache`;
Llama: the `DynamicCache` its `generate()` uses), then both decode greedily, one token per forward, in the same
loop (`--per_call` tokens per timed call, calls interleaved round-robin, median). Prints one JSON object with
tokens/s of each and the ratio, the CPU kind and the load average; only the ratio carries across machines.
`--tensor_ops` adds our model decoding with tensor ops only (the compiled decoding step off, as before it
existed); `--bf16_cache` adds it with a bf16 KV cache (opt-in: the logits move by the keys' rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import torch

from dynaformer.bench.common import time_interleaved
from dynaformer.kernels import decode_with_tensor_ops
from dynaformer.model import ModelConfig, Transformer


def llama(context: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=682,
                      tie_word_embeddings=True, vocab_size=256, max_position_embeddings=context)
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--per_call", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tensor_ops", action="store_true", help="also time ours with tensor ops only")
    ap.add_argument("--bf16_cache", action="store_true", help="also time ours with a bf16 KV cache")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: process CPU time (steadier on a shared machine; use --threads 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    capacity = args.context + args.per_call * (args.repeats + 2) + 1
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(n_layer=4, d_model=256, n_head=8, context_len=capacity)).eval()
    hf = llama(capacity)
    prompt = torch.randint(0, 256, (1, args.context))

    arms = {"ours": (torch.float32, False)}
    if args.tensor_ops:
        arms["ours_tensor_ops"] = (torch.float32, True)
    if args.bf16_cache:
        arms["ours_bf16_cache"] = (torch.bfloat16, False)
    fns, state, caches = {}, {}, {}
    for name, (dtype, plain) in arms.items():
        with decode_with_tensor_ops() if plain else contextlib.nullcontext():
            caches[name] = ours.new_cache(1, capacity, dtype=dtype)
            state[name] = ours(prompt, cache=caches[name])[0][:, -1:].argmax(-1)

        def decode_ours(name=name, plain=plain):
            tok, cache = state[name], caches[name]
            with decode_with_tensor_ops() if plain else contextlib.nullcontext():
                for _ in range(args.per_call):
                    tok = ours(tok, cache=cache)[0][:, -1:].argmax(-1)
            state[name] = tok

        fns[name] = decode_ours
    out = hf(input_ids=prompt, use_cache=True)
    hf_cache = getattr(out, "cache", None) or out.past_key_values
    state["llama"] = out.logits[:, -1:].argmax(-1)
    cache_arg = "cache" if getattr(out, "cache", None) is not None else "past_key_values"

    def decode_llama():
        tok = state["llama"]
        for _ in range(args.per_call):
            tok = hf(input_ids=tok, use_cache=True, **{cache_arg: hf_cache}).logits[:, -1:].argmax(-1)
        state["llama"] = tok

    fns["llama"] = decode_llama
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    t = time_interleaved(fns, args.repeats, warmup=1, clock=clock)
    import transformers

    extra = {}
    for name in arms:
        if name != "ours":
            extra[f"{name}_tok_s"] = round(args.per_call / t[name], 1)
            extra[f"{name}_ratio"] = round(t["llama"] / t[name], 3)
    print(json.dumps({"bench": "decode_vs_llama", "context": args.context, "threads": args.threads,
                      "clock": args.clock,
                      "ours_tok_s": round(args.per_call / t["ours"], 1),
                      "llama_tok_s": round(args.per_call / t["llama"], 1),
                      "ratio": round(t["llama"] / t["ours"], 3), **extra,
                      "cpu": torch.backends.cpu.get_cpu_capability(),
                      "load": round(os.getloadavg()[0], 2), "torch": torch.__version__,
                      "transformers": transformers.__version__}))


if __name__ == "__main__":
    main()
