"""Equal training wall-clock: a run's evaluations on a clock of training time alone (evaluation pauses left out),
curves read at t* by interpolation, and the options' accuracy/perplexity parts judged again on those readings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dynaformer.study.report import build
from dynaformer.study.results import report_data
from dynaformer.study.wallclock import eval_curve, read_at, to_wall_clock, wall_clock_records
from dynaformer.train.metrics import read_metrics

from .study_fakes import fake_collected, fake_result, write_curve

FIXTURE = Path(__file__).parent / "fixtures" / "wallclock-metrics.jsonl"


def test_training_clock_leaves_evaluation_pauses_out():
    """The fixture: 100 steps at 40 ms, 100 at 60 ms, an evaluation (8 s), a skipped step's event, 200 steps at
    50 ms, an evaluation. Training time at the evaluations: 4 + 6 = 10 s and 10 + 5 + 5 = 20 s; elapsed_s says
    18 s and 36 s because it counts the evaluations."""
    rows = read_metrics(FIXTURE)
    c = eval_curve(rows)
    assert c.clock == "ms_step" and c.total == pytest.approx(20.0) and c.startup_s == 0.0
    assert [e["step"] for e in c.evals] == [200, 400]
    assert [e["train_s"] for e in c.evals] == pytest.approx([10.0, 20.0])
    assert [e["elapsed_s"] for e in c.evals] == [18.0, 36.0]
    # A log without ms_step falls back to elapsed_s, and says so.
    old = [{k: v for k, v in r.items() if k != "ms_step"} for r in rows]
    c = eval_curve(old)
    assert c.clock == "elapsed_s" and [e["train_s"] for e in c.evals] == [18.0, 36.0] and c.total == 36.0
    # Steps redone after a reloaded checkpoint were trained: they count again.
    redo = rows[:5] + [{"step": 200, "elapsed_s": 24.0, "event": "reloaded_checkpoint", "lr_scale": 0.5},
                       {"step": 300, "elapsed_s": 29.0, "loss": 1.7, "ms_step": 50.0}] + rows[5:]
    assert eval_curve(redo).total == pytest.approx(25.0)


def test_start_up_is_left_out_of_the_first_window():
    """A first window of 100 steps that took 64 s (60 of them compiling a kernel) is timed at the next window's
    60 ms/step: 6 s, and the 58 s difference is kept as start-up."""
    rows = read_metrics(FIXTURE)
    rows[0] = {**rows[0], "ms_step": 640.0, "elapsed_s": 64.0}
    c = eval_curve(rows)
    assert c.total == pytest.approx(6.0 + 6.0 + 5.0 + 5.0) and c.startup_s == pytest.approx(58.0)
    assert [e["train_s"] for e in c.evals] == pytest.approx([12.0, 22.0])
    rows[0] = {**rows[0], "ms_step": 30.0}  # a first window faster than the next keeps its own rate
    assert eval_curve(rows).total == pytest.approx(3.0 + 6.0 + 5.0 + 5.0) and eval_curve(rows).startup_s == 0.0


def test_reading_a_curve_at_a_time():
    pts = [(e["train_s"], e["val_exact_storyqa"]) for e in eval_curve(read_metrics(FIXTURE)).evals]
    assert read_at(pts, 15.0) == (pytest.approx(0.6), [0, 1])  # halfway between 10 s (0.4) and 20 s (0.8)
    assert read_at(pts, 12.5) == (pytest.approx(0.5), [0, 1])
    assert read_at(pts, 10.0) == (0.4, [0])  # on an evaluation
    assert read_at(pts, 25.0) == (0.8, [1])  # finished before t*: its last evaluation
    assert read_at(pts, 9.9) == (None, [])  # before its first evaluation: no reading
    assert read_at([(10.0, None), (20.0, 0.8)], 15.0) == (None, [])


def _study(root: Path) -> tuple:
    """Baseline at 100 ms/step, dynamic span at 50 ms, dynamic residual at 75 ms, 800 steps each, evaluations at
    400 and 800 (7 s pauses). Every arm ends at the same accuracy (equal tokens: no difference), but the span
    gets there in half the time."""
    res, curves = {}, {}
    for v, ms in (("baseline", 100.0), ("dyn_span", 50.0), ("dyn_residual", 75.0)):
        res[v] = [fake_result(v, s, qa=0.8 + 0.01 * [0, 2, 1][s], summary=0.7 + 0.01 * [1, 0, 2][s],
                              bpb=2.0 + 0.01 * [2, 1, 0][s], ms=ms + s) for s in range(3)]
        curves[v] = [{400: {"val_bpb": 2.6 + 0.01 * s, "val_exact": 0.35, "val_exact_storyqa": 0.40 + 0.02 * s,
                            "val_exact_summary": 0.30 + 0.01 * s, "val_exact_passkey": 0.2 + 0.02 * s},
                      800: {"val_bpb": 2.0 + 0.01 * s, "val_exact": 0.7, "val_exact_storyqa": 0.80 + 0.01 * s,
                            "val_exact_summary": 0.70 + 0.02 * s, "val_exact_passkey": 0.6 + 0.01 * s}}
                     for s in range(3)]
    col = fake_collected(res, root)
    ms = {"baseline": 100.0, "dyn_span": 50.0, "dyn_residual": 75.0}
    for v, cs in curves.items():
        for s, c in enumerate(cs):
            write_curve(root / "cells" / v / f"seed{s}", ms[v], c, 800)
    return col, curves


def test_equal_wall_clock_readings_and_verdicts(tmp_path):
    col, curves = _study(tmp_path)
    wc = wall_clock_records(col)
    span, resid = wc["questions"]["span"], wc["questions"]["residual"]
    # t*: the shorter arm's training time, on the training clock (elapsed_s would add the two 7 s pauses).
    assert span["t_star_s"] == pytest.approx(40.0) and span["train_s"]["reference"]["mean"] == pytest.approx(80.0)
    assert resid["t_star_s"] == pytest.approx(60.0) and span["clock"] == ["ms_step"]
    # The span reads its end; the reference its evaluation at step 400, which falls on t* exactly.
    for c, cv in zip(span["cells"]["variant"], curves["dyn_span"], strict=True):
        assert c["readings"]["val_exact_storyqa"] == cv[800]["val_exact_storyqa"] and c["steps_read"] == [800]
    for c, cv in zip(span["cells"]["reference"], curves["baseline"], strict=True):
        assert c["readings"]["val_exact_storyqa"] == pytest.approx(cv[400]["val_exact_storyqa"])
        assert c["steps_read"] == [400]
    # Residual question: t* = 60 s is halfway between the reference's evaluations at 40 s and 80 s.
    for c, cv in zip(resid["cells"]["reference"], curves["baseline"], strict=True):
        assert c["readings"]["val_bpb"] == pytest.approx((cv[400]["val_bpb"] + cv[800]["val_bpb"]) / 2)
        assert c["steps_read"] == [400, 800]
    # At equal time the span is far ahead on QA; at equal tokens nothing differs.
    qa = next(r for r in span["readings"] if r["metric"] == "val_exact_storyqa")
    assert qa["verdict"] == "better" and qa["diff"] == pytest.approx(0.81 - 0.42)
    opts = {o["option"]: o for o in span["options"]}
    assert set(opts) == {3, 4, 5}  # the options with an accuracy or perplexity part (1, 2: long text only)
    five = opts[5]
    assert five["verdict"] == "contradicted"  # "no significant gain": the QA gain at equal time contradicts it
    decided = {five["evidence"][i]["metric"] for i in five["decided_by"]}
    assert "wc:val_exact_storyqa" in decided
    data = report_data(col)
    tokens = next(v for v in data["verdicts"] if v["question"] == "span" and v["option"] == 5)
    assert not any(e["metric"] == "qa_acc" and e["verdict"] == "supported" for e in tokens["evidence"])
    assert data["wall_clock"]["questions"]["span"]["options"] == span["options"]
    md = "\n".join(b.text for b in build(col, plots=False, data=data) if hasattr(b, "text"))
    assert "Equal training time" in md and "t* = 40 s" in md
    json.dumps(data, allow_nan=False)  # report.json stays valid JSON


def test_claims_keep_their_parts_without_a_curve_metric():
    from dynaformer.study import verdicts as V

    span = {o.number: o.claim for o in V.QUESTIONS[1].options}
    assert to_wall_clock(span[1]) is None and to_wall_clock(span[2]) is None  # long-text bpb: no curve metric
    three = to_wall_clock(span[3])
    assert [p.metric for p in three.parts] == ["wc:val_exact_storyqa", "wc:val_exact_summary", "train_ms_long"]
    assert to_wall_clock(V.QUESTIONS[0].options[3].claim) is None  # per-layer attention importance


def test_no_metrics_log_is_said(tmp_path):
    col, _ = _study(tmp_path)
    (tmp_path / "cells" / "dyn_span" / "seed1" / "run" / "metrics.jsonl").unlink()
    wc = wall_clock_records(col)
    assert "no metrics.jsonl" in wc["questions"]["span"]["why"] and "t_star_s" in wc["questions"]["residual"]


def test_a_time_before_the_first_evaluation_has_no_reading(tmp_path):
    """Evaluations only at the end: the slower reference has no reading at the span's t*, so the equal-time parts
    are inconclusive (not recorded), and the report says why."""
    col, curves = _study(tmp_path)
    for v, cs in curves.items():
        ms = {"baseline": 100.0, "dyn_span": 50.0, "dyn_residual": 75.0}[v]
        for s, c in enumerate(cs):
            write_curve(tmp_path / "cells" / v / f"seed{s}", ms, {800: c[800]}, 800)
    data = report_data(col)
    span = data["wall_clock"]["questions"]["span"]
    assert all(c["steps_read"] == [] and c["readings"]["val_bpb"] is None for c in span["cells"]["reference"])
    assert all(c["steps_read"] == [800] for c in span["cells"]["variant"])
    assert all(o["verdict"] == "inconclusive" or all(not e["metric"].startswith("wc:") for i, e in
               enumerate(o["evidence"]) if i in o["decided_by"]) for o in span["options"])
    assert {r["verdict"] for r in span["readings"]} == {"not read"}
    md = "\n".join(b.text for b in build(col, plots=False, data=data) if hasattr(b, "text"))
    assert "3 of 6 cells have no reading (t* comes before their first evaluation" in md


def test_training_stages_from_a_cells_config():
    from dynaformer.study.cost import train_stages

    staged = {"batch_size": 4, "max_steps": 2000, "short_context": 128, "short_steps": 900}
    assert train_stages(staged, 1024) == [(900, 32, 128), (1100, 4, 1024)]  # as many tokens per step
    assert train_stages({"batch_size": 8, "max_steps": 800, "grad_accum": 2}, 128) == [(800, 16, 128)]
    assert train_stages({**staged, "short_steps": 5000}, 1024) == [(2000, 32, 128)]  # never leaves the first


def test_the_side_by_side_clock_ignores_the_load_a_cell_trained_beside(tmp_path):
    """The reference logged 100 ms/step because it trained beside other work; timed side by side with the span,
    both take 50 ms/step. On the logs' clock the span looks twice as fast; on the side-by-side clock the arms are
    read at the same step, and the clock says which was used. Stages are charged piecewise."""
    col, curves = _study(tmp_path)
    for v in ("baseline", "dyn_span", "dyn_residual"):
        for r in col.results[v]:
            r["cost"] = {"stages": [[400, 32, 128], [400, 4, 1024]], "stage_ms": [10.0, 90.0]}
    wc = wall_clock_records(col)
    span = wc["questions"]["span"]
    assert span["clock"] == ["side_by_side"]
    assert span["t_star_s"] == pytest.approx(400 * 0.010 + 400 * 0.090)
    for arm in ("variant", "reference"):
        assert all(c["steps_read"] == [800] for c in span["cells"][arm])
    qa = next(r for r in span["readings"] if r["metric"] == "val_exact_storyqa")
    assert qa["verdict"] != "better"
    # Stage clock of one cell: the evaluation at step 400 has spent the short stage only.
    from dynaformer.study.wallclock import cell_curve

    c = cell_curve(tmp_path / "cells" / "baseline" / "seed0", col.results["baseline"][0], "side_by_side")
    assert [e["train_s"] for e in c.evals] == [pytest.approx(4.0), pytest.approx(40.0)]
    assert c.total == pytest.approx(40.0)
    # A cell without stage timings sends both arms back to the logs' clock.
    del col.results["baseline"][1]["cost"]
    assert wall_clock_records(col)["questions"]["span"]["clock"] == ["ms_step"]


def test_stage_timing_leaves_the_weights_and_threads_as_they_were():
    import torch

    from dynaformer.model import ModelConfig, Transformer
    from dynaformer.study.cost import measure_stages

    torch.manual_seed(0)
    models = {k: Transformer(ModelConfig(vocab_size=64, context_len=32, n_layer=1, n_head=2, d_model=16, span=span))
              for k, span in (("a", "none"), ("b", "dynamic"))}
    before = {k: [p.detach().clone() for p in m.parameters()] for k, m in models.items()}
    threads = torch.get_num_threads()
    text = np.arange(500) % 64
    out = measure_stages(models, text, {"a": [(3, 4, 8), (2, 1, 32)], "b": [(5, 1, 32)]}, threads=1, repeats=1)
    assert len(out["a"]) == 2 and len(out["b"]) == 1 and all(x > 0 for v in out.values() for x in v)
    assert torch.get_num_threads() == threads
    for k, m in models.items():
        assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before[k], strict=True))
        assert all(p.grad is None for p in m.parameters())
