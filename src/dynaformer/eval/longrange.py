"""Long-range suite evaluation: exact-match accuracy versus distance, and word-level scores for list answers.

A predictor returns its tokens over each example's answer region (`TaskBatch.answer_region`): what a model
writes after the question, from the first scored answer to the end. For most tasks that is the probe alone
(mqar's earlier queries are not scored); for `summary` it is the whole ordered list of places, separators
included.

Exact match (of the whole region) uses one forward pass per batch: the argmax at every position,
teacher-forced. This equals greedy decoding (greedy emits the same tokens as long as each is right, and the
first wrong one makes both wrong), at the cost of a single forward. Word-level scores (token F1 and ROUGE-L,
for list answers) depend on what is written *after* a mistake, so they are taken on a real greedy decode:
each token conditioned on the model's own earlier ones, one forward per token (answers are short).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..data.tasks import SUITE, TASKS, TaskBatch, make_task

DEFAULT_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 7 / 8)
Predictor = Callable[[TaskBatch], np.ndarray]  # batch → (n, span) tokens over its answer region


def eval_distances(task_name: str, length: int, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   **params: int) -> list[int]:
    """Distances at the given fractions of the context, moved into the task's valid range."""
    lo, hi = make_task(task_name, **params).distance_range(length)
    return sorted({int(min(hi, max(lo, round(f * length)))) for f in fractions})


def _region(batch: TaskBatch) -> np.ndarray:
    return batch.answer_region(TASKS[batch.task].probe_only)


def _greedy(model: torch.nn.Module, x: torch.Tensor, start: int) -> torch.Tensor:
    """Greedy decode of x's columns start.. (and the one after x): (b, T + 1 − start) token ids. The model sees
    only the tokens before the one it predicts, its own predictions refilled, so even a non-causal one can't peek."""
    x, T = x.clone(), x.size(1)
    preds = []
    for c in range(start, T + 1):
        logits, _ = model(x[:, :c])
        nxt = logits[:, -1].argmax(-1)
        preds.append(nxt)
        if c < T:
            x[:, c] = nxt
    return torch.stack(preds, 1)


@torch.no_grad()
def model_predictor(model: torch.nn.Module, batch_size: int = 16, greedy: bool = False) -> Predictor:
    """Predictions of `model` over each example's answer region, (n, span) token ids: the argmax at every
    position, teacher-forced (one forward), or with greedy=True a greedy decode (one forward per token)."""

    def predict(batch: TaskBatch) -> np.ndarray:
        device = next(model.parameters()).device
        start = int(_region(batch)[0, 0])  # the answers sit at the same columns in every row
        x_all = torch.from_numpy(batch.tokens[:, :-1].astype(np.int64))
        out = []
        was = model.training
        model.eval()
        with torch.no_grad():
            for i in range(0, len(x_all), batch_size):
                x = x_all[i : i + batch_size].to(device)
                if greedy:
                    out.append(_greedy(model, x, start).cpu())
                else:
                    logits, _ = model(x)  # (b, T, V); position c − 1 predicts token c
                    out.append(logits[:, start - 1 :].argmax(-1).cpu())
        model.train(was)
        return torch.cat(out).numpy()

    return predict


def score(batch: TaskBatch, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per example: exact match (bool; the whole answer region, separators included) and the fraction of
    answer tokens right (separators excluded)."""
    region = _region(batch)
    truth = np.take_along_axis(batch.tokens, region, 1)
    ok = pred == truth
    answer = batch.answer_positions(TASKS[batch.task].probe_only) - region[:, :1]
    return ok.all(1), np.take_along_axis(ok, answer, 1).mean(1)


def words(tokens: np.ndarray) -> list[str]:
    """The whitespace-separated words of one row of token ids."""
    return "".join(map(chr, tokens.tolist())).split()


def token_f1(pred: Sequence[str], truth: Sequence[str]) -> float:
    """SQuAD's token F1: the harmonic mean of precision and recall of the predicted words as a bag (a word
    counts as often as it occurs in both, so order is ignored); 1 if both are empty, 0 if only one is."""
    if not pred or not truth:
        return float(not pred and not truth)
    common = sum((Counter(pred) & Counter(truth)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(truth)
    return 2 * p * r / (p + r)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of a and b (dynamic programming, one row at a time)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(pred: Sequence[str], truth: Sequence[str]) -> float:
    """ROUGE-L F-measure (Lin 2004, with β = 1): the harmonic mean of LCS/len(pred) and LCS/len(truth) over
    the word sequences, so unlike token F1 it rewards the right order; 1 if both are empty, 0 if only one is."""
    if not pred or not truth:
        return float(not pred and not truth)
    lcs = lcs_length(pred, truth)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(truth)
    return 2 * p * r / (p + r)


def word_scores(batch: TaskBatch, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per example: token F1 and ROUGE-L of the predicted answer region's words against the true ones."""
    truth = np.take_along_axis(batch.tokens, _region(batch), 1)
    pairs = [(words(p), words(t)) for p, t in zip(pred, truth, strict=True)]
    return np.array([token_f1(p, t) for p, t in pairs]), np.array([rouge_l(p, t) for p, t in pairs])


def evaluate_longrange(model_or_predict: torch.nn.Module | Predictor, length: int, tasks: Sequence[str] = SUITE,
                       n_per_distance: int = 50, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 1234,
                       batch_size: int = 16, params: dict[str, dict] | None = None) -> dict:
    """Accuracy by task and distance on freshly generated examples (the same ones every call).

    A model is scored teacher-forced, except on tasks with list answers (summary), where it decodes greedily:
    their exact match is the same either way (greedy and teacher-forced argmax agree on whether *all* tokens
    of the region are right), and their token F1 and ROUGE-L need what greedy decoding really writes.

    Returns {"length", "tasks": {name: {"distance": [...], "exact": [...], "token_acc": [...], "n",
    "chance"}, and for list answers also "f1": [...], "rouge_l": [...]}, "far_exact": mean exact match over
    tasks at distances ≥ length/2, "mean_exact"}. params: task parameters by name (e.g. {"passkey": {"digits":
    2}}), as the model was trained on them."""
    if isinstance(model_or_predict, torch.nn.Module):
        forced = model_predictor(model_or_predict, batch_size)
        greedy = model_predictor(model_or_predict, batch_size, greedy=True)
    else:
        forced = greedy = model_or_predict
    out: dict = {"length": length, "n_per_distance": n_per_distance, "tasks": {}}
    far, everything = [], []
    for ti, name in enumerate(tasks):
        task = make_task(name, **(params or {}).get(name, {}))
        predict = greedy if task.word_list else forced
        rec = {"distance": [], "exact": [], "token_acc": [], "n": n_per_distance, "chance": task.chance()}
        if task.word_list:
            rec["f1"], rec["rouge_l"] = [], []
        for d in eval_distances(name, length, fractions, **(params or {}).get(name, {})):
            batch = task.generate(n_per_distance, length, d, seed=(seed, ti, d))
            pred = predict(batch)
            exact, tok = score(batch, pred)
            rec["distance"].append(d)
            rec["exact"].append(float(exact.mean()))
            rec["token_acc"].append(float(tok.mean()))
            if task.word_list:
                f1, rl = word_scores(batch, pred)
                rec["f1"].append(float(f1.mean()))
                rec["rouge_l"].append(float(rl.mean()))
            everything.append(float(exact.mean()))
            if d >= length / 2:
                far.append(float(exact.mean()))
        out["tasks"][name] = rec
    out["far_exact"] = float(np.mean(far)) if far else None
    out["mean_exact"] = float(np.mean(everything)) if everything else None
    return out


class TaskProbe:
    """Held-out examples of a task run's own tasks (its length and distance range, distances log-uniform,
    generated once with a seed no training batch uses), scored at every evaluation: the mean loss over the
    answer tokens and the exact match of each task. A task run's validation loss over all tokens mostly
    measures unpredictable filler and can climb while the answers are being learned."""

    def __init__(self, spec, length: int, n_per_task: int = 64, seed: int = 20_241) -> None:
        from ..data.tasks import sample_distances, task_range

        self.batches = []
        for i, task in enumerate(spec.make()):
            lo, hi = task_range(task, length, spec.dist)
            d = sample_distances(np.random.default_rng([seed, i]), n_per_task, lo, hi)
            self.batches.append(task.generate(n_per_task, length, d, seed=(seed, i, 1)))

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, batch_size: int = 64) -> dict:
        """{"val_answer_loss": nats per answer token, "val_exact": mean over tasks, "val_exact_TASK": ...}."""
        was = model.training
        model.eval()
        device = next(model.parameters()).device
        nats, count, out = 0.0, 0, {}
        for batch in self.batches:
            x, y = batch.inputs_targets("answer")
            logits = torch.cat([model(x[i : i + batch_size].to(device))[0].float().cpu()
                                for i in range(0, len(x), batch_size)])
            nats += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100,
                                                            reduction="sum"))
            count += int((y != -100).sum())
            start = int(_region(batch)[0, 0])
            exact, _ = score(batch, logits[:, start - 1 :].argmax(-1).numpy())
            out[f"val_exact_{batch.task}"] = round(float(exact.mean()), 4)
        model.train(was)
        exacts = [v for k, v in out.items()]
        return {"val_answer_loss": nats / max(1, count), "val_exact": float(np.mean(exacts)), **out}
