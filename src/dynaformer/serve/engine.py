"""The scheduler behind `dynaformer serve`: continuous (iteration-level) batching, no HTTP.

One thread owns the model. Each turn of its loop it admits waiting sequences while the KV budget and the batch
size allow (first come, first served), prefills each newcomer on its own (its own forward into its own cache,
exactly as `model.generate` does), then runs one decode step over every active sequence: a single forward
through `RaggedCache` (model/ragged.py) that batches the token-wise work and runs attention per sequence against
that sequence's cache (dense, or span-bounded where the model has spans). Finished, stopped and cancelled
sequences leave between steps and their caches are freed at once. Why this design: docs/design.md §11.

A sequence's KV bytes are known before it is admitted: its cache is allocated whole when it joins (a dense cache
for prompt + max_tokens positions, a span-bounded one for its reach), so the budget is never exceeded and
`kv_bytes_in_use` is exact.

`n` > 1 (OpenAI's n choices per prompt): the prompt's n sequences form a group, admitted together (all n caches
must fit the budget and the batch at once) and prefilled once: the first sequence's cache is filled by one forward
and copied into the others (`model/ragged.py:clone_cache`), and all n sample their first token from the same
logits, each with its own generator (choice j of a seeded request uses seed + j, `choice_seed`). From then on
they are independent sequences of the batch.

Callers get events through a sink called on the engine thread: ("text", delta), then ("done", finish_reason)
with finish_reason "stop", "length" or "cancelled", or ("error", message).
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..model import Transformer
from ..model.generate import sample_next
from ..model.ragged import RaggedCache, clone_cache, reserved_bytes

Event = tuple[str, str]
Sink = Callable[[Event], None]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None


def choice_seed(seed: int, j: int) -> int:
    """The seed of choice j of a request seeded with `seed`: seed + j, taken mod 2⁶⁴ as torch takes seeds (so
    choice 0 is the request's own seed, and choice j samples what a one-choice request seeded seed + j would)."""
    return (seed + j) % 2**64


class Rejected(Exception):
    """A request the engine cannot take now: 429 (queue full) or 503 (draining), with a Retry-After."""

    def __init__(self, status: int, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class TextStream:
    """Generated token ids → text deltas. Holds back the bytes of an unfinished UTF-8 character (a byte or BPE
    token may end mid-character) and any tail that could still become a stop string; a stop string ends the
    text before it (OpenAI's `stop`: the stop string itself is not returned)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self.decode, self.stop = decode, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.pending: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; the text that may be sent now."""
        self.pending.append(token)
        piece = self.decode(self.pending)
        if piece.endswith("\ufffd") and len(self.pending) < 4:  # a character's first bytes: wait for the rest
            return ""
        self.pending = []
        return self._add(piece)

    def flush(self) -> str:
        """The end of generation: whatever is still held back."""
        piece, self.pending = (self.decode(self.pending) if self.pending else ""), []
        out = self._add(piece)
        if not self.stopped:
            out += self.text[self.sent :]
            self.sent = len(self.text)
        return out

    def _add(self, piece: str) -> str:
        if self.stopped:
            return ""
        first = max(0, len(self.text) - self.hold)  # a stop string may begin in the held-back tail
        self.text += piece
        hits = [i for i in (self.text.find(s, first) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            end = len(self.text)
        else:
            end = len(self.text) - self.hold
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out


class Sequence:
    """One prompt being completed: its tokens, cache, sampler state and text stream."""

    def __init__(self, prompt: list[int], params: SamplingParams, kv_bytes: int, sink: Sink,
                 decode: Callable[[list[int]], str], choice: int = 0) -> None:
        self.prompt, self.params, self.kv_bytes, self.sink = prompt, params, kv_bytes, sink
        self.tokens: list[int] = []
        self.cache = None
        seed = choice_seed(params.seed, choice) if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed) if params.temperature > 0 else None
        self.stream = TextStream(decode, params.stop)
        self.cancelled = False
        self.finish: str | None = None  # set once, on the engine thread


class Engine:
    """Continuous batching over one model. `submit` and `cancel` may be called from any thread."""

    def __init__(self, model: Transformer, decode: Callable[[list[int]], str], kv_budget_bytes: int,
                 max_batch: int = 64, max_queue: int = 256, cache_dtype: torch.dtype | None = None) -> None:
        self.model = model.eval()
        self.cache_dtype = cache_dtype  # the KV cache's (None: the model's); sizes below are measured in it
        self.kv_dtype = cache_dtype or next(model.parameters()).dtype
        self.decode = decode
        self.context_len = model.cfg.context_len
        self.kv_budget = int(kv_budget_bytes)
        self.max_batch, self.max_queue = max_batch, max_queue
        # A cache's bytes are a fixed part (span-bounded layers) plus a part per position (dense layers):
        # measured on two empty caches here, before the engine thread owns the model.
        one, two = (reserved_bytes(model.new_cache(1, n, dtype=cache_dtype)) for n in (1, 2))
        self._kv_per_position, self._kv_fixed = two - one, 2 * one - two
        model.new_cache(1, self.context_len)  # the position tables for the whole context, built now
        with torch.no_grad():  # a first prefill and step now: a kernel built on first use delays no client
            n = max(1, min(self.context_len - 1, 512))
            cache = model.new_cache(1, n + 1, dtype=cache_dtype)
            model.hidden(torch.zeros(1, n, dtype=torch.long), cache)
            model.hidden(torch.zeros(1, 1, dtype=torch.long), RaggedCache([cache]))
        self._cond = threading.Condition()
        self._waiting: deque[list[Sequence]] = deque()  # groups: a prompt's n choices join together
        self._n_waiting = 0  # sequences in those groups
        self._active: list[Sequence] = []
        self.kv_in_use = 0
        self.tokens_total = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=4096)  # (time, tokens) per step, for tokens/s
        self.draining = False
        self._deadline = float("inf")
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dynaformer-engine", daemon=True)

    # --- sizes -------------------------------------------------------------------------------------------

    def kv_bytes(self, positions: int) -> int:
        """Bytes of the cache of one sequence of up to `positions` tokens (prompt + max_tokens)."""
        return self._kv_fixed + self._kv_per_position * positions

    def max_sessions(self) -> int:
        """How many sequences of the full context the budget admits at once."""
        return self.kv_budget // max(1, self.kv_bytes(self.context_len))

    # --- called from the server's threads ------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompts: list[list[int]], params: SamplingParams, sinks: list[Sink], n: int = 1) -> list[Sequence]:
        """Queue n sequences per prompt (sinks and the result in OpenAI's choice order: prompt i's choice j is
        i * n + j), or raise `Rejected` (nothing queued). Sizes are the caller's to check (each prompt +
        max_tokens within the context, a prompt's n caches within the budget, n within the batch)."""
        if len(sinks) != len(prompts) * n:
            raise ValueError(f"submit: {len(prompts)} prompts × n = {n} need {len(prompts) * n} sinks, "
                             f"got {len(sinks)}")
        with self._cond:
            if self.draining or self._stop:
                raise Rejected(503, "the server is shutting down; send the request to another instance", 5)
            if self._n_waiting + len(sinks) > self.max_queue:
                raise Rejected(429, f"the server is busy ({self._n_waiting} sequences wait for "
                                    f"{self.max_queue} places); retry later", 1)
            groups = [[Sequence(p, params, self.kv_bytes(len(p) + params.max_tokens), sinks[i * n + j], self.decode, j)
                       for j in range(n)] for i, p in enumerate(prompts)]
            self._waiting.extend(groups)
            self._n_waiting += len(sinks)
            self._cond.notify()
        return [s for g in groups for s in g]

    def cancel(self, seqs: list[Sequence]) -> None:
        """Stop these sequences (a client went away): they leave, and free their caches, at the next step."""
        for s in seqs:
            s.cancelled = True
        with self._cond:
            self._cond.notify()

    def drain(self, seconds: float) -> None:
        """Refuse new requests; cancel whatever has not finished `seconds` from now."""
        with self._cond:
            self.draining = True
            self._deadline = min(self._deadline, time.monotonic() + seconds)
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def snapshot(self) -> dict[str, float]:
        """The numbers /metrics shows."""
        now = time.monotonic()
        with self._cond:
            recent = [(t, n) for t, n in self._recent if t > now - 10.0]
            out = {"queue_length": self._n_waiting, "active_sequences": len(self._active),
                   "kv_bytes_in_use": self.kv_in_use, "tokens_total": self.tokens_total}
        span = now - recent[0][0] if recent else 0.0
        out["tokens_per_second"] = sum(n for _, n in recent) / max(span, 1.0) if recent else 0.0
        return out

    # --- the engine thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._active or self._stop):
                    self._cond.wait(None if self._deadline == float("inf") else 0.5)
                if self._stop or time.monotonic() >= self._deadline:
                    self._cancel_all_locked()
                    if self._stop:
                        return
                joining = self._admit_locked()
            try:
                with torch.no_grad():
                    for group in joining:
                        self._prefill(group)
                    self._retire()
                    if self._active:
                        self._step()
            except Exception as e:  # a failed forward fails its sequences, never the server
                for s in list(self._active):
                    if s.finish is None:
                        s.finish = "error"
                        s.sink(("error", f"generation failed: {type(e).__name__}: {e}"))
            self._retire()

    def _admit_locked(self) -> list[list[Sequence]]:
        """The groups that join now, whole (a prompt's n choices join together or wait together)."""
        joining = []
        while self._waiting:
            group = self._waiting[0]
            for s in group:
                if s.cancelled and s.finish is None:
                    self._end(s, "cancelled")
            live = [s for s in group if not s.cancelled]
            need = sum(s.kv_bytes for s in live)
            if not live:
                self._waiting.popleft()
                self._n_waiting -= len(group)
                continue
            if need > self.kv_budget or len(live) > self.max_batch:
                self._waiting.popleft()
                self._n_waiting -= len(group)
                for s in live:  # could never fit (callers check this first)
                    s.finish = "error"
                    s.sink(("error", f"the request needs {need} bytes of KV cache and {len(live)} batch places at "
                                     f"once, over the whole budget ({self.kv_budget}) or batch ({self.max_batch})"))
                continue
            if len(self._active) + len(live) > self.max_batch or self.kv_in_use + need > self.kv_budget:
                break  # first come, first served: the head waits for room
            self._waiting.popleft()
            self._n_waiting -= len(group)
            self.kv_in_use += need
            self._active.extend(live)
            joining.append(live)
        return joining

    def _prefill(self, group: list[Sequence]) -> None:
        """The newcomers' prompt in its own forward, into the first one's cache (as model.generate does); the other
        choices of the prompt get copies of that cache and sample from the same logits with their own generators."""
        live = [s for s in group if not s.cancelled]
        if not live:
            return
        model, lead = self.model, live[0]
        lead.cache = model.new_cache(1, min(self.context_len, len(lead.prompt) + lead.params.max_tokens),
                                     dtype=self.cache_dtype)
        ids = torch.tensor([lead.prompt])
        logits = model.head(model.hidden(ids, lead.cache)[:, -1])
        for s in live[1:]:
            s.cache = clone_cache(lead.cache)
        self._sample(live, logits.expand(len(live), -1))

    def _step(self) -> None:
        """One decode step: a single forward over every active sequence's last token."""
        rows = [s for s in self._active if s.finish is None and not s.cancelled]
        if not rows:
            return
        model = self.model
        ids = torch.tensor([[s.tokens[-1]] for s in rows])
        self._sample(rows, model.head(model.hidden(ids, RaggedCache([s.cache for s in rows]))[:, -1]))

    def _sample(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()
        with self._cond:  # counted before any event goes out: a client that got its answer sees it in /metrics
            self.tokens_total += len(rows)
            self._recent.append((time.monotonic(), len(rows)))
        for i, s in enumerate(rows):
            p = s.params
            tok = greedy[i] if p.temperature <= 0 else int(
                sample_next(logits[i : i + 1], p.temperature, p.top_k, p.top_p, s.generator))
            s.tokens.append(tok)
            delta = s.stream.push(tok)
            reason = "stop" if s.stream.stopped else ("length" if len(s.tokens) >= p.max_tokens else None)
            if reason == "length":
                delta += s.stream.flush()
            if delta:
                s.sink(("text", delta))
            if reason is not None:
                s.finish = reason
                s.sink(("done", reason))

    def _retire(self) -> None:
        """Finished and cancelled sequences leave; their caches go with them."""
        with self._cond:
            keep = []
            for s in self._active:
                if s.finish is None and not s.cancelled:
                    keep.append(s)
                    continue
                self.kv_in_use -= s.kv_bytes
                s.cache = None
                if s.finish is None:
                    self._end(s, "cancelled")
            self._active = keep

    def _cancel_all_locked(self) -> None:
        for s in [s for g in self._waiting for s in g] + self._active:
            s.cancelled = True
            if s.finish is None:
                self._end(s, "cancelled")
        self._waiting.clear()
        self._n_waiting = 0
        for s in self._active:
            self.kv_in_use -= s.kv_bytes
            s.cache = None
        self._active = []

    @staticmethod
    def _end(s: Sequence, reason: str) -> None:
        s.finish = reason
        s.sink(("done", reason))
