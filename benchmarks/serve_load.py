"""Load test of `dynaformer serve` on loopback: a dense and a span model (random weights of a study-like shape,
4,096-token context), each served by its own `dynaformer serve` process under one KV budget, then N concurrent
streaming clients × M requests each. Reports p50/p95 time to first token, inter-token latency, aggregate
tokens/s, the most sequences decoded at once and the KV budget's capacity (sessions of the full context), and
checks that active sequences and KV bytes return to zero and that SIGTERM ends each server with exit code 0.

First, the design choice behind the server's batching (docs/design.md §11): one decode step's attention over B
sequences of different lengths, run per sequence against its own cache (what the server does) or as one masked
SDPA over a padded slot batch (the cache buffers taken as already padded, so the copy is not counted).

    python benchmarks/serve_load.py                       # 32 clients × 20 requests, both models
    python benchmarks/serve_load.py --clients 4 --requests 2 --time_limit 60   # a quick look
    python benchmarks/serve_load.py --skip_attention --clients 0 --choices 4    # n = 4 vs 4 requests; cache dtypes

Also, per model: the sessions of the full context one GiB of KV cache admits with an fp32 and a bf16 cache
(`--cache_dtype`, from the engine's own sizes), and with --choices N, one sampled request with n = N against N
concurrent one-choice requests seeded seed .. seed + N − 1 (the same N texts, checked; the request with n
prefills its prompt once), alternated for --choices_rounds rounds on one server.

Loopback only; bounded by --requests per client and by --time_limit seconds per model (clients stop sending
after it). Results: benchmarks/RESULTS.md, "Serving under load".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dynaformer.configtools import to_dict
from dynaformer.data.tokenizers import ByteTokenizer
from dynaformer.model import ModelConfig, Transformer
from dynaformer.serve.engine import Engine
from dynaformer.timing import time_interleaved
from dynaformer.train.checkpoint import save_checkpoint

SHAPE = dict(vocab_size=256, context_len=4096, n_layer=4, n_head=8, d_model=256)
MODELS = {"dense": dict(SHAPE), "span": dict(SHAPE, span="per_head", span_max=128, span_ramp=32, span_init=64.0)}


def attention_choice(batch: int = 32, heads: int = 8, head_dim: int = 32, longest: int = 4096, repeats: int = 30,
                     seed: int = 0) -> dict:
    """Per-sequence SDPA against each sequence's own keys vs one masked SDPA over a padded slot batch."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(math.exp(random.Random(seed + b).uniform(math.log(64), math.log(longest)))) for b in range(batch)]
    q = torch.randn(batch, heads, 1, head_dim, generator=g)
    own = [(torch.randn(1, heads, n, head_dim, generator=g), torch.randn(1, heads, n, head_dim, generator=g))
           for n in lengths]
    L = max(lengths)
    kp = torch.zeros(batch, heads, L, head_dim)
    vp = torch.zeros_like(kp)
    mask = torch.zeros(batch, 1, 1, L, dtype=torch.bool)
    for b, (k, v) in enumerate(own):
        kp[b, :, L - lengths[b]:], vp[b, :, L - lengths[b]:] = k[0], v[0]
        mask[b, ..., L - lengths[b]:] = True

    def per_row() -> torch.Tensor:
        return torch.cat([F.scaled_dot_product_attention(q[b : b + 1], k, v) for b, (k, v) in enumerate(own)])

    def padded() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, kp, vp, attn_mask=mask)

    torch.testing.assert_close(per_row(), padded(), rtol=1e-4, atol=1e-5)
    t = time_interleaved({"per_row": per_row, "padded": padded}, repeats)
    return {"batch": batch, "lengths": f"{min(lengths)}..{L} (mean {sum(lengths) / batch:.0f})",
            "per_row_ms": round(1e3 * t["per_row"], 3), "padded_ms": round(1e3 * t["padded"], 3),
            "padded_over_per_row": round(t["padded"] / t["per_row"], 2),
            "padded_key_reads_over_needed": round(batch * L / sum(lengths), 2)}


def make_run(folder: Path, model: dict) -> Path:
    torch.manual_seed(0)
    cfg = ModelConfig(**model)
    net = Transformer(cfg)
    save_checkpoint(folder, 1, net.state_dict(), {"model": to_dict(cfg), "tokenizer": ByteTokenizer().to_dict()},
                    {"step": 1})
    return folder


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def scrape(client, url: str) -> dict[str, float]:
    text = (await client.get(url + "/metrics")).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(dynaformer_\w+) (\S+)$", text, re.M)}


async def load(url: str, clients: int, requests: int, prompt_range: tuple[int, int], max_tokens: int,
               time_limit: float, seed: int) -> dict:
    import httpx

    ttft: list[float] = []
    itl: list[float] = []
    tokens = 0
    failed: list[str] = []
    peak = {"active": 0.0, "kv": 0.0, "queue": 0.0}
    stop_at = time.monotonic() + time_limit
    done_requests = 0

    async def one_client(c: int, http) -> None:
        nonlocal tokens, done_requests
        rng = random.Random(seed * 1000 + c)
        for _ in range(requests):
            if time.monotonic() > stop_at:
                return
            n = int(math.exp(rng.uniform(math.log(prompt_range[0]), math.log(prompt_range[1]))))
            prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(n))
            body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}}
            t0 = time.perf_counter()
            last = None
            async with http.stream("POST", url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    failed.append(f"{r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "usage" in event and event.get("usage"):
                        tokens += event["usage"]["completion_tokens"]
                        continue
                    if not event["choices"] or not event["choices"][0]["text"]:
                        continue
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - t0)
                    else:
                        itl.append(now - last)
                    last = now
            done_requests += 1

    async def watch(http) -> None:
        while True:
            m = await scrape(http, url)
            peak["active"] = max(peak["active"], m["dynaformer_active_sequences"])
            peak["kv"] = max(peak["kv"], m["dynaformer_kv_bytes_in_use"])
            peak["queue"] = max(peak["queue"], m["dynaformer_queue_length"])
            await asyncio.sleep(0.25)

    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        watcher = asyncio.create_task(watch(http))
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(c, http) for c in range(clients)))
        wall = time.perf_counter() - t0
        watcher.cancel()
        await asyncio.sleep(0.5)
        after = await scrape(http, url)
    return {"requests_done": done_requests, "failed": len(failed), "first_failures": failed[:3],
            "wall_s": round(wall, 1), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_ms": round(1e3 * percentile(ttft, 50), 1), "ttft_p95_ms": round(1e3 * percentile(ttft, 95), 1),
            "itl_p50_ms": round(1e3 * percentile(itl, 50), 1), "itl_p95_ms": round(1e3 * percentile(itl, 95), 1),
            "peak_active_sequences": int(peak["active"]), "peak_queue": int(peak["queue"]),
            "peak_kv_mib": round(peak["kv"] / 2**20, 1),
            "kv_mib_per_context_sequence": round(after["dynaformer_kv_bytes_per_context_sequence"] / 2**20, 2),
            "sessions_at_full_context": int(after["dynaformer_kv_max_sessions"]),
            "sessions_per_gib": int(2**30 // after["dynaformer_kv_bytes_per_context_sequence"]),
            "active_after": int(after["dynaformer_active_sequences"]),
            "kv_bytes_after": int(after["dynaformer_kv_bytes_in_use"])}


def sessions_per_gib(model: Transformer) -> dict:
    """Full-context sessions one GiB of KV cache admits, per cache dtype (the engine's own sizes)."""
    return {name: Engine(model, str, 2**30, cache_dtype=dtype).max_sessions()
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


async def choices_vs_separate(url: str, n: int, prompt_len: int, max_tokens: int, rounds: int, seed: int) -> dict:
    """One request with n sampled choices vs n concurrent one-choice requests seeded seed + j: the same texts
    (checked), wall time per round, alternating which goes first."""
    import httpx

    rng = random.Random(seed)
    walls: dict[str, list[float]] = {"n": [], "separate": []}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=n + 4)) as http:

        async def post(prompt: str, s: int, k: int) -> list[str]:
            body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": s, "n": k}
            r = await http.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            return [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]

        for i in range(rounds):
            prompt = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(prompt_len))
            texts = {}
            for way in (("n", "separate") if i % 2 == 0 else ("separate", "n")):
                t0 = time.perf_counter()
                if way == "n":
                    texts[way] = await post(prompt, seed + i, n)
                else:
                    texts[way] = [t for ts in await asyncio.gather(*(post(prompt, seed + i + j, 1) for j in range(n)))
                                  for t in ts]
                walls[way].append(time.perf_counter() - t0)
            if texts["n"] != texts["separate"]:
                raise SystemExit(f"round {i}: n = {n} choices differ from the {n} seeded single requests")
    med = {k: sorted(v)[len(v) // 2] for k, v in walls.items()}
    return {"n": n, "prompt_bytes": prompt_len, "max_tokens": max_tokens, "rounds": rounds,
            "n_ms_median": round(1e3 * med["n"], 1), "separate_ms_median": round(1e3 * med["separate"], 1),
            "n_tokens_per_s": round(n * max_tokens / med["n"], 1),
            "separate_tokens_per_s": round(n * max_tokens / med["separate"], 1),
            "separate_over_n": round(med["separate"] / med["n"], 2), "texts_equal": True}


def serve_process(run: Path, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "dynaformer.entry", "serve", str(run), "--port", "0", "--model_name", "m",
           "--kv_budget_mb", str(args.kv_budget_mb), "--max_batch", str(args.max_batch), "--max_queue", "4096",
           "--threads", str(args.threads), "--cache_dtype", args.cache_dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://[\d.:]+)/v1", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, match.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--prompt_min", type=int, default=32)
    ap.add_argument("--prompt_max", type=int, default=2048, help="prompt lengths: log-uniform in [min, max] bytes")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--kv_budget_mb", type=float, default=64.0)
    ap.add_argument("--max_batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--time_limit", type=float, default=300.0, help="seconds per model after which clients stop")
    ap.add_argument("--models", default="dense,span")
    ap.add_argument("--skip_attention", action="store_true")
    ap.add_argument("--cache_dtype", default="auto", help="the servers' KV cache dtype: auto, fp32, bf16, fp16")
    ap.add_argument("--choices", type=int, default=0, help="N > 1: time one request with n = N vs N requests")
    ap.add_argument("--choices_rounds", type=int, default=8)
    ap.add_argument("--choices_prompt", type=int, default=1024, help="prompt bytes of the n-choices rounds")
    args = ap.parse_args()
    cpu = torch.backends.cpu.get_cpu_capability()
    print(json.dumps({"cpu": cpu, "date": time.strftime("%Y-%m-%d"), "args": vars(args)}), flush=True)
    if not args.skip_attention:
        torch.set_num_threads(args.threads)
        print(json.dumps({"what": "attention_choice", "cpu": cpu, **attention_choice()}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            run = make_run(Path(tmp) / name, MODELS[name])
            torch.set_num_threads(args.threads)
            sessions = sessions_per_gib(Transformer(ModelConfig(**MODELS[name])))
            print(json.dumps({"what": "sessions_per_gib", "model": name, "cpu": cpu, **sessions}), flush=True)
            proc, url = serve_process(run, args)
            try:
                if args.choices > 1:
                    result = asyncio.run(choices_vs_separate(url, args.choices, args.choices_prompt,
                                                             args.max_tokens, args.choices_rounds, seed=0))
                    print(json.dumps({"what": "n_choices", "model": name, "cpu": cpu, **result}), flush=True)
                if args.clients > 0:
                    result = asyncio.run(load(url, args.clients, args.requests, (args.prompt_min, args.prompt_max),
                                              args.max_tokens, args.time_limit, seed=0))
            finally:
                proc.send_signal(signal.SIGTERM)
                code = proc.wait(120)
            if args.clients > 0:
                print(json.dumps({"what": "load", "model": name, "cpu": cpu, **result, "exit_code": code}), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
