"""Data for the bundled lm-eval tasks, generated at run time (no download; HF_DATASETS_OFFLINE=1 is fine).

Stories use the vocabulary of `dynaformer.data.corpus.generated_stories` (builtin:stories), whose
stories end in the same "Where is X? In the Y." form, so a model trained on it can score above chance.
"""

from __future__ import annotations

import random

import datasets

from dynaformer.data.corpus import (
    _FILLER,
    _NAMES,
    _PLACES,
    _THINGS,
    _VERBS_DROP,
    _VERBS_MOVE,
    _VERBS_TAKE,
    generated_stories,
)


def _distractor(rng: random.Random, others: list[str]) -> str:
    """A sentence that does not move the questioned character."""
    who, r = rng.choice(others), rng.random()
    if r < 0.4:
        return f"{who} {rng.choice(_VERBS_MOVE)} the {rng.choice(_PLACES)}."
    if r < 0.6:
        return f"{who} {rng.choice(_VERBS_TAKE)} the {rng.choice(_THINGS)}."
    if r < 0.75:
        return f"{who} {rng.choice(_VERBS_DROP)} the {rng.choice(_THINGS)}."
    return rng.choice(_FILLER)


def story_qa_docs(n_docs: int = 200, distractors: int = 4, seed: int = 1234) -> list[dict]:
    """Stories where a character moves (possibly more than once: the last move counts), then `distractors`
    sentences about the others, then "Where is X?". The supporting fact sits `distractors` sentences
    before the question; the 10 places are the choices (chance: 10%)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n_docs):
        who, *others = rng.sample(_NAMES, 3)
        place = rng.choice(_PLACES)
        lines = [_distractor(rng, others) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.5:  # an earlier, superseded location
            lines.append(f"{who} {rng.choice(_VERBS_MOVE)} the {rng.choice([p for p in _PLACES if p != place])}.")
            lines.append(_distractor(rng, others))
        lines.append(f"{who} {rng.choice(_VERBS_MOVE)} the {place}.")
        lines += [_distractor(rng, others) for _ in range(distractors)]
        docs.append({"id": i, "context": " ".join(lines) + f" Where is {who}?", "place": place,
                     "answer": f"In the {place}.", "choices": [f"In the {p}." for p in _PLACES],
                     "label": _PLACES.index(place), "distance": distractors})
    return docs


def story_qa(n_docs: int = 200, distractors: int = 4, seed: int = 1234, **metadata) -> dict:
    return {"test": datasets.Dataset.from_list(story_qa_docs(int(n_docs), int(distractors), int(seed)))}


def stories(n_docs: int = 40, seed: int = 4321, **metadata) -> dict:
    texts = [s.strip() for s in generated_stories(400 * int(n_docs), seed=int(seed)).split("\n\n") if s.strip()]
    return {"test": datasets.Dataset.from_list([{"id": i, "text": t} for i, t in enumerate(texts[: int(n_docs)])])}
