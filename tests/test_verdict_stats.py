"""The verdicts' statistics and how the answers read: the Holm–Bonferroni correction on known p-values, the
minimum detectable effect on a known case (and its power by simulation), "supported" decided on the corrected p,
and the part that decided a compound verdict shown in "Answers at a glance"."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dynaformer.study import verdicts as V
from dynaformer.study.report import answer_rows, resolution_sentence
from dynaformer.study.results import report_data
from dynaformer.study.stats import holm, mde, t_sf2, welch

from .study_fakes import fake_collected, fake_result


def _holm_by_hand(ps: list[float], alpha: float) -> set[int]:
    """Holm's step-down procedure as its definition states it: walk the p-values from the smallest, reject the
    k-th (from 0) while it is < α/(m − k), stop at the first that is not."""
    rejected = set()
    for k, i in enumerate(sorted(range(len(ps)), key=lambda i: ps[i])):
        if ps[i] >= alpha / (len(ps) - k):
            break
        rejected.add(i)
    return rejected


def test_holm_adjusts_a_known_sequence():
    ps = [0.01, 0.04, 0.03, 0.005, 0.2]
    # By hand, smallest first: 0.005·5 = 0.025; 0.01·4 = 0.04; 0.03·3 = 0.09; 0.04·2 = 0.08 → 0.09 (monotone);
    # 0.2·1 = 0.2.
    assert holm(ps) == pytest.approx([0.04, 0.09, 0.09, 0.025, 0.2])
    for alpha in (0.01, 0.03, 0.05, 0.1, 0.2):
        assert {i for i, p in enumerate(holm(ps)) if p < alpha} == _holm_by_hand(ps, alpha), alpha
    assert holm([0.5, 0.6, 0.7]) == [1.0, 1.0, 1.0]  # capped at 1
    assert holm([0.03]) == [0.03] and holm([]) == []
    rng = np.random.default_rng(0)
    for _ in range(50):  # random families agree with the step-down definition at every level
        ps = list(rng.uniform(0, 0.2, size=int(rng.integers(1, 9))))
        assert {i for i, p in enumerate(holm(ps)) if p < 0.05} == _holm_by_hand(ps, 0.05)


def test_minimum_detectable_effect_on_a_known_case():
    # sd 0.1 in both arms, 3 seeds each: ν = 4, se = 0.1·√(2/3); t(0.975, 4) = 2.776 and t(0.8, 4) = 0.941 (tables)
    assert mde(0.1, 3, 0.1, 3) == pytest.approx((2.776 + 0.941) * 0.1 * math.sqrt(2 / 3), rel=1e-3)
    # A stricter level (Holm's first step over 7 tests) needs a larger difference; more seeds a smaller one.
    assert mde(0.1, 3, 0.1, 3, alpha=0.05 / 7) > mde(0.1, 3, 0.1, 3) > mde(0.1, 5, 0.1, 5)
    # Unequal spreads: the degrees of freedom are Welch's, as in the test itself.
    a, b = [0.1, 0.3, 0.5, 0.2], [0.4, 0.45, 0.5]
    w = welch(a, b)
    sa, sb = np.std(a, ddof=1), np.std(b, ddof=1)
    from dynaformer.study.stats import t_quantile

    se = math.sqrt(sa**2 / 4 + sb**2 / 3)
    assert mde(sa, 4, sb, 3) == pytest.approx((t_quantile(0.975, w.df) + t_quantile(0.8, w.df)) * se)
    assert mde(0.1, 1, 0.1, 3) is None and mde(0.0, 3, 0.0, 3) is None


def test_minimum_detectable_effect_has_its_power():
    """Simulated: two arms of 5 normal seeds (sd 1) whose means differ by the MDE are told apart by the Welch
    test at α = 0.05 close to 80% of the time, and a difference of half of it far less often."""
    rng = np.random.default_rng(1)
    n, sims = 5, 3000
    d = mde(1.0, n, 1.0, n)

    def power(diff: float) -> float:
        a = rng.normal(diff, 1.0, (sims, n))
        b = rng.normal(0.0, 1.0, (sims, n))
        va, vb = a.var(1, ddof=1) / n, b.var(1, ddof=1) / n
        t = (a.mean(1) - b.mean(1)) / np.sqrt(va + vb)
        df = (va + vb) ** 2 / (va**2 / (n - 1) + vb**2 / (n - 1))
        return float(np.mean([t_sf2(x, f) < 0.05 for x, f in zip(t, df, strict=True)]))

    assert 0.72 < power(d) < 0.86
    assert power(d / 2) < 0.4


def _arms(far_v: list[float], far_r: list[float]) -> dict:
    """Reference and dynamic-residual cells whose far-distance accuracy is given; the other metrics the residual
    question tests vary across seeds but not between the arms (their p-values are large)."""
    def cell(name, s, far):
        return fake_result(name, s, far=far, bpb=2.0 + 0.01 * [0, 2, 1][s], gap=0.01 * [1, 0, 2][s],
                           ms=100 + [0, 3, 1][s], grad=(1.0, 1.0 + 0.05 * [2, 0, 1][s]),
                           attn=(0.5 + 0.01 * [1, 2, 0][s], 0.4 + 0.01 * s))
    return {"baseline": [cell("baseline", s, x) for s, x in enumerate(far_r)],
            "dyn_residual": [cell("dyn_residual", s, x) for s, x in enumerate(far_v)],
            "dyn_span": [cell("dyn_span", s, x) for s, x in enumerate(far_r)]}


def test_supported_needs_the_corrected_p():
    """Residual option 3 (far-distance accuracy up by ≥ 0.05): p < 0.05 on its own, but not after Holm over the
    question's family — inconclusive with the correction, supported without it."""
    res = _arms([0.42, 0.50, 0.46], [0.30, 0.36, 0.34])
    Vr, Rr = res["dyn_residual"], res["baseline"]
    q = V.QUESTIONS[0]
    claim = q.options[2].claim
    raw = welch([0.42, 0.50, 0.46], [0.30, 0.36, 0.34]).p
    assert raw < V.ALPHA
    fam = V.family([o.claim for o in q.options], Vr, Rr, "dyn_residual", "baseline")
    # the family: gen_gap, grad_ratio, far_acc, attention importance of each of 2 layers, train_ms_long, val_bpb
    assert set(fam.p) == {"gen_gap", "grad_ratio", "far_acc", "attn_importance_l0", "attn_importance_l1",
                          "train_ms_long", "val_bpb"}
    metrics = list(fam.p)
    assert [fam.p_holm[m] for m in metrics] == pytest.approx(holm([fam.p[m] for m in metrics]))
    assert fam.p["far_acc"] == pytest.approx(raw) and fam.p_holm["far_acc"] >= V.ALPHA
    assert V.judge(claim, Vr, Rr, "dyn_residual", "baseline").verdict == V.SUPPORTED  # uncorrected
    assert V.judge(claim, Vr, Rr, "dyn_residual", "baseline", fam).verdict == V.INCONCLUSIVE
    # report.json and the answers say the same, with the Holm p and the MDE next to the accuracy verdict
    data = report_data(fake_collected(res))
    rec = next(v for v in data["verdicts"] if v["question"] == "residual" and v["option"] == 3)
    assert rec["verdict"] == "inconclusive" and rec["p_holm"] == pytest.approx(fam.p_holm["far_acc"])
    assert rec["mde"] == pytest.approx(fam.mde["far_acc"])
    row = next(r for r in answer_rows(data) if r[0] == "residual" and r[1].startswith("3"))
    assert f"Holm p={rec['p_holm']:.2g}" in row[4] and "MDE" in row[4]
    # A stronger effect survives the correction.
    strong = _arms([0.62, 0.70, 0.66], [0.30, 0.36, 0.34])
    data = report_data(fake_collected(strong))
    assert next(v for v in data["verdicts"] if v["question"] == "residual" and v["option"] == 3)["verdict"] == \
        "supported"
    # What the data can tell: the far-distance MDE of the family, in one sentence naming the seeds.
    s = resolution_sentence(data, "residual")
    mde_far = data["families"]["residual"]["mde"]["far_acc"]
    assert f"{mde_far:.2g} in far-distance exact match" in s and "3 seeds of 'dyn_residual'" in s
    assert data["families"]["residual"]["size"] == 7 and data["correction"]["method"] == "Holm–Bonferroni"


def test_the_part_that_decided_a_compound_verdict_is_shown():
    """Span option 5 ("no significant gain") is NOT(ANY(text, QA, summary, far, faster)). Text bpb equal, QA far
    better: contradicted, and the answer shows the QA part, not the first part (bpb)."""
    def span_cell(name, s, qa, bpb, ms):
        return fake_result(name, s, qa=qa, bpb=bpb, ms=ms, summary=0.6 + 0.02 * [0, 2, 1][s],
                           far=0.3 + 0.02 * [1, 0, 2][s], long_bpb=2.5 + 0.01 * s)
    ref = [span_cell("baseline", s, 0.60 + 0.01 * s, 2.0 + 0.01 * [0, 2, 1][s], 100 + [0, 2, 1][s]) for s in range(3)]
    var = [span_cell("dyn_span", s, 0.90 + 0.01 * [1, 0, 2][s], 2.0 + 0.01 * [1, 0, 2][s], 100 + [1, 0, 2][s])
           for s in range(3)]
    data = report_data(fake_collected({"baseline": ref, "dyn_span": var}))
    opt5 = next(v for v in data["verdicts"] if v["question"] == "span" and v["option"] == 5)
    assert opt5["verdict"] == "contradicted"
    decided = [opt5["evidence"][i] for i in opt5["decided_by"]]
    assert [e["metric"] for e in decided] == ["qa_acc"] and decided[0]["verdict"] == "supported"
    assert [e["decisive"] for e in opt5["evidence"]] == [e["metric"] == "qa_acc" for e in opt5["evidence"]]
    assert opt5["metric"] == "qa_acc" and opt5["variant_mean"] == pytest.approx(0.91)  # the deciding number
    row = next(r for r in answer_rows(data) if r[0] == "span" and r[1].startswith("5"))
    assert row[4].startswith("qa_acc ↑ by ≥ 0.05: supported (0.91 vs 0.61") and "val_bpb" not in row[4]
    assert "held (supported): qa_acc" in row[5] and "inconclusive: val_bpb" in row[5]
    assert "summary_rouge ↑ by ≥ 0.05 (MDE " in row[5] and "val_bpb ↓ by ≥ 0.01 (MDE" not in row[5]  # accuracy parts
    # Option 3 (QA and summary better AND slower): the contradicted parts decide — summary equal in both arms,
    # training time equal — not the supported QA part.
    opt3 = next(v for v in data["verdicts"] if v["question"] == "span" and v["option"] == 3)
    assert opt3["verdict"] == "contradicted"
    assert [opt3["evidence"][i]["metric"] for i in opt3["decided_by"]] == ["summary_rouge", "train_ms_long"]
    row = next(r for r in answer_rows(data) if r[0] == "span" and r[1].startswith("3"))
    assert row[4].startswith("summary_rouge ↑ by ≥ 0.05: contradicted") and "qa_acc" not in row[4]
    # An undecided AND: the undecided part decided it. When every part agrees, every part decided, and the answer
    # says so.
    j = V.judge(V.All([V.BETTER_QA, V.Test("kv_bytes", -1, 0.05)]), var, ref, "dyn_span", "baseline")  # not recorded
    assert j.verdict == V.INCONCLUSIVE and j.decisive == [1]
    j = V.judge(V.All([V.BETTER_QA, V.BETTER_QA]), var, ref, "dyn_span", "baseline")
    assert j.verdict == V.SUPPORTED and j.decisive == [0, 1]
    from dynaformer.study.report import decided_text

    rec = {"evidence": [e.record() for e in j.evidence], "decided_by": j.decisive}
    assert decided_text(rec).startswith("every part supported: qa_acc")


def test_the_questions_are_in_the_report_word_for_word():
    from dynaformer.study.questions import QUESTION_TEXTS

    data = report_data(fake_collected(_arms([0.4, 0.5, 0.45], [0.3, 0.36, 0.34])))
    for key, q in QUESTION_TEXTS.items():
        rec = data["question_text"][key]
        assert rec["text"] == q.text and rec["options"] == list(q.options) and len(rec["options"]) == 5
        assert rec["text"].endswith("?") and all(len(o) > 60 for o in rec["options"])
        marked = [v["option"] for v in data["verdicts"] if v["question"] == key and v["marked_correct"]]
        assert marked == [q.marked]
    assert "seed_answer" not in data["verdicts"][0]
    # An older report.json (seed_answer, no decided_by) still renders.
    old = {"verdicts": [{**v, "seed_answer": v["marked_correct"]} for v in data["verdicts"]]}
    for v in old["verdicts"]:
        del v["marked_correct"], v["decided_by"]
    rows = answer_rows(old)
    assert [r[1] for r in rows] == [r[1] for r in answer_rows(data)]


def test_an_accuracy_mde_above_one_reads_not_detectable():
    """Two seeds per arm with a wide spread: the far-distance MDE exceeds 1, more than any accuracy difference can
    be. The answers and the data-can-tell sentence say no difference is detectable instead of printing it."""
    from dynaformer.study.report import mde_text
    assert mde_text(1.7, True) == "> 1 (not detectable)" and mde_text(0.4, True) == "0.4"
    assert mde_text(1.7, False) == "1.7" and mde_text(None, True) == "—"  # bits per byte have no such bound
    data = report_data(fake_collected(_arms([0.1, 0.7], [0.0, 0.6])))
    fam = data["families"]["residual"]
    assert fam["mde"]["far_acc"] > 1
    s = resolution_sentence(data, "residual")
    assert "No accuracy difference at all can be detected in far-distance exact match" in s
    assert "in far-distance exact match cannot" not in s and f"{fam['mde']['far_acc']:.2g} in far" not in s
    row = next(r for r in answer_rows(data) if r[0] == "residual" and r[1].startswith("3"))
    assert "MDE > 1 (not detectable)" in row[4]


def _lr(far: dict[str, float], chance: float = 0.1, length: int = 128) -> dict:
    """A run's long-range record: each task read at a near and a far distance (the far one carries `far`)."""
    tasks = {n: {"distance": [8, length // 2], "exact": [1.0, a], "chance": chance} for n, a in far.items()}
    mean_far = sum(far.values()) / len(far)
    return {"longrange": {"length": length, "tasks": tasks, "far_exact": mean_far}}


def test_far_accuracy_leaves_out_tasks_at_floor_or_ceiling_in_both_arms():
    # passkey at the ceiling in both arms and selcopy at the floor in both: only storyqa can tell them apart.
    # Averaged over all three, its 0.3-point gap shrinks to 0.1 and stays under the noise; on storyqa alone it
    # is a clear gain.
    V_ = [_lr({"passkey": 1.0, "selcopy": 0.0, "storyqa": a}) for a in (0.80, 0.82, 0.78)]
    R_ = [_lr({"passkey": 1.0, "selcopy": 0.0, "storyqa": a}) for a in (0.50, 0.52, 0.48)]
    e = V.judge_test(V.BETTER_FAR, V_, R_, "v", "r")
    assert e.v[0] == pytest.approx(0.80) and e.r[0] == pytest.approx(0.50)
    assert e.verdict == V.SUPPORTED
    assert "passkey" in e.note and "selcopy" in e.note and "storyqa" not in e.note
    # The floor is read against each task's chance: 0.12 on a task with chance 0.1 is at the floor.
    V_ = [_lr({"passkey": 1.0, "storyqa": 0.12}) for _ in range(3)]
    R_ = [_lr({"passkey": 1.0, "storyqa": 0.11}) for _ in range(3)]
    e = V.judge_test(V.BETTER_FAR, V_, R_, "v", "r")
    assert e.verdict == V.INCONCLUSIVE and "nothing to tell apart" in e.note and e.v is None
    # A task that one arm solves and the other does not is kept (not a shared ceiling).
    V_ = [_lr({"passkey": 1.0, "storyqa": 0.5}) for _ in range(3)]
    R_ = [_lr({"passkey": a, "storyqa": 0.5}) for a in (0.2, 0.25, 0.3)]
    e = V.judge_test(V.BETTER_FAR, V_, R_, "v", "r")
    assert e.note == "" and e.v[0] == pytest.approx(0.75) and e.r[0] == pytest.approx(0.375)
    # Runs without per-task readings fall back to the all-task mean.
    e = V.judge_test(V.BETTER_FAR, [{"longrange": {"far_exact": x}} for x in (0.7, 0.72, 0.71)],
                     [{"longrange": {"far_exact": x}} for x in (0.5, 0.52, 0.51)], "v", "r")
    assert e.verdict == V.SUPPORTED and e.v[0] == pytest.approx(0.71)


def test_relatives_are_read_against_the_mechanism_and_the_reference():
    from dynaformer.study.render import Heading, Table
    from dynaformer.study.report import build

    def arm(name, **kw):
        return [fake_result(name, s, **{k: v + 0.002 * s for k, v in kw.items()}) for s in range(3)]

    col = fake_collected(
        {"baseline": arm("baseline", ms=100.0, decode=10.0), "dyn_span": arm("dyn_span", ms=40.0, decode=12.0),
         "fox": arm("fox", ms=20.0, decode=12.0), "sink_window": arm("sink_window", ms=40.0, decode=12.0)},
        questions={"reference": "baseline", "residual": None, "span": "dyn_span",
                   "relatives": {"span": ["fox", "sink_window", "not_trained"]}})
    data = report_data(col)
    rel = data["relatives"]["span"]
    assert rel["arms"] == ["baseline", "dyn_span", "fox", "sink_window"] and rel["relatives"] == ["fox", "sink_window"]
    assert rel["summary"]["fox"]["train_ms_long"]["mean"] == pytest.approx(20.002)
    reading = {(c["relative"], c["against"], c["metric"]): c["verdict"] for c in rel["comparisons"]}
    # fox trains at half the mechanism's time and a fifth of the reference's: better on both; the sink window
    # costs what the mechanism costs (no difference) and decodes slower than the reference (worse).
    assert reading[("fox", "dyn_span", "train_ms_long")] == "better"
    assert reading[("fox", "baseline", "train_ms_long")] == "better"
    assert reading[("sink_window", "dyn_span", "train_ms_long")] == "no difference shown"
    assert reading[("sink_window", "baseline", "decode_ms_long")] == "worse"
    assert {c["against"] for c in rel["comparisons"]} == {"dyn_span", "baseline"}
    blocks = build(col, plots=False, data=data)
    i = next(i for i, b in enumerate(blocks) if isinstance(b, Heading) and b.text == "Relatives")
    table = next(b for b in blocks[i:] if isinstance(b, Table))
    assert [row[0] for row in table.rows] == ["baseline (reference)", "dyn_span (mechanism)", "fox (relative)",
                                              "sink_window (relative)"]
    # A grid without relatives has no such section.
    plain = report_data(fake_collected({"baseline": arm("baseline"), "dyn_span": arm("dyn_span")}))
    assert plain["relatives"] == {}
    assert not any(isinstance(b, Heading) and b.text == "Relatives" for b in build(col, plots=False, data=plain))
