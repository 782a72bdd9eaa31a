"""The generated long-range tasks: deterministic, exact distances, unique answers, no leakage, scoring."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dynaformer.data.tasks import NAMES, PLACES, TASKS, TaskSampler, make_task, parse_task_spec
from dynaformer.errors import DynaformerError
from dynaformer.eval.longrange import evaluate_longrange, score
from dynaformer.model import ModelConfig, Transformer

L = 256


def _batch(name: str, n: int = 64, seed: int = 3, length: int = L):
    task = make_task(name)
    lo, hi = task.distance_range(length)
    d = np.random.default_rng(seed).integers(lo, hi + 1, n)
    d[:2] = lo, hi  # both ends of the range
    return task.generate(n, length, d, seed=seed), d


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_and_distance_exact(name):
    b1, d = _batch(name)
    b2, _ = _batch(name)
    b3, _ = _batch(name, seed=4)
    assert np.array_equal(b1.tokens, b2.tokens) and not np.array_equal(b1.tokens, b3.tokens)
    assert b1.tokens.shape == (64, L + 1) and b1.tokens.dtype == np.uint8
    assert np.array_equal(b1.distance, d)  # honoured exactly, including both ends of the valid range
    assert (b1.answers[:, -1] + b1.answer_len == L + 1).all()  # the probe ends the example
    rows = np.arange(64)[:, None]
    # The evidence tokens are the answer tokens (a copier of the evidence is right), and come before them.
    for q in range(b1.answers.shape[1]):
        ans = b1.tokens[rows, b1.answers[:, q : q + 1] + np.arange(b1.answer_len)]
        assert np.array_equal(b1.tokens[rows, b1.evidence[:, q]], ans)
        assert (b1.evidence[:, q] < b1.answers[:, q : q + 1]).all()
    b1.tokens.tobytes().decode("ascii")  # plain ASCII text


@pytest.mark.parametrize("name", list(TASKS))
def test_no_leakage(name):
    b, _ = _batch(name, n=48)
    A = b.answer_len
    for i in range(len(b.tokens)):
        a = int(b.answers[i, -1])
        prompt, answer = b.tokens[i, :a].tobytes(), b.tokens[i, a : a + A].tobytes()
        ev = b.evidence[i, -1]
        if name == "passkey":  # digits occur only in the evidence
            assert [j for j, c in enumerate(prompt) if chr(c).isdigit()] == list(ev)
        elif name == "selcopy":  # capitals occur only at the evidence positions
            assert [j for j, c in enumerate(prompt) if chr(c).isupper()] == list(ev)
        elif name == "mqar":  # the answer value occurs once in the prompt (values are distinct), keys unique
            assert prompt.count(answer) == 1 and prompt.find(answer) == ev[0]
            pairs = prompt[: prompt.index(b"|")]
            keys = [chr(c) for c in pairs if chr(c).isalpha() and chr(c) not in "thegrassisnkyblueuwmhrwodcak."]
            assert len(keys) == len(set(keys))
        else:  # storyqa: the place is named only in the supporting fact; X does not move after it
            assert answer.decode() in PLACES and prompt.count(answer) == 1 and prompt.find(answer) == ev[0]
            who = prompt.decode().rsplit("Where is ", 1)[1].split("?")[0]
            assert who in NAMES
            after = prompt[ev[0] :].decode()
            assert after.count(who) == 1  # only in the question


def test_unique_answer_storyqa_is_the_last_move():
    b, _ = _batch("storyqa", n=32)
    for i in range(32):
        text = b.tokens[i, : b.answers[i, 0]].tobytes().decode()
        who = text.rsplit("Where is ", 1)[1].split("?")[0]
        moves = [s.strip() for s in text.split(".") if s.strip().startswith(who + " ")]
        assert moves[-1].endswith(b.tokens[i, b.answers[i, 0] :].tobytes().decode())


def test_impossible_distance_and_unknown_task():
    with pytest.raises(DynaformerError, match="distance 300 is impossible at length 256"):
        make_task("passkey").generate(4, 256, 300)
    with pytest.raises(DynaformerError, match="distance 3 is impossible"):
        make_task("selcopy").generate(4, 256, 3)
    with pytest.raises(DynaformerError, match="unknown task 'bogus'"):
        make_task("bogus")
    with pytest.raises(DynaformerError, match="unknown task 'nope'"):
        parse_task_spec("task:passkey,nope")
    with pytest.raises(DynaformerError, match="unknown task option"):
        parse_task_spec("task:passkey?length=3")
    with pytest.raises(DynaformerError, match="too short"):
        make_task("storyqa").generate(2, 40, 60)


def test_generation_speed():
    """≥ 1M tokens/s per task (measured far above: benchmarks/RESULTS.md)."""
    for name in TASKS:
        task = make_task(name)
        lo, hi = task.distance_range(1024)
        d = np.random.default_rng(0).integers(lo, hi + 1, 500)
        t = time.perf_counter()
        b = task.generate(500, 1024, d)
        rate = b.tokens.size / (time.perf_counter() - t)
        assert rate > 1e6, (name, rate)


def test_sampler_masks_targets_and_resumes():
    spec = parse_task_spec("task:suite?dist=20-100")
    s = TaskSampler(spec, 8, 128, seed=5)
    x, y = s.next()
    assert x.shape == y.shape == (8, 128)
    kept = y != -100
    assert kept.any() and kept.sum() < 8 * 20  # answer tokens only
    assert torch.equal(y[:, :-1][kept[:, :-1]], x[:, 1:][kept[:, :-1]])  # targets are the next inputs
    s2 = TaskSampler(spec, 8, 128, seed=5)
    s2.load_state_dict(s.state_dict())
    a, b = s.next(), s2.next()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_scoring_oracle_random_and_untrained():
    length = 128

    def oracle(batch):  # copies the evidence of the probe
        return np.take_along_axis(batch.tokens, batch.evidence[:, -1], 1)

    res = evaluate_longrange(oracle, length, n_per_distance=20)
    for name, rec in res["tasks"].items():
        assert rec["exact"] == [1.0] * len(rec["distance"]), name
    rng = np.random.default_rng(0)

    def guesser(batch):  # uniform over the task's answer alphabet
        alphabet = make_task(batch.task).answer_alphabet
        return alphabet[rng.integers(0, len(alphabet), (len(batch.tokens), batch.answer_len))]

    res = evaluate_longrange(guesser, length, tasks=["passkey", "mqar"], n_per_distance=400)
    for name, rec in res["tasks"].items():
        chance = 1 / len(make_task(name).answer_alphabet)
        tok = np.mean(rec["token_acc"])
        assert abs(tok - chance) < 4 * np.sqrt(chance * (1 - chance) / (400 * len(rec["distance"]))), (name, tok)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, context_len=length))
    res = evaluate_longrange(model, length, n_per_distance=16)
    assert res["far_exact"] <= 0.1  # untrained: about chance (0 for multi-token answers)
    b = make_task("passkey").generate(4, length, 50)
    exact, tok = score(b, np.zeros((4, 5), dtype=np.uint8))
    assert not exact.any() and (tok == 0).all()
