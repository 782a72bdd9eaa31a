"""Classification metrics: accuracy, macro-F1, and accuracy by distance bucket."""

from __future__ import annotations

from collections import defaultdict


def macro_f1(pred: list[int], gold: list[int], n_classes: int) -> float:
    """Unweighted mean over classes of F1 (classes absent from both gold and predictions are skipped)."""
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(pred, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(pred, gold, strict=True))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def distance_bucket(d: int) -> str:
    if d < 0:
        return "n/a"
    lo = 0 if d == 0 else 2 ** (d.bit_length() - 1)
    return f"{lo}-{max(lo, 2 * lo - 1)}" if d else "0"


def classification_report(pred: list[int], gold: list[int], distances: list[int], n_classes: int) -> dict:
    correct = [p == g for p, g in zip(pred, gold, strict=True)]
    by_bucket: dict[str, list[bool]] = defaultdict(list)
    for ok, d in zip(correct, distances, strict=True):
        by_bucket[distance_bucket(d)].append(ok)
    return {"accuracy": sum(correct) / max(1, len(correct)), "macro_f1": macro_f1(pred, gold, n_classes),
            "n": len(correct),
            "accuracy_by_distance": {k: sum(v) / len(v) for k, v in sorted(by_bucket.items()) if k != "n/a"}}
