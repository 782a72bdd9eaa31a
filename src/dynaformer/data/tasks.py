"""Generated long-range tasks with an exact, controllable distance between evidence and question.

Every example is `length + 1` bytes of ASCII (byte-level tokens): a model reads the first `length`
and predicts the next token at each position, so an example fills a context of `length`. Answers sit
at the very end. Each answer token has one evidence token earlier in the sequence that it copies; the
**distance** of an example is `answer_start − evidence_start` of its *probe* (the last answer), unless the
task states its own (summary: how far back the whole answer reaches), and is honoured exactly. Answers are
unique (the evidence determines them) and never leak: the answer string occurs in the prompt only as its
evidence (summary's places may also be visited by others: telling X's visits apart is the task). Tests
check all of this.

- `passkey`  (Mohtashami & Jaggi 2023): a 5-digit key hidden in filler text, asked for at the end.
- `mqar`     multi-query associative recall (Arora et al. 2023, "Zoology"): key→value pairs, then
             queries; the last query's pair lies at the chosen distance.
- `selcopy`  selective copying (Gu & Dao 2023, "Mamba"): K letters scattered in filler, to be copied
             in order after a marker; the first letter lies at the chosen distance.
- `storyqa`  bAbI-like QA (Weston et al. 2015, task 1): people move between places, with distractor
             moves and sentences; "Where is X?" at the end, the supporting fact at the chosen distance.
- `summary`  a storyqa-like story in which X moves K times; "Which places did X visit?" asks for the K
             places in order (scored on the whole list: exact match, token F1, ROUGE-L).

Generation is vectorised with numpy (a table lookup and a scatter per batch), deterministic in
(seed, task, length, distances), and far above 1M tokens/s (benchmarks/RESULTS.md).

Spec strings (`--data task:...`): `task:NAME[,NAME...][?key=value&...]`, NAME in TASKS or `suite`
(all of them; a name given twice gets twice the rows); keys: `len` (example length; default: the
model's context_len), `dist` (`D` or `LO-HI`; default: each task's full valid range, log-uniform), `frac`
(share of each batch made of task rows when mixed with text, and their share of the loss: each source's
targets are averaged separately; default 1), `text` (a text source to mix with, e.g. `builtin:default`;
its split is the run's validation text), `loss` (`answer`: targets only at answer tokens, the default;
`all`), `weight` (`token`: all answer targets averaged together, the default; `task`: each task's averaged on
its own and weighted by its share of the task rows), and the task parameters `digits` (passkey), `pairs`,
`queries` (mqar), `k` (selcopy), `visits` (summary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from ..errors import DynaformerError

TASK_PREFIX = "task:"
FILLER = "the grass is green. the sky is blue. the sun is warm. here we go. there and back again. "
_FILLER = np.frombuffer(FILLER.encode(), dtype=np.uint8)
DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)
UPPER = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
LETTERS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz", dtype=np.uint8)


@dataclass
class TaskBatch:
    """n examples of one task. tokens: (n, length + 1) uint8. answers: (n, Q) start positions of
    the Q answers (each `answer_len` tokens; at the same columns in every row); evidence: (n, Q, answer_len)
    position of the token each answer token copies; distance: (n,) = answer_start − evidence of the probe
    (the last answer), unless the task gives its own. listed: the answers form one list, a space between
    each two, that the model writes whole (the separators are training targets too)."""

    task: str
    tokens: np.ndarray
    answers: np.ndarray
    answer_len: int
    evidence: np.ndarray
    distance: np.ndarray | None = None
    listed: bool = False

    def __post_init__(self) -> None:
        if self.distance is None:
            self.distance = self.answers[:, -1] - self.evidence[:, -1, 0]

    def answer_positions(self, probe_only: bool = False) -> np.ndarray:
        """(n, Q·A) token positions of the answers (of the probe only, if asked)."""
        starts = self.answers[:, -1:] if probe_only else self.answers
        return (starts[:, :, None] + np.arange(self.answer_len)).reshape(len(starts), -1)

    def answer_region(self, probe_only: bool = False) -> np.ndarray:
        """(n, span) positions from the first answer (the probe, if asked) to the end of the example: all a
        model writes after the question, separators included (for probe-only scoring: the probe alone)."""
        start, N = int(self.answers[0, -1 if probe_only else 0]), self.tokens.shape[1]
        return np.arange(start, N)[None, :].repeat(len(self.tokens), 0)

    def inputs_targets(self, loss: str = "answer") -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs (n, length) and next-token targets (n, length); with loss='answer' every
        target that is not an answer token (nor, in a listed batch, a separator between answers) is -100
        (ignored by the loss)."""
        t = torch.from_numpy(self.tokens.astype(np.int64))
        x, y = t[:, :-1], t[:, 1:].clone()
        if loss == "answer":
            keep = torch.zeros_like(y, dtype=torch.bool)
            pos = torch.from_numpy((self.answer_region() if self.listed else self.answer_positions()) - 1)
            keep.scatter_(1, pos, True)
            y[~keep] = -100
        return x, y


def _filler(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    off = rng.integers(0, len(_FILLER), size=(n, 1))
    return _FILLER[(off + np.arange(width)) % len(_FILLER)]


def _rows(n: int) -> np.ndarray:
    return np.arange(n)[:, None]


def _put(out: np.ndarray, start: np.ndarray, text: bytes | np.ndarray) -> None:
    """Write `text` (bytes, or (n, w) array) into each row of out at column start[row]."""
    arr = np.frombuffer(text, dtype=np.uint8)[None, :] if isinstance(text, bytes) else text
    w = arr.shape[1]
    out[_rows(len(out)), start[:, None] + np.arange(w)] = arr


class Task:
    name = ""
    answer_alphabet: np.ndarray = DIGITS
    # Exact match is judged on the probe alone (mqar's earlier queries are not scored), or on all answers.
    probe_only = True
    # The answers are a list of words (summary's places): also scored by token F1 and ROUGE-L, on a greedy decode.
    word_list = False

    def distance_range(self, length: int) -> tuple[int, int]:
        raise NotImplementedError

    def chance(self) -> float:
        """Exact-match accuracy of guessing uniformly over the answer alphabet."""
        return float(len(self.answer_alphabet)) ** -self.answer_len

    answer_len = 1

    def check(self, length: int, distance: np.ndarray) -> None:
        lo, hi = self.distance_range(length)
        if hi < lo:
            raise DynaformerError(f"task {self.name}: length {length} is too short for this task")
        bad = (distance < lo) | (distance > hi)
        if bad.any():
            d = int(distance[bad][0])
            raise DynaformerError(f"task {self.name}: distance {d} is impossible at length {length} "
                                  f"(valid: {lo}..{hi})")

    def generate(self, n: int, length: int, distance: int | np.ndarray, seed: int | tuple = 0) -> TaskBatch:
        dist = np.broadcast_to(np.asarray(distance, dtype=np.int64), (n,)).copy()
        self.check(length, dist)
        rng = np.random.default_rng(list(_seed_words(seed, self.name, length)))
        return self._generate(rng, n, length + 1, dist)

    def _generate(self, rng: np.random.Generator, n: int, N: int, d: np.ndarray) -> TaskBatch:
        raise NotImplementedError


def _seed_words(seed: int | tuple, name: str, length: int) -> tuple[int, ...]:
    seed = seed if isinstance(seed, tuple) else (seed,)
    return (*[int(s) for s in seed], sum(ord(c) * 131**i for i, c in enumerate(name)) % (2**31), length)


class Passkey(Task):
    """filler … " KEY:ddddd. " … filler … " KEY:ddddd" (the answer: the last `digits` tokens, 5 by default
    as in the original task). The question repeats the evidence's prefix, as "The pass key is …" does there.
    A shorter key asks for the same retrieval over the same distances with less exact copying: a key's first
    digit follows the unique ":" and its last precedes ". ", but the digits between (10 symbols, repeats
    allowed) need an induction circuit that small models form late (benchmarks/RESULTS.md)."""

    name, answer_alphabet = "passkey", DIGITS

    def __init__(self, digits: int = 5) -> None:
        if not 1 <= digits <= 16:
            raise DynaformerError(f"task passkey: digits must be in 1..16, got {digits}")
        self.answer_len = digits

    def distance_range(self, length: int) -> tuple[int, int]:
        N, D = length + 1, self.answer_len
        return D + 7, N - D - 5  # evidence block " KEY:ddddd. " must fit between the start and the question

    def _generate(self, rng, n, N, d):
        D = self.answer_len
        out = _filler(rng, n, N)
        key = DIGITS[rng.integers(0, 10, size=(n, D))]
        a = np.full(n, N - D)
        e = a - d
        _put(out, e - 5, b" KEY:")
        _put(out, e, key)
        _put(out, e + D, b". ")
        _put(out, a - 5, b" KEY:")
        _put(out, a, key)
        evidence = (e[:, None] + np.arange(D))[:, None, :]
        return TaskBatch(self.name, out, a[:, None], D, evidence)


class MQAR(Task):
    """filler · P pairs "Kvv " · filler · "|" · Q queries " Kvv"; keys are distinct letters, values
    distinct 2-digit numbers; the last query asks for the pair at the chosen distance."""

    name, answer_len, answer_alphabet = "mqar", 2, DIGITS

    def __init__(self, pairs: int | None = None, queries: int = 4) -> None:
        if not 1 <= queries <= (pairs or 52) <= 52:
            raise DynaformerError(f"task mqar: need 1 ≤ queries ≤ pairs ≤ 52, got pairs={pairs}, queries={queries}")
        self.pairs, self.Q = pairs, queries

    def n_pairs(self, N: int) -> int:
        """The pairs given, or 16 when they take at most half of the example (fewer in short ones)."""
        return self.pairs or max(self.Q, min(16, (N - 1 - 4 * self.Q) // 8))

    def distance_range(self, length: int) -> tuple[int, int]:
        N, Q = length + 1, self.Q
        if 4 * self.n_pairs(N) + 4 * Q + 1 > N:
            return 1, 0  # too short
        # d = N − 3 − s − 4i with pair slot i ∈ [0, P), s ≥ 0 and s + 4P ≤ N − 1 − 4Q.
        return 4 * Q + 2, N - 3

    def _generate(self, rng, n, N, d):
        P, Q = self.n_pairs(N), self.Q
        # The probe's pair slot i: s = N − 3 − 4i − d must satisfy 0 ≤ s ≤ N − 1 − 4Q − 4P.
        lo = np.maximum(0, np.ceil((N - 3 - d - (N - 1 - 4 * Q - 4 * P)) / 4)).astype(np.int64)
        hi = np.minimum(P - 1, (N - 3 - d) // 4)
        if (lo > hi).any():
            bad = int(d[lo > hi][0])
            raise DynaformerError(f"task mqar: distance {bad} is impossible at length {N - 1} with {P} pairs "
                                  f"and {Q} queries")
        i = lo + (rng.random(n) * (hi - lo + 1)).astype(np.int64)
        s = N - 3 - 4 * i - d
        keys = np.argsort(rng.random((n, 52)), axis=1)[:, :P]
        vals = np.argsort(rng.random((n, 100)), axis=1)[:, :P]
        out = _filler(rng, n, N)
        slot = s[:, None] + 4 * np.arange(P)  # (n, P) start of each pair "Kvv "
        rows = _rows(n)
        out[rows, slot] = LETTERS[keys]
        out[rows, slot + 1] = DIGITS[vals // 10]
        out[rows, slot + 2] = DIGITS[vals % 10]
        out[rows, slot + 3] = ord(" ")
        q0 = N - 1 - 4 * Q
        out[:, q0] = ord("|")
        # Queried pairs: Q − 1 distinct others (random order), then the probe's pair i.
        others = np.argsort(rng.random((n, P)) + (np.arange(P)[None, :] == i[:, None]), axis=1)[:, : Q - 1]
        which = np.concatenate([others, i[:, None]], axis=1)  # (n, Q)
        qslot = q0 + 1 + 4 * np.arange(Q)
        out[:, qslot] = ord(" ")
        out[rows, qslot + 1] = LETTERS[np.take_along_axis(keys, which, 1)]
        qv = np.take_along_axis(vals, which, 1)
        out[rows, qslot + 2] = DIGITS[qv // 10]
        out[rows, qslot + 3] = DIGITS[qv % 10]
        answers = np.broadcast_to(qslot + 2, (n, Q)).copy()
        ev = np.take_along_axis(slot, which, 1) + 1
        evidence = ev[:, :, None] + np.arange(2)
        return TaskBatch(self.name, out, answers, 2, evidence)


class SelectiveCopy(Task):
    """K capital letters scattered in filler, then "|" and the K letters in order."""

    name, answer_alphabet = "selcopy", UPPER

    def __init__(self, k: int = 8) -> None:
        if k < 1:
            raise DynaformerError(f"task selcopy: k must be ≥ 1, got {k}")
        self.answer_len = k

    def distance_range(self, length: int) -> tuple[int, int]:
        K = self.answer_len
        return K + 1, length + 1 - K  # the K − 1 later letters fit between the first one and "|"

    def _generate(self, rng, n, N, d):
        K = self.answer_len
        a = N - K
        p0 = a - d
        # K − 1 distinct sorted positions in (p0, a − 1): sorted draws with replacement + arange.
        room = (a - 1) - (p0 + 1)  # free slots strictly between p0 and the marker
        draws = np.sort((rng.random((n, K - 1)) * (room - (K - 2))[:, None]).astype(np.int64), axis=1)
        pos = np.concatenate([p0[:, None], p0[:, None] + 1 + draws + np.arange(K - 1)], axis=1)
        letters = UPPER[rng.integers(0, 26, size=(n, K))]
        out = _filler(rng, n, N)
        out[_rows(n), pos] = letters
        out[:, a - 1] = ord("|")
        out[:, a:] = letters
        return TaskBatch(self.name, out, np.full((n, 1), a), K, pos[:, None, :])


NAMES = ["Mary", "John", "Sandra", "Daniel", "Bill", "Fred", "Julie", "Emma", "Omar", "Yuki", "Lena", "Ivan"]
PLACES = ["garden", "office", "studio", "cellar", "harbor", "school", "palace", "forest", "market", "chapel",
          "bakery", "museum"]  # all 6 letters: the answer has a fixed length
VERBS = ["went to", "moved to", "journeyed to", "travelled to", "went back to", "ran to"]
DISTRACTORS = ["The clock struck the hour.", "It began to rain.", "Nobody spoke for a while.",
               "A bell rang far away.", "The wind turned cold.", "The lights went out.", "A dog barked twice."]
_W = 1 + max(len(f"{n} {v} the {p}.") for n in NAMES for v in VERBS for p in PLACES)  # slot width (32)
_QW = 1 + max(len(f" Where is {n}?") for n in NAMES)  # question field width


@lru_cache(maxsize=1)
def _story_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sentence slots (n_sentences, W) padded with spaces, the place offset in each move sentence,
    and the question fields (n_names, QW) right-aligned before the answer."""
    rows, offs = [], []
    for n in NAMES:
        for v in VERBS:
            for p in PLACES:
                s = f"{n} {v} the "
                offs.append(len(s))
                rows.append((s + p + ".").ljust(_W))
    rows += [d.ljust(_W) for d in DISTRACTORS]
    table = np.frombuffer("".join(rows).encode(), dtype=np.uint8).reshape(len(rows), _W)
    qs = np.frombuffer("".join(f" Where is {n}? ".rjust(_QW) for n in NAMES).encode(), dtype=np.uint8)
    return table, np.array(offs), qs.reshape(len(NAMES), _QW)


class StoryQA(Task):
    """Sentences of people moving between places (space-padded to a fixed width) and distractors,
    ending in "Where is X? PLACE". X's last move (the supporting fact) lies at the chosen distance;
    X does not move after it, and the answer's place is named nowhere else in the story."""

    name, answer_len = "storyqa", 6
    answer_alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)

    def chance(self) -> float:
        return 1.0 / len(PLACES)  # exact match of guessing a place

    def distance_range(self, length: int) -> tuple[int, int]:
        N = length + 1
        _, offs, _ = _story_tables()
        return _QW + _W, N - 6 - int(offs.max())

    def _generate(self, rng, n, N, d):
        table, offs, qtab = _story_tables()
        nN, nV, nP, nD = len(NAMES), len(VERBS), len(PLACES), len(DISTRACTORS)
        W, QW = _W, _QW
        who = rng.integers(0, nN, n)
        ans = rng.integers(0, nP, n)
        verb = rng.integers(0, nV, n)
        support = (who * nV + verb) * nP + ans
        a = N - 6
        qs = np.full(n, a - QW)
        t = d - QW - W + offs[support]
        k, r = t // W, t % W
        S = qs - k * W - r - W  # start of the supporting sentence
        if (S < 0).any():
            raise DynaformerError(f"task storyqa: distance {int(d[S < 0][0])} is impossible at length {N - 1}")
        m = S // W  # whole slots before the support; S % W leading spaces
        M = N // W + 1
        j = np.arange(M)[None, :]

        def sentences(exclude_who: bool) -> np.ndarray:
            names = rng.integers(0, nN - 1 if exclude_who else nN, (n, M))
            if exclude_who:
                names += names >= who[:, None]
            places = rng.integers(0, nP - 1, (n, M))
            places += places >= ans[:, None]  # the answer's place appears only in the support
            moves = (names * nV + rng.integers(0, nV, (n, M))) * nP + places
            filler = nN * nV * nP + rng.integers(0, nD, (n, M))
            return np.where(rng.random((n, M)) < 0.3, filler, moves)

        pre, post = sentences(False), sentences(True)
        out = np.full((n, N), ord(" "), dtype=np.uint8)
        col = np.arange(W)[None, None, :]
        for ids, start, count in ((pre, (S % W)[:, None] + W * j, m), (post, (S + W + r)[:, None] + W * j, k)):
            rr, cc = np.nonzero(j < count[:, None])
            dest = start[rr, cc][:, None] + col[0]
            out[rr[:, None], dest] = table[ids[rr, cc]]
        _put(out, S, table[support])
        _put(out, qs, qtab[who])
        _put(out, np.full(n, a), PLACES_ARR[ans])
        evidence = ((S + offs[support])[:, None] + np.arange(6))[:, None, :]
        return TaskBatch(self.name, out, np.full((n, 1), a), 6, evidence)


PLACES_ARR = np.frombuffer("".join(PLACES).encode(), dtype=np.uint8).reshape(len(PLACES), 6)
_SQW = max(len(f"Which places did {n} visit? ") for n in NAMES)  # summary question field width (31)


@lru_cache(maxsize=1)
def _summary_tables() -> tuple[np.ndarray, np.ndarray]:
    """The unpadded length of every story sentence, and the summary questions (n_names, SQW) right-aligned
    before the answers."""
    table, _, _ = _story_tables()
    lens = _W - np.argmax(table[:, ::-1] != ord(" "), axis=1)  # every sentence ends in "."
    qs = np.frombuffer("".join(f"Which places did {n} visit? ".rjust(_SQW) for n in NAMES).encode(), dtype=np.uint8)
    return lens, qs.reshape(len(NAMES), _SQW)


def _put_sentences(out: np.ndarray, rows: np.ndarray, starts: np.ndarray, ids: np.ndarray) -> None:
    """Write story sentences ids (m,) unpadded at out[rows, starts:] (their padding would hit the next one)."""
    table, lens = _story_tables()[0], _summary_tables()[0]
    cols = np.arange(table.shape[1])
    keep = cols < lens[ids][:, None]  # (m, W)
    out[np.broadcast_to(rows[:, None], keep.shape)[keep], (starts[:, None] + cols)[keep]] = table[ids][keep]


class StorySummary(Task):
    """A story like storyqa's in which X moves exactly K = `visits` times, each time to a different place,
    ending in "Which places did X visit? P1 P2 … PK". The distance is how far back the summary reaches: first
    answer − the first visit's place; the later visits lie at random places between the first and the
    question, in order. Sentences are unpadded and one space apart, not in storyqa's 32-byte slots: the question,
    the later visits and the answers already fill most of a 128-byte example, and padding would narrow the
    valid distances further (unpadded, at 128 with K = 2 they are 71..92). Nobody else mentions X; others may
    visit X's places (the model has to track who went where)."""

    name, answer_len = "summary", 6
    answer_alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz", dtype=np.uint8)
    probe_only, word_list = False, True

    def __init__(self, visits: int = 2) -> None:
        if not 1 <= visits <= len(PLACES):
            raise DynaformerError(f"task summary: need 1 ≤ visits ≤ {len(PLACES)} (each visit goes to a different "
                                  f"place), got visits={visits}")
        self.visits = visits

    def chance(self) -> float:
        return float(len(PLACES)) ** -self.visits  # exact match of guessing each of the K places uniformly

    def distance_range(self, length: int) -> tuple[int, int]:
        N, K = length + 1, self.visits
        _, offs, _ = _story_tables()
        lens, _ = _summary_tables()
        longest = int(lens[: len(offs)].max()) + 1  # a move sentence and its space (32)
        # From the first visit's place: "PLACE. " (8), the K − 1 later visits and the question; before the
        # place, the first visit's "X went to the " (up to 24 bytes) from the start at the earliest.
        return 8 + (K - 1) * longest + _SQW, N - 7 * K + 1 - int(offs.max())

    def _generate(self, rng, n, N, d):
        table, offs, _ = _story_tables()
        lens, qtab = _summary_tables()
        nN, nV, nP, nD = len(NAMES), len(VERBS), len(PLACES), len(DISTRACTORS)
        K = self.visits
        a = N - 7 * K + 1  # the first answer; the answers are "PLACE " apart and the last ends the example
        q = a - _SQW  # the question field
        who = rng.integers(0, nN, n)
        visit = np.argsort(rng.random((n, nP)), axis=1)[:, :K]  # (n, K) distinct places, in visit order
        moves = (who[:, None] * nV + rng.integers(0, nV, (n, K))) * nP + visit  # (n, K) X's move sentences
        L = lens[moves] + 1  # (n, K) bytes each takes, with its space
        start0 = a - d - offs[moves[:, 0]]  # the first visit; ≥ 0 by distance_range
        room = q - start0 - L.sum(1)  # free bytes between the first visit and the question; ≥ 0
        zero = np.zeros((n, 1), dtype=np.int64)
        cuts = np.sort((rng.random((n, K - 1)) * (room + 1)[:, None]).astype(np.int64), axis=1)
        gap = np.diff(np.concatenate([zero, cuts, room[:, None]], axis=1), axis=1)  # (n, K) free after each visit
        starts = start0[:, None] + np.concatenate([zero, np.cumsum(L + gap, axis=1)[:, :-1]], axis=1)  # (n, K)
        out = np.full((n, N), ord(" "), dtype=np.uint8)
        # The free stretches (before the first visit, after each) take other people's moves and distractors,
        # one space apart, as many as fit; the bytes left over go to a random boundary in the stretch, so runs
        # of spaces do not mark X's visits.
        g0 = np.concatenate([zero, starts + L], axis=1)  # (n, K + 1)
        gw = np.concatenate([start0[:, None], gap], axis=1)
        G, M = K + 1, int(gw.max()) // (int(lens.min()) + 1) + 1
        names = rng.integers(0, nN - 1, (n, G, M))
        names += names >= who[:, None, None]  # nobody else mentions X
        others = (names * nV + rng.integers(0, nV, (n, G, M))) * nP + rng.integers(0, nP, (n, G, M))
        ids = np.where(rng.random((n, G, M)) < 0.3, nN * nV * nP + rng.integers(0, nD, (n, G, M)), others)
        Ls = lens[ids] + 1
        end = np.cumsum(Ls, axis=2)  # (n, G, M)
        fit = end <= gw[:, :, None]
        spare = gw - np.where(fit, Ls, 0).sum(2)
        at = (rng.random((n, G)) * (fit.sum(2) + 1)).astype(np.int64)
        pos = g0[:, :, None] + end - Ls + spare[:, :, None] * (np.arange(M) >= at[:, :, None])
        r, g, j = np.nonzero(fit)
        _put_sentences(out, r, pos[r, g, j], ids[r, g, j])
        _put_sentences(out, np.repeat(np.arange(n), K), starts.ravel(), moves.ravel())
        _put(out, np.full(n, q), qtab[who])
        answers = np.broadcast_to(a + 7 * np.arange(K), (n, K)).copy()
        out[:, answers[0, :, None] + np.arange(6)] = PLACES_ARR[visit]  # single spaces between them
        evidence = (starts + offs[moves])[:, :, None] + np.arange(6)  # (n, K, 6)
        return TaskBatch(self.name, out, answers, 6, evidence, distance=answers[:, 0] - evidence[:, 0, 0],
                         listed=True)


TASKS: dict[str, type[Task]] = {"passkey": Passkey, "mqar": MQAR, "selcopy": SelectiveCopy, "storyqa": StoryQA,
                                "summary": StorySummary}
SUITE = tuple(TASKS)


def make_task(name: str, **params: int) -> Task:
    if name not in TASKS:
        raise DynaformerError(f"unknown task '{name}' (known: {', '.join(TASKS)}, suite)")
    try:
        return TASKS[name](**params)
    except TypeError:
        raise DynaformerError(f"task {name}: unknown parameter in {sorted(params)}") from None


# --- spec strings -----------------------------------------------------------------------------

TASK_PARAMS = {"passkey": ("digits",), "mqar": ("pairs", "queries"), "selcopy": ("k",), "summary": ("visits",)}


@dataclass
class TaskSpec:
    tasks: list[str]
    length: int | None = None
    dist: tuple[int, int] | None = None
    frac: float = 1.0
    text: str | None = None
    loss: str = "answer"
    weight: str = "token"
    params: dict[str, dict[str, int]] = field(default_factory=dict)

    def make(self) -> list[Task]:
        return [make_task(t, **self.params.get(t, {})) for t in self.tasks]


def is_task_spec(source: str) -> bool:
    return source.startswith(TASK_PREFIX)


def parse_task_spec(source: str) -> TaskSpec:
    """`task:passkey,mqar?len=256&dist=16-200&frac=0.5&text=builtin:default` → TaskSpec."""
    body = source[len(TASK_PREFIX):]
    names, _, query = body.partition("?")
    tasks: list[str] = []
    for nm in names.split(","):
        nm = nm.strip()
        if nm == "suite":
            tasks += [t for t in SUITE if t not in tasks]
        elif nm in TASKS:
            tasks.append(nm)
        else:
            raise DynaformerError(f"data: unknown task '{nm}' in '{source}' (known: {', '.join(TASKS)}, suite)")
    spec = TaskSpec(tasks)
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq:
            raise DynaformerError(f"data: '{item}' in '{source}' is not key=value")
        try:
            if key == "len":
                spec.length = int(value)
            elif key == "dist":
                lo, _, hi = value.partition("-")
                spec.dist = (int(lo), int(hi or lo))
            elif key == "frac":
                spec.frac = float(value)
            elif key == "text":
                spec.text = value
            elif key == "loss":
                if value not in ("answer", "all"):
                    raise ValueError
                spec.loss = value
            elif key == "weight":
                if value not in ("token", "task"):
                    raise ValueError
                spec.weight = value
            elif any(key in ps for ps in TASK_PARAMS.values()):
                for t, ps in TASK_PARAMS.items():
                    if key in ps:
                        spec.params.setdefault(t, {})[key] = int(value)
            else:
                raise DynaformerError(f"data: unknown task option '{key}' in '{source}' "
                                      f"(known: len, dist, frac, text, loss, weight, digits, pairs, queries, k, "
                                      f"visits)")
        except ValueError:
            raise DynaformerError(f"data: bad value '{value}' for '{key}' in '{source}'") from None
    if spec.length is not None and spec.length < 1:
        raise DynaformerError(f"data: len must be ≥ 1, got {spec.length} in '{source}'")
    if not 0 < spec.frac <= 1:
        raise DynaformerError(f"data: frac must be in (0, 1], got {spec.frac} in '{source}'")
    if spec.text is None and spec.frac < 1:
        raise DynaformerError(f"data: frac < 1 needs a text source to mix with (text=...) in '{source}'")
    spec.make()  # validates task parameters
    return spec


def check_task_data(source: str, context_len: int) -> TaskSpec:
    """Parse a task spec and check that its examples fit the model's context."""
    spec = parse_task_spec(source)
    if spec.length is not None and spec.length > context_len:
        raise DynaformerError(f"data: task len={spec.length} exceeds the model's context_len={context_len}")
    return spec


def sample_distances(rng: np.random.Generator, n: int, lo: int, hi: int) -> np.ndarray:
    """Log-uniform integers in [lo, hi]: every scale of distance gets its share of training."""
    u = rng.random(n)
    return np.clip(np.round(np.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))), lo, hi).astype(np.int64)


def task_range(task: Task, length: int, dist: tuple[int, int] | None) -> tuple[int, int]:
    """The task's valid distances at `length`, narrowed to `dist` (an error if nothing is left)."""
    lo, hi = task.distance_range(length)
    if dist is not None:
        if dist[0] > dist[1] or max(lo, dist[0]) > min(hi, dist[1]):
            raise DynaformerError(f"task {task.name}: distance range {dist[0]}-{dist[1]} is impossible at length "
                                  f"{length} (valid: {lo}..{hi})")
        lo, hi = max(lo, dist[0]), min(hi, dist[1])
    return lo, hi


def render_text(spec: TaskSpec, length: int, n_per_task: int, seed: int = 0) -> str:
    """Task examples as text, one per line: the training/validation text of a task-only run."""
    parts = []
    for i, task in enumerate(spec.make()):
        lo, hi = task_range(task, length, spec.dist)
        d = sample_distances(np.random.default_rng([seed, i, 7]), n_per_task, lo, hi)
        batch = task.generate(n_per_task, length, d, seed=(seed, i))
        parts.append(batch.tokens)
    rows = np.concatenate(parts)
    rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    nl = np.full((len(rows), 1), ord("\n"), dtype=np.uint8)
    return np.concatenate([rows, nl], axis=1).tobytes().decode("ascii")


class TaskSampler:
    """Training batches of task examples (optionally mixed with text windows from `text_sampler`).

    Like BatchSampler, batch n is a pure function of (seed, rank, n): the state is the cursor (and
    the text sampler's), so checkpoints resume bit-exactly."""

    def __init__(self, spec: TaskSpec, batch_size: int, context_len: int, seed: int, rank: int = 0,
                 text_sampler=None) -> None:
        self.spec, self.batch_size, self.seed, self.rank, self.cursor = spec, batch_size, seed, rank, 0
        self.length = spec.length or context_len
        if self.length > context_len:
            raise DynaformerError(f"data: task len={self.length} exceeds the model's context_len={context_len}")
        self.tasks = spec.make()
        self.ranges = [task_range(t, self.length, spec.dist) for t in self.tasks]
        self.text_sampler = text_sampler
        self.n_task = batch_size if text_sampler is None else max(1, round(spec.frac * batch_size))
        if text_sampler is not None and self.n_task < batch_size:
            text_sampler.batch_size = batch_size - self.n_task
        self.context_len = context_len
        self._rows: list[int] = []  # rows of each task in the last batch, in order (loss_weights reads it)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.rank, self.cursor, 99])
        which = rng.integers(0, len(self.tasks), self.n_task)
        xs, ys = [], []
        self._rows = [int((which == t).sum()) for t in range(len(self.tasks))]
        for t, task in enumerate(self.tasks):
            cnt = self._rows[t]
            if not cnt:
                continue
            d = sample_distances(rng, cnt, *self.ranges[t])
            x, y = task.generate(cnt, self.length, d, seed=(self.seed, self.rank, self.cursor, t)).inputs_targets(
                self.spec.loss)
            if self.length < self.context_len:  # pad on the right; padded targets are ignored
                pad = self.context_len - self.length
                x = torch.nn.functional.pad(x, (0, pad), value=ord("\n"))
                y = torch.nn.functional.pad(y, (0, pad), value=-100)
            xs.append(x)
            ys.append(y)
        self.cursor += 1
        if self.text_sampler is not None and self.n_task < self.batch_size:
            tx, ty = self.text_sampler.next()
            xs.append(tx)
            ys.append(ty)
        return torch.cat(xs), torch.cat(ys)

    def loss_weights(self, y: torch.Tensor) -> torch.Tensor | None:
        """Per-target weights of the last batch (task rows first, in task order, then text rows), or None for the
        plain mean over targets. Each source's targets are averaged separately and weighted by its share `frac`:
        a plain mean would let the text rows (every token a target) drown the task rows (a few answer tokens
        each): at frac 0.75 the answers would carry about a tenth of the loss instead of three quarters.
        With `weight=task`, each task's answer targets are averaged on their own too and weighted by its share
        of the task rows: with `weight=token` a one-token answer (passkey) gets its tokens' share of the task
        loss, 2 of 37 answer targets in the main grid's mixture, where its rows are a third."""
        mixed = self.text_sampler is not None and self.n_task < self.batch_size
        if not mixed and self.spec.weight == "token":
            return None
        m = (y != -100).to(torch.float32)
        n, frac = self.n_task, self.spec.frac if mixed else 1.0
        w = torch.empty_like(m)
        if self.spec.weight == "task":
            start = 0
            for cnt in self._rows:
                rows = m[start:start + cnt]
                w[start:start + cnt] = rows * (frac * cnt / n / rows.sum().clamp(min=1))
                start += cnt
        else:
            w[:n] = m[:n] * (frac / m[:n].sum().clamp(min=1))
        if mixed:
            w[n:] = m[n:] * ((1 - frac) / m[n:].sum().clamp(min=1))
        return w

    def state_dict(self) -> dict:
        state = {"cursor": self.cursor, "seed": self.seed, "rank": self.rank}
        if self.text_sampler is not None:
            state["text"] = self.text_sampler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        if self.text_sampler is not None and "text" in state:
            self.text_sampler.load_state_dict(state["text"])
