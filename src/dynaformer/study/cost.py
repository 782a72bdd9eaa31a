"""Cost where spans matter: every trained model's training step and decoding, timed at long lengths.

A span pays only once the sequence is much longer than the span, so the cost options of the seed
questions are judged here, not by the ms/step a cell logged at its (short) training context. The
report step loads each cell's trained model and times, interleaved round-robin over all models so
that drifts of the machine's speed hit every variant alike:

- `train_ms`:  one forward + backward (span penalty included) of a length-T sequence of held-out text,
               batch 1; the optimizer step is left out (its cost does not depend on T);
- `decode_ms`: one greedy decoding step with the KV cache after a prefill of T tokens;
- `kv_bytes`:  the KV cache's bytes after the prefill.

Each model runs with its own learned spans on real text (spans depend on the content). The lengths
are `eval.cost_lengths` of the grid (default 1024, 2048, 4096) plus the training context.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..errors import ConfigError
from ..model import ModelConfig, Transformer
from ..model.memory import step_bytes
from ..resources import available_memory
from ..timing import time_interleaved

DECODE_TOKENS = 8  # greedy steps per timed decoding call


def check_lengths(lengths: Sequence[int], cfgs: Sequence[ModelConfig] = ()) -> None:
    """Refuse, naming it, a cost length whose training step would not fit in half the available memory."""
    avail = available_memory()
    if avail is None:
        return
    for cfg in cfgs:
        for T in lengths:
            need = step_bytes(cfg, T)
            if need > avail // 2:
                raise ConfigError(f"grid.eval.cost_lengths: length {T} needs about {need / 2**30:.1f} GiB for a "
                                  f"training step of this model; this machine has {avail / 2**30:.1f} GiB available")


def check_study_memory(cfgs: Sequence[tuple[ModelConfig, object]], ev: dict) -> None:
    """Refuse, naming the length, a grid whose training batches or long-text evaluation (the largest multiple of
    the context, one pass) would not fit in the available memory, before anything trains. Cells that train
    on a GPU are not checked against this machine's memory."""
    avail = available_memory()
    if avail is None:
        return
    for cfg, tcfg in cfgs:
        if tcfg.device.startswith("cuda") or (tcfg.device == "auto" and torch.cuda.is_available()):
            continue
        C = cfg.context_len
        T = max(ev["multiples"]) * C
        uses = [(f"training at context {C} (batch {tcfg.batch_size})", tcfg.batch_size * step_bytes(cfg, C)),
                (f"the long-text evaluation at length {T} ({max(ev['multiples'])}x the context)",
                 max(1, ev["batch_size"] // max(ev["multiples"])) * step_bytes(cfg, T))]
        if tcfg.short_context:
            rows = tcfg.batch_size * C // tcfg.short_context
            uses.append((f"staged training at length {tcfg.short_context} (batch {rows})",
                         rows * step_bytes(cfg, tcfg.short_context)))
        for what, need in uses:
            if need > avail:
                raise ConfigError(f"grid: {what} needs about {need / 2**30:.1f} GiB; this machine has "
                                  f"{avail / 2**30:.1f} GiB available")


def _tokens(text: np.ndarray, T: int, vocab: int) -> torch.Tensor:
    """(1, T + 1) token ids: held-out text, repeated when it is shorter than T + 1."""
    text = np.asarray(text).astype(np.int64) % vocab
    reps = -(-(T + 1) // max(1, len(text)))
    return torch.from_numpy(np.tile(text, reps)[: T + 1].copy())[None]


def _train_fn(model: Transformer, seq: torch.Tensor):
    x, y = seq[:, :-1], seq[:, 1:]

    def step():
        model.train()
        _, loss = model(x, y)
        (loss + model.aux_loss()).backward()
        model.zero_grad(set_to_none=True)

    return step


def train_stages(train: dict, context_len: int) -> list[tuple[int, int, int]]:
    """The shapes a cell trained on, as (steps, rows, length) per stage: with staged context the first
    `short_steps` steps take rows of `short_context` tokens, as many tokens per step as the full rows
    (data/dataset.py StagedSampler); micro-batches (grad_accum) count as rows."""
    B = int(train["batch_size"]) * int(train.get("grad_accum") or 1)
    total = int(train["max_steps"])
    short, S = int(train.get("short_context") or 0), int(train.get("short_steps") or 0)
    stages = []
    if short and S:
        stages.append((min(S, total), B * context_len // short, short))
    if total > S or not stages:
        stages.append((total - (S if stages else 0), B, context_len))
    return stages


def _step_fn(model: Transformer, text: np.ndarray, rows: int, T: int):
    """One training step at a stage's shape: forward + backward (span penalty included) of (rows, T) held-out
    tokens and an AdamW update at learning rate 0 (the arithmetic runs, the weights stay as trained)."""
    seq = _tokens(text, rows * (T + 1) - 1, model.cfg.vocab_size).view(rows, T + 1)
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0)

    def step():
        model.train()
        _, loss = model(x, y)
        (loss + model.aux_loss()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_stages(models: dict[str, Transformer], text: np.ndarray, stages: dict[str, list[tuple[int, int, int]]],
                   threads: int, repeats: int = 3, warmup: int = 1) -> dict[str, list[float]]:
    """ms per training step of every model at each of its stages' shapes, interleaved round-robin over the
    models and timed with the threads the cells trained with. This is the study's side-by-side training clock:
    the ms/step a cell logged depends on whatever else ran on the machine meanwhile, these do not."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        out: dict[str, list[float]] = {k: [] for k in models}
        n = max(len(v) for v in stages.values())
        for i in range(n):
            fns = {k: _step_fn(m, text, stages[k][i][1], stages[k][i][2]) for k, m in models.items()
                   if i < len(stages[k])}
            for k, sec in time_interleaved(fns, repeats, warmup).items():
                out[k].append(1000 * sec)
            del fns
    finally:
        torch.set_num_threads(before)
        for m in models.values():
            m.zero_grad(set_to_none=True)
            m.eval()
    return out


def _decode_fn(model: Transformer, seq: torch.Tensor, calls: int):
    """A prefilled cache and a function that decodes DECODE_TOKENS greedy tokens per call."""
    T = seq.shape[1] - 1
    model.eval()
    cache = model.new_cache(1, T + DECODE_TOKENS * (calls + 1) + 1)
    with torch.no_grad():
        logits, _ = model(seq[:, :T], cache=cache)
    state = {"tok": logits[:, -1:].argmax(-1)}

    @torch.no_grad()
    def decode():
        tok = state["tok"]
        for _ in range(DECODE_TOKENS):
            logits, _ = model(tok, cache=cache)
            tok = logits[:, -1:].argmax(-1)
        state["tok"] = tok

    return decode, cache


def measure_cost(models: dict[str, Transformer], text: np.ndarray, lengths: Sequence[int], repeats: int = 3,
                 warmup: int = 1) -> dict:
    """Time every model at every length, interleaved. Returns {"lengths", "threads", "cpu", "repeats",
    "models": {key: {"train_ms": [...], "decode_ms": [...], "kv_bytes": [...]}}} (one entry per length)."""
    lengths = sorted({int(T) for T in lengths})
    out = {key: {"train_ms": [], "decode_ms": [], "kv_bytes": []} for key in models}
    for T in lengths:
        train, decode, caches = {}, {}, {}
        for key, model in models.items():
            seq = _tokens(text, T, model.cfg.vocab_size)
            train[key] = _train_fn(model, seq)
            decode[key], caches[key] = _decode_fn(model, seq, warmup + repeats)
        for key, sec in time_interleaved(train, repeats, warmup).items():
            out[key]["train_ms"].append(1000 * sec)
        for key, sec in time_interleaved(decode, repeats, warmup).items():
            out[key]["decode_ms"].append(1000 * sec / DECODE_TOKENS)
        for key, cache in caches.items():
            out[key]["kv_bytes"].append(int(cache.nbytes()))
        del caches, decode, train
    for model in models.values():
        model.eval()
    return {"lengths": lengths, "threads": torch.get_num_threads(), "cpu": torch.backends.cpu.get_cpu_capability(),
            "repeats": repeats, "decode_tokens": DECODE_TOKENS, "models": out}


def crossover(lengths: Sequence[int], ref_ms: Sequence[float], var_ms: Sequence[float]) -> dict:
    """Where the variant becomes cheaper than the reference: {"speedup": [ref/var per length], "at": the
    first measured length from which it stays ≥ 1 (None if never), "between": (last slower, first faster)
    lengths or None}."""
    speed = [r / v if v else float("nan") for r, v in zip(ref_ms, var_ms, strict=True)]
    at = None
    for i in range(len(speed)):
        if all(s >= 1 for s in speed[i:]):
            at = lengths[i]
            break
    between = None
    if at is not None and at != lengths[0]:
        i = list(lengths).index(at)
        between = (lengths[i - 1], at)
    return {"speedup": speed, "at": at, "between": between}
