"""`dynaformer report`: report.json, report.md and a self-contained report.html from `compare` folders (or
cell folders).

    collect.py   the finished cells, grouped by variant, and the skipped ones with the reason
    results.py   report.json: every number, built once (verdicts, controls, per-variant metrics, cost, limits)
    figures.py   the figures, each described once (title, caption, how it is drawn, whether it has data)
    report.py    (here) the document: its sections as blocks, each table rendered from report.json
    render.py    one Document → report.json, Markdown and HTML

The document: the study's two questions word for word, the answer to each of their options with the part that
decided it, what the study cannot tell at its size and what each question's data can distinguish, the full verdict
table (verdicts.py; Holm-corrected), the mechanisms against their controls, the verdicts again at equal training
time (wallclock.py), cost at long lengths, long text, every variant's metrics, the encoder study
(encoder_report.py), the figures, and the runs that were skipped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ..plotting import pyplot
from .collect import Collected, collect
from .encoder_report import encoder_blocks
from .figures import FIGURES, colors_for
from .render import Block, Document, Heading, Image, Paragraph, Table, write_document
from .results import report_data
from .verdicts import METRICS, THRESHOLDS, WALL_CLOCK, is_accuracy

__all__ = ["Document", "VerdictRow", "answer_rows", "build", "collect", "limits_text", "part_text",
           "resolution_sentence", "verdict_rows", "write_report"]


@dataclass(frozen=True)
class VerdictRow:
    """One option of one of the study's questions in the verdict table, as displayed (strings)."""
    question: str
    option: str
    claim: str
    metric: str
    variant: str  # mean ± sd (n=)
    reference: str
    p: str
    evidence: str  # every part of the claim: its test, Δ, p and verdict
    verdict: str  # **bold**: the HTML colours the cell by it
    vs_size_matched: str
    vs_controls: str

    HEAD = ("question", "option", "claim", "deciding metric", "variant mean ± sd", "reference mean ± sd",
            "p (Holm)", "evidence (every part; * decided)", "verdict", "vs size-matched", "vs controls")

    def cells(self) -> list[str]:
        return [self.question, self.option, self.claim, self.metric, self.variant, self.reference, self.p,
                self.evidence, self.verdict, self.vs_size_matched, self.vs_controls]


def _mde_clause(e: dict) -> str:
    return f", MDE {mde_text(e['mde'], is_accuracy(e.get('metric') or ''))}" if e.get("mde") is not None else ""


def verdict_rows(data: dict) -> list[VerdictRow]:
    rows = []
    for v in data["verdicts"]:
        opt = str(v["option"]) + (" ★" if marked(v) else "")
        if v["verdict"] == "not tested":
            rows.append(VerdictRow(v["question"], opt, v["claim"], "—", "—", "—", "—", "—",
                                   f"not tested: {v['why']}", "—", "—"))
            continue
        evidence = "; ".join(("* " if e.get("decisive") else "") + f"{e['test']}: Δ={_fmt(e['diff'])}, "
                             f"{_p(e)}" + _mde_clause(e)
                             + f" → {e['verdict']}" + (f" ({e['note']})" if e["note"] else "") for e in v["evidence"])
        controls = ", ".join(f"{c}: {x}" for c, x in v["vs_controls"].items()) or "—"
        rows.append(VerdictRow(v["question"], opt, v["claim"], v["metric_label"],
                               _pm(v["variant_mean"], v["variant_sd"], v["n"]),
                               _pm(v["reference_mean"], v["reference_sd"], v["reference_n"]),
                               f"{_fmt(v['p'], 2)} ({_fmt(v.get('p_holm'), 2)})",
                               evidence + (f". {v['note']}" if v["note"] else ""), f"**{v['verdict']}**",
                               v["vs_size_matched"] or "—", controls))
    return rows


# --- the document --------------------------------------------------------------------------------

def build(col: Collected, plots: bool = True, data: dict | None = None) -> list[Block]:
    """The report's blocks. The tables are rendered from `data` (report.json; built here when not given);
    plots=False only checks which figures have data (their Image.png is b"" or None; nothing is drawn)."""
    data = data if data is not None else report_data(col)
    blocks: list[Block] = [Heading(1, f"dynaformer report: {', '.join(col.grids) or 'runs'}"), _overview(col)]
    blocks += _questions(data) + _answers(data) + _verdicts(data) + _controls(data) + _relatives(data)
    blocks += _wall_clock(data)
    blocks += [Heading(2, "Cost at long lengths"), *cost_blocks(data)]
    blocks += _long_text(data) + _variants(data)
    enc_colors = colors_for(sorted({v for by in col.encoder.values() for v in by} | set(col.results)))
    blocks += encoder_blocks(col.encoder, col.questions.get("reference", "baseline"), enc_colors, pyplot(), plots,
                             col.encoder_pretrain)
    blocks += _figures(col, plots)
    blocks.append(Heading(2, "Skipped runs"))
    blocks.append(Table(["run", "why"], [[c, w] for c, w in col.skipped]) if col.skipped else
                  Paragraph("None: every cell finished."))
    return blocks


def _overview(col: Collected) -> Paragraph:
    q = col.questions
    n_runs = sum(len(v) for v in col.results.values())
    controls = q.get("controls") or {}
    size = f"'{q.get('size_matched')}'" if q.get("size_matched") in col.results else "none in these runs"
    return Paragraph(f"{n_runs} finished runs over {len(col.results)} variants "
                     f"({', '.join(f'{v}×{len(r)}' for v, r in col.results.items())}); reference variant "
                     f"'{q.get('reference')}', residual question tested by '{q.get('residual')}' (controls: "
                     f"{', '.join(controls.get('residual', [])) or '—'}), span question by '{q.get('span')}' "
                     f"(controls: {', '.join(controls.get('span', [])) or '—'}), size-matched baseline {size}. "
                     f"Every number below is in report.json.")


def _questions(data: dict) -> list[Block]:
    """Each question word for word, with its five options in full."""
    texts = data.get("question_text") or {}
    blocks: list[Block] = [Heading(2, "The study's questions")] if texts else []
    for key, q in texts.items():
        blocks.append(Paragraph(f"**{key.capitalize()} question** (tested by '{data['questions'].get(key)}' against "
                                f"'{data['questions'].get('reference')}'). {q['text']}"))
        blocks.append(Table(["option", "text"], [[str(i) + (" ★" if i == q["marked"] else ""), o]
                                                 for i, o in enumerate(q["options"], 1)]))
    if texts:
        blocks.append(Paragraph("★ the option the question's author marks correct; it plays no part in judging."))
    return blocks


def _answers(data: dict) -> list[Block]:
    blocks: list[Block] = [
        Heading(2, "Answers at a glance"),
        Paragraph("Each option's verdict (tested variant vs reference) and the part of its claim that decided it: the "
                  "part itself for a simple claim; for a compound one, the parts whose verdict is the whole's (a "
                  "contradicted part of an AND, the supported parts of an OR or of a NOT, every part when all "
                  "agree), then every part's own verdict. Numbers: variant vs reference mean, the test's p and its "
                  "Holm-corrected p, and for accuracy the minimum detectable effect (MDE). ★ marks the option the "
                  "question's author marks correct; it plays no part in judging."),
        Table(["question", "option", "claim", "verdict", "decided by", "every part"], answer_rows(data))]
    if data.get("correction"):
        blocks.append(Paragraph(correction_text(data)))
    for q in data.get("families") or {}:
        blocks.append(Paragraph(resolution_sentence(data, q)))
    if data.get("limits"):
        blocks.append(Paragraph(limits_text(data["limits"])))
    return blocks


def _verdicts(data: dict) -> list[Block]:
    return [
        Heading(2, "Verdicts"),
        Paragraph("Each option of each of the study's questions becomes a claim about measured metrics of the tested "
                  "variant versus the reference (mean ± sd over seeds; Welch t-test). supported: the Holm-corrected "
                  "p < α (the family: the question's tests) and the effect is at least the threshold in the claimed "
                  "direction; contradicted: the test's 95% interval of the effect lies below the threshold (no effect "
                  "of that size, or the opposite); inconclusive: neither. Compound options: AND needs every part, OR "
                  "any part, NOT swaps; * marks the parts that decided. The last two columns repeat the test against "
                  "the size-matched larger baseline and against the controls (each comparison its own Holm family). "
                  "Accuracy claims where both arms stay below the accuracy threshold are inconclusive (floor). Cost "
                  "claims use the interleaved long-length measurement below (section Cost); long-text perplexity "
                  "takes each variant the better way it can be run (one pass or a sliding window of its training "
                  "context)."),
        Table(["name", "value"], [[k, _fmt(v)] for k, v in THRESHOLDS.items()]),
        Table(list(VerdictRow.HEAD), [r.cells() for r in verdict_rows(data)])]


def _controls(data: dict) -> list[Block]:
    return [
        Heading(2, "Mechanism versus controls"),
        Paragraph("Does the question's mechanism matter, or does something simpler do the same? Residual: the dynamic "
                  "residual against static learned weights (one learned gain per branch, no step, position or "
                  "content terms). Span: content-dependent spans against a fixed window of equal attention work (its "
                  "window is each seed's trained dynamic-span mean keys per query) and against one learned span per "
                  "head. Each control is also compared with the reference. better / worse: Holm-corrected p < α "
                  "(within each pair's metrics) and at least the threshold; floor: both below the accuracy threshold."),
        Table(["question", "comparison", "metric", "variant mean ± sd", "control mean ± sd", "p (Holm)", "reading"],
              control_rows(data)) if data["controls"] else
        Paragraph("No controls in this grid (questions.controls).")]


def _relatives(data: dict) -> list[Block]:
    rel = data.get("relatives") or {}
    if not rel:
        return []
    blocks: list[Block] = [
        Heading(2, "Relatives"),
        Paragraph("The newest methods that do each question's job another way, trained with the same seeds and "
                  "budget: each arm's means, then each relative read against the question's mechanism and against "
                  "the reference on the control metrics and the costs at the longest measured length (faster is "
                  "better). better / worse: Holm-corrected p < α within each pair's metrics and at least the "
                  "threshold; floor: both below the accuracy threshold.")]
    for q, r in rel.items():
        head, rows = relative_summary_rows(r)
        blocks += [Heading(3, f"{q} question: {r['mechanism']} and its relatives"), Table(head, rows)]
        by_distance = relative_distance_rows(data, r)
        for task, (dh, drows) in by_distance.items():
            blocks += [Paragraph(f"{task}: exact match by distance (mean over seeds)."), Table(dh, drows)]
        blocks.append(Table(["comparison", "metric", "relative mean ± sd", "against mean ± sd", "p (Holm)",
                             "reading"], relative_comparison_rows(r)))
    return blocks


REL_HEAD = {"val_bpb": "val bpb", "long_bpb": "long-text bpb", "far_acc": "far exact", "qa_acc": "story QA",
            "summary_rouge": "summary ROUGE-L", "train_ms_long": "train ms at L", "decode_ms_long": "decode ms at L",
            "kv_bytes": "KV bytes"}


def relative_summary_rows(r: dict) -> tuple[list[str], list[list[str]]]:
    metrics = [m for m in REL_HEAD if any((r["summary"].get(a) or {}).get(m) for a in r["arms"])]
    role = {r["reference"]: "reference", r["mechanism"]: "mechanism"}
    rows = []
    for a in r["arms"]:
        cells = [(r["summary"][a] or {}).get(m) for m in metrics]
        rows.append([f"{a} ({role.get(a, 'relative')})", *[_pm(c["mean"], c["sd"], c["n"]) if c else "—"
                                                           for c in cells]])
    return ["arm", *[REL_HEAD[m] for m in metrics]], rows


def relative_distance_rows(data: dict, r: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Per long-range task, the arms' exact match at each distance (the tasks every arm was evaluated on)."""
    lr = data.get("longrange") or {}
    tasks = set.intersection(*[set(lr.get(a) or {}) for a in r["arms"]]) if r["arms"] else set()
    out = {}
    for t in sorted(tasks):
        dist = lr[r["arms"][0]][t]["distance"]
        if any(lr[a][t]["distance"] != dist for a in r["arms"]):
            continue
        out[t] = (["arm", *[str(d) for d in dist]],
                  [[a, *[_fmt(x, 2) for x in lr[a][t].get("exact", [])]] for a in r["arms"]])
    return out


def relative_comparison_rows(r: dict) -> list[list[str]]:
    return [[f"{c['relative']} vs {c['against']}", c["metric_label"],
             _pm(c["relative_mean"], c["relative_sd"], c["n"]), _pm(c["against_mean"], c["against_sd"], c["against_n"]),
             f"{_fmt(c['p'], 2)} ({_fmt(c.get('p_holm'), 2)})", f"**{c['verdict']}**"] for c in r["comparisons"]]


def _wall_clock(data: dict) -> list[Block]:
    wc = data.get("wall_clock") or {}
    if not wc.get("questions"):
        return []
    how = wc["how"]
    blocks: list[Block] = [
        Heading(2, "Equal training time"),
        Paragraph("The verdicts above compare models trained on equal tokens. Here each question's tested variant and "
                  f"the reference are read at equal training time instead. Training time: {how['clock']}. t*: "
                  f"{how['t_star']}. Each cell's curve is read at t* by {how['reading']}. What is read: "
                  f"{how['metrics']}. Parts with no curve metric (cost, long-text bpb) keep their equal-token "
                  "measurement. A run read part-way has not finished its learning-rate decay, so its reading is a "
                  "lower bound for the arm that stopped early.")]
    for key, q in wc["questions"].items():
        if q.get("why"):
            blocks.append(Paragraph(f"**{key.capitalize()} question**: not read ({q['why']})."))
            continue
        tv, tr = q["train_s"]["variant"], q["train_s"]["reference"]
        cells = q["cells"]["variant"] + q["cells"]["reference"]
        steps = sorted({s for c in cells for s in c["steps_read"]})
        unread = sum(1 for c in cells if not c["steps_read"])
        blocks.append(Paragraph(
            f"**{key.capitalize()} question**: '{q['variant']}' trained {_fmt(tv['mean'], 3)} s and "
            f"'{q['reference']}' {_fmt(tr['mean'], 3)} s (mean over seeds; clock: {', '.join(q['clock'])}), so "
            f"t* = {_fmt(q['t_star_s'], 3)} s; the readings come from the evaluations at steps "
            f"{', '.join(map(str, steps)) or '—'}"
            + (f"; {unread} of {len(cells)} cells have no reading (t* comes before their first evaluation: the "
               f"grid's eval_interval is too coarse for this comparison)" if unread else "")
            + f". Holm within the readings' table and, separately, within the re-judged options ({q['family_size']} "
            f"test{'s' if q['family_size'] != 1 else ''})."))
        blocks.append(Table(["curve metric at t*", "variant mean ± sd", "reference mean ± sd", "Δ", "p (Holm)",
                             "MDE", "reading"],
                            [[r["metric"], _pm(r["variant_mean"], r["variant_sd"], r["n"]),
                              _pm(r["reference_mean"], r["reference_sd"], r["reference_n"]), _fmt(r["diff"], 3),
                              f"{_fmt(r['p'], 2)} ({_fmt(r['p_holm'], 2)})",
                              mde_text(r["mde"], r["metric"].startswith("val_exact")),
                              f"**{r['verdict']}**"]
                             for r in q["readings"]]))
        tokens = {v["option"]: v for v in data["verdicts"] if v["question"] == key}
        rows = []
        for o in q["options"]:
            t = tokens.get(o["option"], {})
            rows.append([str(o["option"]), o["claim"], f"**{t.get('verdict', '—')}**", f"**{o['verdict']}**",
                         decided_text(o)])
        if rows:
            blocks.append(Table(["option", "claim", "at equal tokens", "at equal training time",
                                 "decided by (equal training time)"], rows))
    return blocks


def _long_text(data: dict) -> list[Block]:
    head, rows = text_rows(data)
    return [Heading(2, "Long text: one pass and sliding window"),
            Paragraph("Held-out bits per byte over sequences of 1×, 2× and 4× the training context, read in one pass "
                      "and through a sliding window of the training context (stride half of it). The long-text "
                      "verdicts take each variant the better way."),
            Table(head, rows)]


def _variants(data: dict) -> list[Block]:
    head, rows = variant_table(data)
    return [Heading(2, "All variants"), Table(head, rows),
            Paragraph("; ".join(f"{k}: {v[0]}" for k, v in METRICS.items()))]


def _figures(col: Collected, plots: bool) -> list[Block]:
    blocks: list[Block] = [Heading(2, "Plots")]
    plt = pyplot()
    colors = colors_for(list(col.results))
    for f in FIGURES:
        if not plots:
            blocks.append(Image(f.title, b"" if f.has_data(col) else None, "not recorded by any run", f.caption))
        elif plt is None:
            blocks.append(Image(f.title, None, "matplotlib is not installed (pip install dynaformer[plot])", f.caption))
        else:
            blocks.append(Image(f.title, f.draw(col, colors), "not recorded by any run", f.caption))
    return blocks


def write_report(paths: list[str | Path], out_dir: str | Path, cost: bool = True,
                 cost_lengths: list[int] | None = None) -> dict:
    """Collect `paths`, time the trained models at the cost lengths (unless cost=False; a cached measurement of
    the same cells is reused) and write report.json, report.md, report.html and plots/ into `out_dir`."""
    from .grid import EVAL_DEFAULTS
    from .results import attach_cost

    col = collect(paths)
    out = Path(out_dir)
    measured = None
    if cost:
        lengths = cost_lengths or col.eval.get("cost_lengths") or EVAL_DEFAULTS["cost_lengths"]
        repeats = int(col.eval.get("cost_repeats") or EVAL_DEFAULTS["cost_repeats"])
        measured = attach_cost(col, list(lengths), repeats, out / "cost.json")
    data = report_data(col, measured)
    written = write_document(Document(data, build(col, data=data)), out)
    return {**written, "runs": sum(len(v) for v in col.results.values()), "skipped": len(col.skipped),
            "verdicts": [{"question": v["question"], "option": v["option"], "verdict": v["verdict"]}
                         for v in data["verdicts"]]}


# --- tables and paragraphs from report.json ---------------------------------------------------------

def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
        return f"{x:.3g}"
    return f"{x:.{digits}g}"


def mde_text(x: float | None, accuracy: bool) -> str:
    """An MDE for display. An accuracy lies in [0, 1], so an MDE of 1 or more means that no difference it could
    show is detectable at these seeds: say so rather than print an effect size no accuracy can have."""
    if x is None:
        return "—"
    if accuracy and x >= 1:
        return "> 1 (not detectable)"
    return _fmt(x, 2)




def _pm(mean, sd, n=None) -> str:
    if mean is None:
        return "—"
    return f"{_fmt(mean)} ± {_fmt(sd, 2)}" + (f" (n={n})" if n is not None else "")




def marked(v: dict) -> bool:
    """The option the question's author marks correct (older report.json files call it seed_answer)."""
    return bool(v.get("marked_correct", v.get("seed_answer", False)))


def _p(e: dict) -> str:
    """'p=0.012, Holm p=0.06' (the Holm value only where a family corrected it)."""
    out = f"p={_fmt(e.get('p'), 2)}"
    if e.get("p_holm") is not None and e.get("p_holm") != e.get("p"):
        out += f", Holm p={_fmt(e['p_holm'], 2)}"
    return out


def part_text(e: dict, verdict: bool = True) -> str:
    """One part of a claim with its numbers: 'qa_acc ↑ by ≥ 0.05: supported (0.95 vs 0.8, p=0.001, Holm
    p=0.004, MDE 0.1)'; the MDE is shown for accuracy parts."""
    nums = []
    if e.get("variant_mean") is not None:
        nums.append(f"{_fmt(e['variant_mean'], 3)} vs {_fmt(e['reference_mean'], 3)}")
    if e.get("p") is not None:
        nums.append(_p(e))
    metric = e.get("metric") or ""
    if is_accuracy(metric) and e.get("mde") is not None:
        nums.append(f"MDE {mde_text(e['mde'], True)}")
    if e.get("note"):
        nums.append(e["note"])
    test = e["test"].removeprefix(WALL_CLOCK)
    return f"{test}" + (f": {e['verdict']}" if verdict else "") + (f" ({', '.join(nums)})" if nums else "")


def decided_text(v: dict) -> str:
    """The part(s) that decided a verdict: the part itself for a simple claim; for a compound one, the parts whose
    verdict made the whole's ('every part supported: ...' when all agree)."""
    ev = v.get("evidence") or []
    if not ev:
        return "—"
    idx = v.get("decided_by")
    if idx is None:  # an older report.json: the first part was all it recorded as decisive
        idx = [0]
    if len(ev) == 1:
        return part_text(ev[0], verdict=False)
    parts = [part_text(ev[i]) for i in idx if i < len(ev)]
    if len(idx) == len(ev) and len({e["verdict"] for e in ev}) == 1:
        return f"every part {ev[0]['verdict']}: " + "; ".join(parts)
    return "; ".join(parts)


def parts_text(v: dict) -> str:
    """For a compound claim, each part's own verdict: 'held (supported): A, B; contradicted: C; inconclusive: D',
    accuracy parts with their minimum detectable effect."""
    ev = v.get("evidence") or []
    if len(ev) < 2:
        return ""
    by: dict[str, list[str]] = {}
    for e in ev:
        accuracy = is_accuracy(e.get("metric") or "") and e.get("mde") is not None
        size = f" (MDE {mde_text(e['mde'], True)})" if accuracy else ""
        by.setdefault(e["verdict"], []).append(e["test"].removeprefix(WALL_CLOCK) + size)
    order = ["supported", "contradicted", "inconclusive"]
    return "; ".join(f"{'held (supported)' if w == 'supported' else w}: {', '.join(by[w])}"
                     for w in sorted(by, key=lambda w: order.index(w) if w in order else 9))


def answer_rows(data: dict) -> list[list[str]]:
    """One line per option: the verdict in a word, the part that decided it with its numbers, and for a
    compound claim every part's verdict."""
    rows = []
    for v in data["verdicts"]:
        word = v["verdict"] + (" (floor)" if v["floor"] and v["verdict"] == "inconclusive" else "")
        decided = f"not tested: {v['why']}" if v["verdict"] == "not tested" else decided_text(v)
        rows.append([v["question"], str(v["option"]) + (" ★" if marked(v) else ""), v["claim"], f"**{word}**",
                     decided, parts_text(v) or "—"])
    return rows


METRIC_WORDS = {"far_acc": "far-distance exact match", "qa_acc": "story-QA exact match",
                "summary_rouge": "summary ROUGE-L", "val_bpb": "held-out bits per byte",
                "long_bpb": "long-text bits per byte", "gen_gap": "train/val gap (nats)",
                "grad_ratio": "log₁₀ first/last-layer gradient ratio", "train_ms_long": "training ms/step at length",
                "decode_ms_long": "decoding ms/token at length"}


def _words(metric: str) -> str:
    if metric.startswith("attn_importance_l"):
        return f"attention importance of layer {metric.rsplit('l', 1)[1]} (nats)"
    return METRIC_WORDS.get(metric, metric)


def resolution_sentence(data: dict, key: str) -> str:
    """One sentence: which differences this question's data can and cannot tell apart (the MDE of each metric of
    its Holm family, at the seeds and spreads measured)."""
    fam = data["families"][key]
    mdes = {m: x for m, x in fam["mde"].items() if x is not None}
    ordered = sorted(mdes, key=lambda m: (not is_accuracy(m), m))
    sizes = ", ".join(f"{_fmt(mdes[m], 2)} in {_words(m)}" for m in ordered if not (is_accuracy(m) and mdes[m] >= 1))
    blind = [_words(m) for m in ordered if is_accuracy(m) and mdes[m] >= 1]
    none = [_words(m) for m, x in fam["mde"].items() if x is None]
    seeds = f"{fam['n_variant']} seeds of '{fam['variant']}' and {fam['n_reference']} of '{fam['reference']}'"
    blind_text = (f" No accuracy difference at all can be detected in {', '.join(blind)} (its MDE exceeds 1, the "
                  f"whole range of an accuracy)." if blind else "")
    if not sizes:
        return (f"**What the {key} question's data can tell.** With {seeds}, no difference can be told apart from "
                f"seed noise (one seed per arm, or no spread to scale by)." if not blind else
                f"**What the {key} question's data can tell.** With {seeds}, nothing.{blind_text}")
    tail = f" ({', '.join(none)}: no seed spread, so any difference shows)" if none else ""
    return (f"**What the {key} question's data can tell.** With {seeds}, true differences smaller than {sizes} "
            f"cannot be told apart from seed noise (80% power, two-sided at Holm's α/m = {_fmt(fam['alpha_m'], 2)}, "
            f"m = {fam['size']}); larger ones would be found{tail}.{blind_text}")


def correction_text(data: dict) -> str:
    c = data["correction"]
    return (f"**Multiple comparisons.** {c['method']} at α = {_fmt(c['alpha'])}; the family is {c['family']}. "
            f"{c['why']} \"Contradicted\" reads {c['contradicted']}. Minimum detectable effect: {c['mde']}.")


def limits_text(lim: dict) -> str:
    """One paragraph under the answers: what a study of this size cannot tell."""
    size = (f"{lim['params'] / 1e3:,.0f}k parameters" if lim.get("params") else "few parameters") + \
        f" ({lim['n_layer']} layers × {lim['d_model']} wide, context {lim['context_len']})"
    tokens = f" and train on {lim['tokens'] / 1e6:.1f}M tokens" if lim.get("tokens") else ""
    parts = [f"**What this study cannot tell at this size.** Its models have {size}{tokens}: effects that appear "
             f"only with depth, width, longer contexts or longer training are not tested here."]
    if lim.get("mde_exact") is not None:
        parts.append(f"With {lim['seeds']} seeds per arm and the reference's seed spread in exact match "
                     f"(sd {_fmt(lim['accuracy_spread'], 2)}), accuracy differences smaller than about "
                     f"{_fmt(lim['mde_exact'], 2)} cannot be told from seed noise even by a single test (80% power, "
                     f"α = 0.05); the questions' corrected numbers are above.")
    elif lim.get("seeds") == 1:
        parts.append("With one seed per arm, no difference can be told from seed noise.")
    if lim.get("seed_split"):
        parts.append(f"{', '.join(lim['seed_split'])}: learned by some seeds of the reference and not by others "
                     f"(exact match at the shortest distance per seed: "
                     + "; ".join(f"{t} {', '.join(_fmt(x) for x in lim['tasks'][t]['per_seed'])}"
                                 for t in lim["seed_split"]) + "), so its spread swamps any mechanism's effect.")
    if lim.get("not_learned"):
        parts.append(f"Not learned by the reference (exact match < 0.6 at the shortest distance): "
                     f"{', '.join(lim['not_learned'])}; verdicts resting on them say little.")
    if lim.get("cpu"):
        parts.append(f"Costs are timed on this machine's CPU ({lim['cpu']}); a GPU's balance of compute and "
                     f"memory differs.")
    return " ".join(parts)




def control_rows(data: dict) -> list[list[str]]:
    return [[c["question"], f"{c['variant']} vs {c['control']}", c["metric_label"],
             _pm(c["variant_mean"], c["variant_sd"], c["n"]), _pm(c["control_mean"], c["control_sd"], c["control_n"]),
             f"{_fmt(c['p'], 2)} ({_fmt(c.get('p_holm'), 2)})", f"**{c['verdict']}**"] for c in data["controls"]]




def cost_blocks(data: dict) -> list[Block]:
    cost = data.get("cost")
    if not cost:
        return [Paragraph("Not measured (report --no_cost).")]
    L = cost["lengths"]
    ref = cost["reference"]
    blocks: list[Block] = [Paragraph(
        f"Interleaved on this machine ({cost['cpu']}, {cost['threads']} threads, median of {cost['repeats']} rounds; "
        f"each model with its own trained weights and spans, on held-out text). Training step: forward + backward "
        f"of one sequence of T tokens. Decoding: ms per token after a prefill of T. Speed-up is the reference's "
        f"time over the variant's; the crossover is the first measured length from which the variant stays "
        f"cheaper.")]
    head = ["variant"] + [f"train ms @ {T}" for T in L] + [f"decode ms/token @ {T}" for T in L] + \
        ["train crossover", "decode crossover"]
    rows = []
    for v, rec in cost["variants"].items():
        if not rec:
            continue
        cross = cost["crossover"].get(v)
        train = [f"{_fmt(m, 3)}" + ("" if cross is None else f" ({cross['train_ms']['speedup'][i]:.2f}×)")
                 for i, m in enumerate(rec["train_ms"])]
        dec = [f"{_fmt(m, 3)}" + ("" if cross is None else f" ({cross['decode_ms']['speedup'][i]:.2f}×)")
               for i, m in enumerate(rec["decode_ms"])]

        def at(c, v=v):
            if c is None:
                return "reference" if v == ref else "—"
            if c["at"] is None:
                return f"none up to {L[-1]}"
            return f"≤ {c['at']}" if c["between"] is None else f"{c['between'][0]}–{c['between'][1]}"

        rows.append([v] + train + dec + [at(cross and cross["train_ms"]), at(cross and cross["decode_ms"])])
    blocks.append(Table(head, rows))
    return blocks




def text_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    mults = sorted({e["multiple"] for es in data["text"].values() for e in es})
    head = ["variant"] + [f"{m}×: one pass / sliding" for m in mults]
    rows = []
    for v, es in data["text"].items():
        by = {e["multiple"]: e for e in es}
        rows.append([v] + [("—" if m not in by else f"{_fmt(by[m]['one_pass_bpb'])} / {_fmt(by[m]['sliding_bpb'])}")
                           for m in mults])
    return head, rows




def variant_table(data: dict) -> tuple[list[str], list[list[str]]]:
    names = list(METRICS)
    head = ["variant", "seeds"] + names
    rows = []
    for v, rec in data["variants"].items():
        n = max((x["n"] for x in rec.values()), default=0)
        rows.append([v, str(n)] + [_pm(rec[k]["mean"], rec[k]["sd"]) if k in rec else "—" for k in names])
    return head, rows


