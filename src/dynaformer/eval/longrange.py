"""Long-range suite evaluation: exact-match accuracy of the probe answer versus distance.

Scoring uses one forward pass per batch: the answer is predicted by argmax at every answer position,
teacher-forced. For exact match this equals greedy decoding (greedy emits the same tokens as long as
each is right, and the first wrong one makes both wrong), at the cost of a single forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..data.tasks import SUITE, TaskBatch, make_task

DEFAULT_FRACTIONS = (1 / 16, 1 / 8, 1 / 4, 1 / 2, 7 / 8)
Predictor = Callable[[TaskBatch], np.ndarray]


def eval_distances(task_name: str, length: int, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[int]:
    """Distances at the given fractions of the context, moved into the task's valid range."""
    lo, hi = make_task(task_name).distance_range(length)
    return sorted({int(min(hi, max(lo, round(f * length)))) for f in fractions})


@torch.no_grad()
def model_predictor(model: torch.nn.Module, batch_size: int = 16) -> Predictor:
    """Argmax predictions of `model` at the probe's answer positions: (n, answer_len) token ids."""

    def predict(batch: TaskBatch) -> np.ndarray:
        device = next(model.parameters()).device
        pos = torch.from_numpy(batch.answer_positions(probe_only=True) - 1)  # the positions that predict them
        x_all = torch.from_numpy(batch.tokens[:, :-1].astype(np.int64))
        out = []
        was = model.training
        model.eval()
        with torch.no_grad():
            for i in range(0, len(x_all), batch_size):
                logits, _ = model(x_all[i : i + batch_size].to(device))  # (b, T, V)
                p = pos[i : i + batch_size].to(device)
                sel = logits.gather(1, p[:, :, None].expand(-1, -1, logits.size(-1)))
                out.append(sel.argmax(-1).cpu())
        model.train(was)
        return torch.cat(out).numpy()

    return predict


def score(batch: TaskBatch, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per example: exact match (bool) and the fraction of answer tokens right."""
    truth = np.take_along_axis(batch.tokens, batch.answer_positions(probe_only=True), 1)
    ok = pred == truth
    return ok.all(1), ok.mean(1)


def evaluate_longrange(model_or_predict: torch.nn.Module | Predictor, length: int, tasks: Sequence[str] = SUITE,
                       n_per_distance: int = 50, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 1234,
                       batch_size: int = 16) -> dict:
    """Accuracy by task and distance on freshly generated examples (the same ones every call).

    Returns {"length", "tasks": {name: {"distance": [...], "exact": [...], "token_acc": [...], "n",
    "chance"}}, "far_exact": mean exact match over tasks at distances ≥ length/2, "mean_exact"}."""
    predict = (model_predictor(model_or_predict, batch_size) if isinstance(model_or_predict, torch.nn.Module)
               else model_or_predict)
    out: dict = {"length": length, "n_per_distance": n_per_distance, "tasks": {}}
    far, everything = [], []
    for ti, name in enumerate(tasks):
        task = make_task(name)
        rec = {"distance": [], "exact": [], "token_acc": [], "n": n_per_distance, "chance": task.chance()}
        for d in eval_distances(name, length, fractions):
            batch = task.generate(n_per_distance, length, d, seed=(seed, ti, d))
            exact, tok = score(batch, predict(batch))
            rec["distance"].append(d)
            rec["exact"].append(float(exact.mean()))
            rec["token_acc"].append(float(tok.mean()))
            everything.append(float(exact.mean()))
            if d >= length / 2:
                far.append(float(exact.mean()))
        out["tasks"][name] = rec
    out["far_exact"] = float(np.mean(far)) if far else None
    out["mean_exact"] = float(np.mean(everything)) if everything else None
    return out
