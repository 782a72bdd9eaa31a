"""The generated long-range tasks: deterministic, exact distances, unique answers, no leakage, scoring."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dynaformer.data.tasks import NAMES, PLACES, PLACES_ARR, TASKS, TaskSampler, make_task, parse_task_spec
from dynaformer.errors import DynaformerError
from dynaformer.eval.longrange import evaluate_longrange, model_predictor, rouge_l, score, token_f1, word_scores
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
        elif name == "summary":  # X only in its visits and the question; the answer is its visits in order
            _check_summary(b, i)
        else:  # storyqa: the place is named only in the supporting fact; X does not move after it
            assert answer.decode() in PLACES and prompt.count(answer) == 1 and prompt.find(answer) == ev[0]
            who = prompt.decode().rsplit("Where is ", 1)[1].split("?")[0]
            assert who in NAMES
            after = prompt[ev[0] :].decode()
            assert after.count(who) == 1  # only in the question


def _check_summary(b, i: int) -> None:
    K, a = b.answers.shape[1], int(b.answers[i, 0])
    text, answer = b.tokens[i, :a].tobytes().decode(), b.tokens[i, a:].tobytes().decode()
    who = text.rsplit("Which places did ", 1)[1].split(" visit?")[0]
    assert who in NAMES and text.count(who) == K + 1  # nobody else's sentence mentions X
    moves = [s.strip() for s in text.split(".") if who in s][:-1]  # the last one is the question
    assert len(moves) == K and all(m.startswith(who + " ") for m in moves)
    visits = [m.rsplit(" ", 1)[1] for m in moves]
    assert answer == " ".join(visits) and len(set(visits)) == K and set(visits) <= set(PLACES)
    for q, place in enumerate(visits):  # the evidence is the place in X's q-th visit
        ev = b.evidence[i, q]
        assert b.tokens[i, ev].tobytes().decode() == place and text[: ev[0]].count(who) == q + 1


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


@pytest.mark.parametrize("length,visits", [(128, 2), (128, 3), (256, 2), (256, 3)])
def test_summary_every_distance_exact(length, visits):
    task = make_task("summary", visits=visits)
    lo, hi = task.distance_range(length)
    if (length, visits) == (128, 3):  # three visits, the question and the answers need more than 128 bytes
        assert hi < lo
        with pytest.raises(DynaformerError, match="task summary: length 128 is too short"):
            task.generate(2, length, 100)
        return
    assert hi - lo >= 20 if length == 128 else hi - lo >= 100  # many distances, even at 128
    d = np.arange(lo, hi + 1)  # every valid distance, both ends included
    b = task.generate(len(d), length, d, seed=5)
    assert np.array_equal(b.distance, d)
    assert np.array_equal(b.answers[:, 0] - b.evidence[:, 0, 0], d)  # how far back the summary reaches
    assert (b.answers == length + 1 - 7 * visits + 1 + 7 * np.arange(visits)).all()  # "PLACE PLACE … PLACE"
    assert (b.tokens[:, b.answers[0, 1:] - 1] == ord(" ")).all()  # one space between answers
    assert (np.diff(b.evidence[:, :, 0], axis=1) > 0).all()  # the visits come in order
    for i in range(len(d)):
        _check_summary(b, i)
    for bad in (lo - 1, hi + 1):
        with pytest.raises(DynaformerError, match=f"distance {bad} is impossible at length {length}"):
            task.generate(2, length, bad)


def test_summary_impossible_visits():
    for visits in (0, len(PLACES) + 1):  # each visit goes to a different place
        with pytest.raises(DynaformerError, match="1 ≤ visits ≤ 12"):
            make_task("summary", visits=visits)
    with pytest.raises(DynaformerError, match="1 ≤ visits ≤ 12"):
        parse_task_spec("task:summary?visits=13")
    with pytest.raises(DynaformerError, match="length 256 is too short"):
        make_task("summary", visits=7).generate(2, 256, 200)
    assert make_task("summary", visits=3).chance() == 12.0**-3


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

    def oracle(batch):  # copies the evidence of every scored answer into the answer region, spaces between
        probe_only = TASKS[batch.task].probe_only
        region = batch.answer_region(probe_only)
        ev = batch.evidence[:, -1:] if probe_only else batch.evidence
        pred = np.full(region.shape, ord(" "), dtype=np.uint8)
        np.put_along_axis(pred, batch.answer_positions(probe_only) - region[:, :1],
                          np.take_along_axis(batch.tokens, ev.reshape(len(ev), -1), 1), 1)
        return pred

    res = evaluate_longrange(oracle, length, n_per_distance=20)
    assert set(res["tasks"]) == set(TASKS)
    for name, rec in res["tasks"].items():
        assert rec["exact"] == [1.0] * len(rec["distance"]), name
        assert ("f1" in rec) == ("rouge_l" in rec) == (name == "summary")
    assert res["tasks"]["summary"]["f1"] == res["tasks"]["summary"]["rouge_l"] == [1.0, 1.0]
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


def test_word_scores_known_cases():
    g, m, o = "garden", "market", "office"
    assert token_f1([g, m], [g, m]) == rouge_l([g, m], [g, m]) == 1.0  # identical
    assert token_f1([m, g], [g, m]) == 1.0 and rouge_l([m, g], [g, m]) == 0.5  # reordered: F1 ignores order
    assert token_f1([o, m, g], [g, m, o]) == 1.0 and rouge_l([o, m, g], [g, m, o]) == pytest.approx(1 / 3)
    assert token_f1([g, o], [g, m]) == rouge_l([g, o], [g, m]) == 0.5  # one of two right
    assert token_f1([g], [g, m, o]) == rouge_l([g], [g, m, o]) == 0.5  # P = 1, R = 1/3
    assert token_f1([g, o, m, "school"], [g, m]) == pytest.approx(2 / 3)  # P = 1/2, R = 1
    assert token_f1([g, g], [g, m]) == rouge_l([g, g], [g, m]) == 0.5  # a repeat counts once
    assert token_f1([o], [g, m]) == rouge_l([o], [g, m]) == 0.0  # all wrong
    assert token_f1([], [g]) == rouge_l([], [g]) == 0.0 and token_f1([], []) == rouge_l([], []) == 1.0
    b = make_task("summary").generate(2, 128, 80, seed=0)
    truth = b.tokens[:, b.answers[0, 0] :].copy()
    swapped = np.concatenate([truth[:, 7:], truth[:, 6:7], truth[:, :6]], axis=1)  # "market garden"
    assert not score(b, swapped)[0].any() and (score(b, swapped)[1] < 1).all()  # places may share letters
    f1, rl = word_scores(b, swapped)
    assert (f1 == 1).all() and (rl == 0.5).all()
    glued = truth.copy()
    glued[:, 6] = ord("x")  # a wrong separator: every answer token right, but not the list
    exact, tok = score(b, glued)
    assert not exact.any() and (tok == 1).all() and (word_scores(b, glued)[0] == 0).all()


def test_summary_guesser_near_chance():
    """Independent uniform guesses of the 2 places: exact 1/144, F1 23/144 (each true place is guessed with
    probability 23/144), ROUGE-L 45/288 (an LCS ≥ 1 with probability 44/144, = 2 with 1/144)."""
    rng = np.random.default_rng(0)

    def guesser(batch):
        n, K = batch.answers.shape
        pred = np.full((n, K, 7), ord(" "), dtype=np.uint8)
        pred[:, :, :6] = PLACES_ARR[rng.integers(0, len(PLACES), (n, K))]
        return pred.reshape(n, -1)[:, :-1]

    rec = evaluate_longrange(guesser, 128, tasks=["summary"], n_per_distance=400)["tasks"]["summary"]
    n = 400 * len(rec["distance"])
    for got, want in ((rec["exact"], rec["chance"]), (rec["f1"], 23 / 144), (rec["rouge_l"], 45 / 288)):
        assert abs(np.mean(got) - want) < 4 * np.sqrt(0.1 / n), (got, want)  # per-example variance < 0.1
    assert rec["chance"] == 1 / 144


class _Lookup(torch.nn.Module):
    """A causal 'model' that knows the true examples: it predicts each one's next token, whatever it is fed."""

    def __init__(self, tokens: np.ndarray) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.tokens = torch.from_numpy(tokens.astype(np.int64))

    def forward(self, x):
        row = (x[:, None, :40] == self.tokens[None, :, :40]).all(2).float().argmax(1)  # which example
        return torch.nn.functional.one_hot(self.tokens[row, 1 : x.size(1) + 1], 256).float(), None


class _CopyBack(torch.nn.Module):
    """A causal 'model' that predicts the token 7 places back: in an answer list it repeats its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return torch.nn.functional.one_hot(torch.nn.functional.pad(x, (6, 0))[:, : x.size(1)], 256).float(), None


def test_greedy_decode_conditions_on_its_own_predictions():
    b = make_task("summary").generate(6, 128, 85, seed=2)
    a = int(b.answers[0, 0])
    truth = b.tokens[:, a:]
    for greedy in (False, True):  # an oracle is exactly right both ways
        pred = model_predictor(_Lookup(b.tokens), batch_size=4, greedy=greedy)(b)
        assert np.array_equal(pred, truth) and score(b, pred)[0].all()
        assert (word_scores(b, pred)[0] == 1).all() and (word_scores(b, pred)[1] == 1).all()
    forced = model_predictor(_CopyBack(), batch_size=4)(b)
    greedy = model_predictor(_CopyBack(), batch_size=4, greedy=True)(b)
    assert np.array_equal(forced, b.tokens[:, a - 7 : a + 6])  # teacher-forced: copies the true tokens
    prefix = b.tokens[:, a - 7 : a]  # greedy: after 7 tokens it copies what it wrote itself
    assert np.array_equal(greedy, np.concatenate([prefix, prefix[:, :6]], axis=1))
    assert np.array_equal(score(b, forced)[0], score(b, greedy)[0])  # both wrong: exact match agrees


def test_summary_spec_and_sampler_train():
    spec = parse_task_spec("task:summary?visits=3&len=256")
    assert spec.tasks == ["summary"] and spec.length == 256 and spec.params == {"summary": {"visits": 3}}
    assert spec.make()[0].visits == 3
    s = TaskSampler(spec, 4, 256, seed=1)
    x, y = s.next()
    kept = y != -100
    assert (kept.sum(1) == 3 * 7 - 1).all() and kept[:, -20:].all()  # the whole list, separators included
    for row in y[:, -20:]:
        places = bytes(row.tolist()).decode().split(" ")
        assert len(places) == 3 and set(places) <= set(PLACES)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, context_len=256))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(3):
        _, loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


@pytest.mark.parametrize("mixed", [True, False], ids=["with-text", "tasks-only"])
def test_weight_task_gives_each_task_its_row_share_of_the_loss(mixed):
    """weight=task: each task's answer targets averaged on their own, weighted by its share of the task rows
    (a task listed twice gets twice), whatever the length of its answers; weight=token: by answer tokens."""
    import torch

    from dynaformer.data import BatchSampler
    from dynaformer.data.tasks import TaskSampler, parse_task_spec

    text = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    mix = "&text=builtin:stories&frac=0.75" if mixed else ""
    for seed in range(3):
        spec = parse_task_spec(f"task:passkey,passkey,selcopy,summary?digits=1&weight=task{mix}")
        s = TaskSampler(spec, 16, 128, seed=seed, text_sampler=BatchSampler(text, 16, 128, seed=0) if mixed else None)
        x, y = s.next()
        w = s.loss_weights(y)
        n, frac = s.n_task, 0.75 if mixed else 1.0
        assert (w[y == -100] == 0).all()
        start, shares = 0, []
        for cnt in s._rows:
            shares.append(float(w[start:start + cnt].sum()))
            if cnt:  # within a task, every answer target weighs the same
                vals = w[start:start + cnt][y[start:start + cnt] != -100]
                assert torch.allclose(vals, vals[0].expand_as(vals))
            start += cnt
        assert shares == pytest.approx([frac * c / n for c in s._rows], rel=1e-5)
        if mixed:
            assert float(w[n:].sum()) == pytest.approx(0.25, rel=1e-5)
        # weight=token on the same batch: a one-token passkey answer weighs as much as one summary token
        s.spec.weight = "token"
        wt = s.loss_weights(y)
        if not mixed:
            assert wt is None
        else:
            vals = wt[:n][y[:n] != -100]
            assert torch.allclose(vals, vals[0].expand_as(vals))


def test_weight_option_is_checked():
    from dynaformer.data.tasks import parse_task_spec

    with pytest.raises(DynaformerError, match="bad value 'tokens' for 'weight'"):
        parse_task_spec("task:passkey?weight=tokens")
