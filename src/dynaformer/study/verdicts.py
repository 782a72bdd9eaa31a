"""The study's two questions (questions.py), each of their five options turned into a testable claim about
measured metrics.

A simple claim is "metric M of the variant differs from the reference's in direction ±, by at least δ"
(δ absolute, or relative to the reference mean). With the Welch difference Δ (signed so that + is the
claimed direction), its p-value and its (1−α) confidence interval:

- **supported**     p_Holm < α and Δ ≥ δ (significant after the familywise correction below, and at least as
                    large as claimed);
- **contradicted**  the interval's upper end < δ (confidently smaller than claimed — no effect, or the
                    opposite one);
- **inconclusive**  otherwise (too few seeds, too much noise, or a metric that was not recorded).

Compound options combine their parts: AND is supported when every part is and contradicted when any
part is; OR the reverse; NOT swaps supported and contradicted. Inconclusive is an honest answer. The parts
whose verdict equals the compound's decided it (a contradicted part of an AND, the supported parts of an OR, every
part when all agree), and the report shows those.

Familywise correction (Holm–Bonferroni): the family is one question's comparison of the tested variant with the
reference — the distinct metrics that its five options test (a metric tested by two options, or in both
directions, is one null hypothesis "no difference", with one two-sided Welch p-value). Each p is replaced by its
Holm-adjusted value before "supported" is decided, so the chance of any false "supported" among a question's
answers stays ≤ α. A metric with no p-value (not recorded, or equal in every seed) is not in the family.
"Contradicted" reads each test's own 95% interval. The minimum detectable effect of each test (stats.mde) is
taken at Holm's strictest level α/m, 80% power: the smallest true difference that this family's first rejection
would find four times in five.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from .questions import QUESTION_TEXTS, QuestionText
from .stats import holm, mde, mean_sd, welch

ALPHA = 0.05
POWER = 0.8  # of the minimum detectable effect
SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


# --- metrics: one number per cell (result.json) --------------------------------------------------

def _get(r: dict, *path, default=None):
    for p in path:
        if isinstance(r, dict) and p in r:
            r = r[p]
        elif isinstance(r, list) and isinstance(p, int) and -len(r) <= p < len(r):
            r = r[p]
        else:
            return default
    return r


def _ctx(r: dict, which: str):
    ctxs = _get(r, "text", "contexts", default=[]) or []
    if not ctxs:
        return None
    return min(ctxs, key=lambda c: c["multiple"]) if which == "train" else max(ctxs, key=lambda c: c["multiple"])


def _grad_ratio(r: dict):
    g = _get(r, "diagnostics", "grad_norm_layers")
    if not g or g[-1] <= 0 or g[0] <= 0:
        return None
    return math.log10(g[0] / g[-1])


def _task_mean(r: dict, task: str):
    acc = _get(r, "longrange", "tasks", task, "exact")
    return sum(acc) / len(acc) if acc else None


def _late_bpb(r: dict):
    c = _ctx(r, "train")
    return c["buckets"][-1]["bpb"] if c else None


def _long_bpb(r: dict):
    """bpb over the longest evaluated text, read the better of the two ways a model can be run on it: one
    pass over the whole sequence, or a sliding window of its training context (how a dense model is used)."""
    c = _ctx(r, "long")
    if not c:
        return None
    ways = [c["bpb"], _get(c, "sliding", "bpb")]
    return min(x for x in ways if x is not None)


def _summary_score(r: dict):
    """ROUGE-L of the greedy summaries (the ordered list of places), mean over distances."""
    rl = _get(r, "longrange", "tasks", "summary", "rouge_l")
    return sum(rl) / len(rl) if rl else None


def _at_longest(r: dict, key: str):
    """A cost measurement (study/cost.py) at the longest measured length."""
    vals = _get(r, "cost", key)
    return vals[-1] if vals else None


def _kv(r: dict):
    kv = _get(r, "compute", "kv_cache") or {}
    return kv.get("measured") or kv.get("analytic")


METRICS = {
    "val_bpb": ("held-out bits per byte (training context)", lambda r: r.get("val_bpb")),
    "gen_gap": ("generalisation gap: val − train loss (nats)", lambda r: r.get("gen_gap")),
    "grad_ratio": ("log₁₀ first/last-layer gradient norm", _grad_ratio),
    "far_acc": ("long-range exact match at distance ≥ context/2 (in a comparison: the tasks not at floor or "
                "ceiling in both arms)",
                lambda r: _get(r, "longrange", "far_exact")),
    "qa_acc": ("story QA exact match (all distances)", lambda r: _task_mean(r, "storyqa")),
    "summary_rouge": ("summary ROUGE-L of the greedy answer (all distances)", _summary_score),
    "late_bpb": ("bpb at the last position bucket of the training context", _late_bpb),
    "long_bpb": ("bpb over the longest evaluated text (4× the context), the better of one pass and a sliding "
                 "window", _long_bpb),
    "train_ms_long": ("training step ms (forward + backward) at the longest cost length, interleaved",
                      lambda r: _at_longest(r, "train_ms")),
    "decode_ms_long": ("decoding ms/token after the longest cost length, interleaved",
                       lambda r: _at_longest(r, "decode_ms")),
    "ms_step": ("training ms/step at the training context (from the run's own log; secondary)",
                lambda r: _get(r, "compute", "ms_step")),
    "infer_flops": ("forward FLOPs/token (attention over computed keys)",
                    lambda r: _get(r, "compute", "flops", "forward")),
    "kv_bytes": ("KV-cache bytes at the training context", _kv),
}


# Encoder cells (fine-tuned classifiers): judged in the report's encoder section, not in the questions' table.
ENCODER_METRICS = {
    "enc_accuracy": ("fine-tuned classification accuracy", lambda r: r.get("accuracy")),
    "enc_macro_f1": ("fine-tuned classification macro-F1", lambda r: r.get("macro_f1")),
}

DETERMINISTIC = {"infer_flops", "kv_bytes"}  # analytic or exact: equal across seeds by construction
ACCURACY = {"far_acc", "qa_acc", "summary_rouge"}  # both arms at the floor (< D_ACC) cannot tell them apart


def is_accuracy(metric: str) -> bool:
    """An exact-match / ROUGE metric (the floor rule applies, the report shows its minimum detectable effect)."""
    return metric in ACCURACY or metric.startswith(WALL_CLOCK + "val_exact")


WALL_CLOCK = "wc:"  # prefix of a training-curve reading at equal training time (wallclock.py), in r["wall_clock"]


def metric_value(r: dict, name: str):
    if name.startswith(WALL_CLOCK):
        return _get(r, "wall_clock", name.removeprefix(WALL_CLOCK))
    if name.startswith("attn_importance_l"):
        return _get(r, "diagnostics", "attn_ablation", "delta", int(name.rsplit("l", 1)[1]))
    v = (ENCODER_METRICS[name] if name in ENCODER_METRICS else METRICS[name])[1](r)
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else float(v)


def metric_label(name: str) -> str:
    if name.startswith(WALL_CLOCK):
        return f"{name.removeprefix(WALL_CLOCK)} of the training curve at equal training time (teacher-forced)"
    if name.startswith("attn_importance_l"):
        return f"attention importance, layer {name.rsplit('l', 1)[1]} (loss increase when ablated)"
    return METRICS[name][0]


# --- claims --------------------------------------------------------------------------------------

@dataclass
class Test:
    metric: str
    direction: int  # +1: the claim says the variant's value is higher
    delta: float
    relative: bool = False

    def describe(self) -> str:
        arrow = "↑" if self.direction > 0 else "↓"
        thr = f"{self.delta:.0%} of reference" if self.relative else f"{self.delta:g}"
        return f"{self.metric} {arrow} by ≥ {thr}"


@dataclass
class All:
    parts: list


@dataclass
class Any_:
    parts: list


@dataclass
class Not:
    part: object


@dataclass
class AllLayers:
    """The claim holds in every layer (per-layer metric `prefix{i}`)."""

    prefix: str
    direction: int
    delta: float
    relative: bool = True


@dataclass
class Evidence:
    test: str
    metric: str
    variant: str
    reference: str
    v: tuple[float, float, int] | None  # mean, sd, n
    r: tuple[float, float, int] | None
    diff: float | None
    p: float | None  # the test's own two-sided Welch p
    verdict: str
    note: str = ""
    p_holm: float | None = None  # Holm-adjusted within its family (the p that decides "supported")
    mde: float | None = None  # minimum detectable effect at the family's α/m and POWER (stats.mde)

    def record(self, decisive: bool | None = None) -> dict:
        """The part as report.json holds it (decisive: whether it decided its claim's verdict)."""
        v, r = self.v or (None, None, None), self.r or (None, None, None)
        rec = {"test": self.test, "metric": self.metric, "variant_mean": _num(v[0]), "variant_sd": _num(v[1]),
               "n": v[2], "reference_mean": _num(r[0]), "reference_sd": _num(r[1]), "reference_n": r[2],
               "diff": _num(self.diff), "p": _num(self.p), "p_holm": _num(self.p_holm), "mde": _num(self.mde),
               "verdict": self.verdict, "note": self.note}
        return rec if decisive is None else rec | {"decisive": decisive}


def _num(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


@dataclass(frozen=True)
class Family:
    """The tests judged together under one familywise correction: raw and Holm-adjusted p per metric, and the
    minimum detectable effect per metric at α/m."""

    p: dict[str, float]
    p_holm: dict[str, float]
    mde: dict[str, float | None]

    @property
    def size(self) -> int:
        return len(self.p)

    @property
    def alpha(self) -> float:
        """Holm's strictest level, α/m: what the strongest effect alone must beat."""
        return ALPHA / max(1, self.size)


def _values(results: list[dict], metric: str) -> list[float] | None:
    vals = [metric_value(r, metric) for r in results]
    return None if not vals or any(v is None for v in vals) else vals


def _far_by_task(r: dict) -> dict[str, tuple[float, float]] | None:
    """One run's (mean exact match over the distances ≥ half the evaluated length, chance) per long-range task."""
    lr = _get(r, "longrange") or {}
    length, tasks = lr.get("length"), lr.get("tasks")
    if not length or not tasks:
        return None
    out = {}
    for name, rec in tasks.items():
        far = [e for d, e in zip(rec.get("distance", []), rec.get("exact", []), strict=False) if d >= length / 2]
        if far:
            out[name] = (sum(far) / len(far), float(rec.get("chance") or 0.0))
    return out or None


def _far_pair(V: list[dict], R: list[dict]) -> tuple[list[float], list[float], list[str]] | None:
    """far_acc of a comparison over the tasks that can tell its two arms apart: a task on which both arms stay
    below chance + the accuracy threshold (floor) or both above 1 − threshold (ceiling) is left out, so that a
    difference on one task is not averaged away by tasks that say nothing. None: the per-task readings are
    missing in some run (the all-task mean is used), or the runs evaluated different tasks."""
    va, ra = [_far_by_task(r) for r in V], [_far_by_task(r) for r in R]
    if not va or not ra or any(x is None for x in va + ra) or len({frozenset(x) for x in va + ra}) != 1:
        return None
    names = sorted(va[0])
    kept, dropped = [], []
    for n in names:
        mv, mr = (sum(x[n][0] for x in arm) / len(arm) for arm in (va, ra))
        chance = va[0][n][1]
        (dropped if max(mv, mr) < chance + D_ACC or min(mv, mr) > 1 - D_ACC else kept).append(n)
    if not kept:
        return [], [], dropped

    def mean(x: dict) -> float:
        return sum(x[n][0] for n in kept) / len(kept)

    return [mean(x) for x in va], [mean(x) for x in ra], dropped


def is_floor(e: Evidence) -> bool:
    """Both arms of an accuracy test below the accuracy threshold: the task is too hard at this scale."""
    return is_accuracy(e.metric) and e.v is not None and e.r is not None and max(e.v[0], e.r[0]) < D_ACC


def judge_test(t: Test, V: list[dict], R: list[dict], vname: str, rname: str,
               family: Family | None = None) -> Evidence:
    """One simple claim. With a family, "supported" needs the Holm-adjusted p < α and the minimum detectable
    effect is taken at the family's α/m; without one, the test's own p and α."""
    a, b = _values(V, t.metric), _values(R, t.metric)
    task_note = ""
    if t.metric == "far_acc" and (pair := _far_pair(V, R)) is not None:
        a, b, dropped = pair
        if not a:
            return Evidence(t.describe(), t.metric, vname, rname, None, None, None, None, INCONCLUSIVE,
                            "every long-range task at the floor or the ceiling in both arms: nothing to tell apart")
        task_note = f"tasks at floor or ceiling in both arms left out: {', '.join(dropped)}" if dropped else ""
    if a is None or b is None:
        return Evidence(t.describe(), t.metric, vname, rname, None, None, None, None, INCONCLUSIVE,
                        "no reading at equal training time in every run" if t.metric.startswith(WALL_CLOCK)
                        else "not recorded in every run")
    w = welch(a, b, ALPHA)
    ma, sa = mean_sd(a)
    mb, sb = mean_sd(b)
    p = None if math.isnan(w.p) else w.p
    p_decides = p if family is None else family.p_holm.get(t.metric)
    size = mde(sa, len(a), sb, len(b), ALPHA if family is None else family.alpha, POWER)
    if t.metric in DETERMINISTIC:
        size = None

    def ev(verdict: str, note: str = "", p_shown=p) -> Evidence:
        note = "; ".join(x for x in (note, task_note) if x)
        return Evidence(t.describe(), t.metric, vname, rname, (ma, sa, len(a)), (mb, sb, len(b)), w.diff, p_shown,
                        verdict, note, None if family is None or p_shown is None else p_decides, size)

    if is_accuracy(t.metric) and max(ma, mb) < D_ACC:
        return ev(INCONCLUSIVE, f"both below {D_ACC:.0%} exact match: the task is too hard at this scale to tell")
    if t.metric not in DETERMINISTIC and len(a) > 1 and len(b) > 1 and sa == 0 and sb == 0:
        # A noisy metric that does not vary across seeds is at a floor or ceiling (e.g. every model at 0%
        # accuracy): the runs cannot tell the variants apart, which is not evidence against the claim.
        return ev(INCONCLUSIVE, "no variation across seeds (floor or ceiling)", None)
    delta = t.delta * abs(mb) if t.relative else t.delta
    s = t.direction * w.diff
    upper = max(t.direction * w.lo, t.direction * w.hi)
    if p_decides is not None and p_decides < ALPHA and s >= delta:
        verdict = SUPPORTED
    elif upper < delta:
        verdict = CONTRADICTED
    else:
        verdict = INCONCLUSIVE
    return ev(verdict, "" if len(a) > 1 and len(b) > 1 else "one seed per arm: no noise estimate")


class Judgement(NamedTuple):
    verdict: str
    evidence: list[Evidence]  # every simple part, in the claim's order
    decisive: list[int]  # indices into evidence: the parts that decided the verdict


def _layer_parts(claim: AllLayers, V: list[dict], R: list[dict]) -> list[Test] | None:
    n_v = {len(_get(r, "diagnostics", "attn_ablation", "delta", default=[]) or []) for r in V}
    n_r = {len(_get(r, "diagnostics", "attn_ablation", "delta", default=[]) or []) for r in R}
    if len(n_v) != 1 or n_v != n_r or 0 in n_v:
        return None
    return [Test(f"{claim.prefix}{i}", claim.direction, claim.delta, claim.relative) for i in range(n_v.pop())]


def simple_tests(claim, V: list[dict], R: list[dict]) -> list[Test]:
    """The simple tests a claim is made of, in order (per-layer claims expanded to the recorded layers)."""
    if isinstance(claim, Test):
        return [claim]
    if isinstance(claim, AllLayers):
        return _layer_parts(claim, V, R) or []
    if isinstance(claim, All | Any_):
        return [t for p in claim.parts for t in simple_tests(p, V, R)]
    if isinstance(claim, Not):
        return simple_tests(claim.part, V, R)
    raise TypeError(claim)


def family(claims: list, V: list[dict], R: list[dict], vname: str, rname: str) -> Family:
    """The Holm family of `claims` judged on V against R: one two-sided Welch p per distinct metric they test
    (metrics without a p-value left out), adjusted together."""
    first: dict[str, Test] = {}
    for c in claims:
        for t in simple_tests(c, V, R):
            first.setdefault(t.metric, t)
    raw: dict[str, float] = {}
    spread: dict[str, tuple] = {}
    for m, t in first.items():
        e = judge_test(t, V, R, vname, rname)
        if e.p is not None:
            raw[m] = e.p
            spread[m] = (e.v, e.r)
    adj = dict(zip(raw, holm(list(raw.values())), strict=True))
    alpha = ALPHA / max(1, len(raw))
    sizes = {m: None if m in DETERMINISTIC else mde(v[1], v[2], r[1], r[2], alpha, POWER)
             for m, (v, r) in spread.items()}
    return Family(raw, adj, sizes)


def judge(claim, V: list[dict], R: list[dict], vname: str, rname: str, fam: Family | None = None) -> Judgement:
    """The verdict of a claim, every simple part's evidence, and which parts decided it. `fam`: the Holm family
    the claim belongs to (family()); without it each test uses its own p."""
    if isinstance(claim, Test):
        e = judge_test(claim, V, R, vname, rname, fam)
        return Judgement(e.verdict, [e], [0])
    if isinstance(claim, AllLayers):
        parts = _layer_parts(claim, V, R)
        if parts is None:
            return Judgement(INCONCLUSIVE, [Evidence(f"{claim.prefix}* in every layer", claim.prefix, vname, rname,
                                                     None, None, None, None, INCONCLUSIVE,
                                                     "layer counts differ or not recorded")], [0])
        return judge(All(parts), V, R, vname, rname, fam)
    if isinstance(claim, All | Any_):
        sub = [judge(p, V, R, vname, rname, fam) for p in claim.parts]
        vs = [j.verdict for j in sub]
        if isinstance(claim, All):
            v = CONTRADICTED if CONTRADICTED in vs else SUPPORTED if all(x == SUPPORTED for x in vs) else INCONCLUSIVE
        else:
            v = SUPPORTED if SUPPORTED in vs else CONTRADICTED if all(x == CONTRADICTED for x in vs) else INCONCLUSIVE
        # The parts that agree with the whole decided it: the contradicted part of a contradicted AND, the
        # supported parts of a supported OR, every part when all agree, the undecided parts of an undecided one.
        ev, decisive, offset = [], [], 0
        for j in sub:
            ev += j.evidence
            if j.verdict == v:
                decisive += [offset + i for i in j.decisive]
            offset += len(j.evidence)
        return Judgement(v, ev, decisive)
    if isinstance(claim, Not):
        j = judge(claim.part, V, R, vname, rname, fam)
        return Judgement({SUPPORTED: CONTRADICTED, CONTRADICTED: SUPPORTED}.get(j.verdict, INCONCLUSIVE), j.evidence,
                         j.decisive)
    raise TypeError(claim)


# --- the questions -------------------------------------------------------------------------------

# Thresholds (the smallest effect that counts as "an effect"), stated in the report.
D_BPB = 0.01  # bits per byte
D_ACC = 0.05  # exact-match accuracy (5 points)
D_GAP = 0.02  # nats of train/val gap
D_GRAD = 0.1  # log10 first/last gradient ratio (a 26% change)
D_TIME = 0.05  # relative, of the reference's ms/step or FLOPs
D_ATTN = 0.10  # relative, of the reference layer's attention importance

BETTER_TEXT = Test("val_bpb", -1, D_BPB)
BETTER_FAR = Test("far_acc", +1, D_ACC)
BETTER_QA = Test("qa_acc", +1, D_ACC)
BETTER_SUMMARY = Test("summary_rouge", +1, D_ACC)
# Cost claims are judged where the cost applies: the interleaved measurement at the longest cost length.
SLOWER = Test("train_ms_long", +1, D_TIME, relative=True)
FASTER = Test("train_ms_long", -1, D_TIME, relative=True)
CHEAPER_INFERENCE = Test("decode_ms_long", -1, D_TIME, relative=True)


@dataclass
class Option:
    number: int
    text: str
    claim: object
    note: str = ""


@dataclass
class Question:
    key: str  # the grid's questions: entry naming the variant that tests it
    title: str
    options: list[Option]

    @property
    def text(self) -> QuestionText:
        """The question word for word, its options in full and the option its author marks correct."""
        return QUESTION_TEXTS[self.key]

    @property
    def marked(self) -> int:
        """The option the question's author marks correct (reported, never used to judge)."""
        return self.text.marked


QUESTIONS = [
    Question("residual", "Dynamic residual weighting: which outcome does a residual weighted by training progress "
             "and sequence length have?", [
                 Option(1, "Reduces generalisation: more overfitting", Test("gen_gap", +1, D_GAP)),
                 Option(2, "Exacerbates vanishing gradients in deep layers", Test("grad_ratio", -1, D_GRAD),
                        "first-layer gradient shrinking relative to the last"),
                 Option(3, "Improves learning of long-range dependencies", BETTER_FAR),
                 Option(4, "Uniformly decreases the importance of attention in all layers",
                        AllLayers("attn_importance_l", -1, D_ATTN)),
                 Option(5, "More compute without meaningful improvement",
                        All([SLOWER, Not(Any_([BETTER_TEXT, BETTER_FAR]))])),
             ]),
    Question("span", "Dynamic attention span: which outcome does a content-dependent attention span have?", [
                 Option(1, "Lower perplexity on long text (interpretability harder)", Test("long_bpb", -1, D_BPB),
                        "the interpretability clause is a judgement, not measured; see the span plots"),
                 Option(2, "Higher perplexity on long text", Test("long_bpb", +1, D_BPB)),
                 Option(3, "Better downstream QA and summarisation, but longer training time",
                        All([BETTER_QA, BETTER_SUMMARY, SLOWER])),
                 Option(4, "Lower training and inference cost, but worse modelling of nuance",
                        All([FASTER, CHEAPER_INFERENCE, Test("val_bpb", +1, D_BPB)])),
                 Option(5, "No significant gain in understanding or efficiency",
                        Not(Any_([BETTER_TEXT, BETTER_QA, BETTER_SUMMARY, BETTER_FAR, FASTER]))),
             ]),
]

# What a control comparison looks at: the tested variant against a control that removes only the question's
# mechanism (static learned residual weights; a fixed window of equal attention work; one span per head).
CONTROL_TESTS = {
    "residual": [BETTER_FAR, Test("qa_acc", +1, D_ACC), BETTER_TEXT],
    "span": [BETTER_QA, BETTER_SUMMARY, BETTER_FAR, Test("long_bpb", -1, D_BPB), BETTER_TEXT],
}


def compare_control(t: Test, V: list[dict], C: list[dict], vname: str, cname: str,
                    fam: Family | None = None) -> Evidence:
    """Two-sided reading of one metric, variant vs control: 'better' (significant, ≥ the threshold, in the
    good direction), 'worse' (the same in the other direction), else 'no difference shown' ('floor' when both
    stay below the accuracy threshold). With a family, significance is read on the Holm-adjusted p."""
    e = judge_test(t, V, C, vname, cname, fam)
    p = e.p if fam is None else e.p_holm
    if e.diff is None or p is None:
        e.verdict = "floor" if is_floor(e) else "no difference shown"
        return e
    delta = t.delta * abs(e.r[0]) if t.relative else t.delta
    signed = t.direction * e.diff
    e.verdict = ("floor" if is_floor(e) else "better" if p < ALPHA and signed >= delta
                 else "worse" if p < ALPHA and -signed >= delta else "no difference shown")
    return e


THRESHOLDS = {"α (two-sided Welch t-test, familywise after Holm's correction)": ALPHA,
              "power of the minimum detectable effect": POWER, "bits per byte": D_BPB, "exact-match accuracy": D_ACC,
              "train/val gap (nats)": D_GAP, "log10 gradient ratio": D_GRAD,
              "ms/step, decoding ms/token, FLOPs (relative)": D_TIME,
              "attention importance per layer (relative)": D_ATTN}
