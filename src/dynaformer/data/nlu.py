"""Classification data for language-understanding tasks: generated tasks with controllable
difficulty, and user-provided JSONL (`{"text": ..., "label": ...}` per line).

Generated tasks:
- `keyword`: does the text contain the word "rain"? (an easy sanity task; `distance` = words after it)
- `entail`: a story of moves, then a statement "X is in the Y."; the label is yes / no / unknown,
  and the supporting fact (the person's last move) lies `distance` sentences before the statement.
- `listops`: nested MAX/MIN/MED/SM (sum mod 10) expressions over digits (Nangia & Bowman 2018); the
  label is the value, 0-9; `depth` sets the nesting.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DynaformerError
from .formats import jsonl_records

_NAMES = ["Ada", "Bruno", "Chiara", "Dev", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas"]
_PLACES = ["kitchen", "garden", "library", "harbour", "attic", "market", "station", "orchard"]
_WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "it", "was", "sunny", "cold"]
_FILLER = ["The weather was mild.", "Nobody spoke.", "A bell rang.", "It began to rain.", "The wind turned cold."]


@dataclass
class Example:
    text: str
    label: str
    distance: int = -1  # sentences between the supporting fact and the question (-1: not applicable)


@dataclass
class ClassificationData:
    train: list[Example]
    val: list[Example]
    labels: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.labels:
            self.labels = sorted({e.label for e in self.train})


def _entail_example(rng: random.Random, distance: int, n_filler: int) -> Example:
    who, other = rng.sample(_NAMES, 2)
    place = rng.choice(_PLACES)
    kind = rng.choice(["yes", "no", "unknown"])
    sentences = [rng.choice(_FILLER) for _ in range(n_filler)]
    if kind == "unknown":
        asked = rng.choice(_PLACES)  # `who` never moves: nothing supports or refutes the statement
        support = f"{other} went to the {rng.choice(_PLACES)}."
    else:
        asked = place if kind == "yes" else rng.choice([p for p in _PLACES if p != place])
        support = f"{who} went to the {place}."
    # the supporting sentence sits `distance` sentences before the statement
    sentences.insert(len(sentences) - distance if distance <= len(sentences) else 0, support)
    return Example(" ".join(sentences) + f" Statement: {who} is in the {asked}.", kind, distance)


_OPS = {"MAX": max, "MIN": min, "MED": lambda xs: sorted(xs)[len(xs) // 2], "SM": lambda xs: sum(xs) % 10}


def _listops(rng: random.Random, depth: int) -> tuple[str, int]:
    if depth == 0:
        d = rng.randint(0, 9)
        return str(d), d
    op = rng.choice(list(_OPS))
    args = [_listops(rng, depth - 1 if i == 0 else rng.randint(0, depth - 1)) for i in range(rng.randint(2, 4))]
    rng.shuffle(args)
    return f"[{op} " + " ".join(a for a, _ in args) + " ]", _OPS[op]([v for _, v in args])


def generate_task(name: str, n_train: int, n_val: int, seed: int = 0, distance: int = 4,
                  depth: int = 2) -> ClassificationData:
    """A generated classification task. For `entail`, distances are drawn from 0..distance."""
    if name not in ("keyword", "entail", "listops"):
        raise DynaformerError(f"task: unknown classification task '{name}' (known: keyword, entail, listops)")
    if distance < 0 or depth < 1:
        raise DynaformerError("task: need distance ≥ 0 and depth ≥ 1")
    rng = random.Random(seed)

    def one() -> Example:
        if name == "keyword":
            words = [rng.choice(_WORDS) for _ in range(distance + 4)]
            if rng.random() < 0.5:
                return Example(" ".join(words), "no")
            d = rng.randint(0, distance)
            words[len(words) - 1 - d] = "rain"
            return Example(" ".join(words), "yes", d)
        if name == "entail":
            d = rng.randint(0, distance)
            return _entail_example(rng, d, n_filler=max(d, rng.randint(d, distance + 2)))
        text, value = _listops(rng, depth)
        return Example(text, str(value))

    train = [one() for _ in range(n_train)]
    val = [one() for _ in range(n_val)]
    labels = {"keyword": ["yes", "no"], "entail": ["yes", "no", "unknown"]}.get(name, [str(i) for i in range(10)])
    return ClassificationData(train, val, labels)


def read_jsonl(path: str | Path) -> list[Example]:
    """One {"text": str, "label": str|int} object per line; an optional "distance" (int)."""
    p = Path(path)
    out = []
    for n, obj in jsonl_records(p):
        if not isinstance(obj, dict) or "text" not in obj or "label" not in obj:
            missing = "text" if not isinstance(obj, dict) or "text" not in obj else "label"
            raise DynaformerError(f"data: {p}:{n} has no \"{missing}\" field")
        label = obj["label"]
        if not isinstance(obj["text"], str) or not isinstance(label, str | int) or isinstance(label, bool):
            raise DynaformerError(f"data: {p}:{n}: \"text\" must be a string and \"label\" a string or integer")
        dist = obj.get("distance", -1)
        if not isinstance(dist, int) or isinstance(dist, bool):
            raise DynaformerError(f"data: {p}:{n}: \"distance\" must be an integer, got {dist!r}")
        out.append(Example(obj["text"], str(obj["label"]), dist))
    if not out:
        raise DynaformerError(f"data: '{p}' holds no examples")
    return out


def load_jsonl_task(train_path: str, val_path: str) -> ClassificationData:
    train, val = read_jsonl(train_path), read_jsonl(val_path)
    a, b = {e.label for e in train}, {e.label for e in val}
    if a != b:
        only = sorted(b - a) or sorted(a - b)
        where = "validation" if b - a else "training"
        raise DynaformerError(f"data: the label sets of training and validation differ "
                              f"({only[:5]} only in the {where} file)")
    return ClassificationData(train, val)
