"""The main study's pieces: the matched fixed-window control, report.json, the sliding-window evaluator,
balanced task/text losses, task-run answer metrics, long-length cost and the grid's bad inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dynaformer.data.tasks import TaskSampler, parse_task_spec
from dynaformer.errors import ConfigError
from dynaformer.eval.longrange import TaskProbe, score
from dynaformer.eval.text import evaluate_text, position_losses, sliding_position_losses
from dynaformer.model import ModelConfig, Transformer
from dynaformer.model.span_stats import matched_window
from dynaformer.study.compare import run_grid
from dynaformer.study.cost import crossover, measure_cost
from dynaformer.study.grid import grid_from_dict
from dynaformer.study.report import write_report

from .conftest import assert_user_error, cli_in_process, shared_dir, tiny_config

STUDY = {
    "name": "study",
    "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "context_len": 128, "span_max": 96, "span_init": 24.0},
    "train": {"max_steps": 8, "batch_size": 4, "eval_interval": 8, "eval_tokens": 1024, "log_interval": 4,
              "ckpt_interval": 8, "warmup_steps": 2, "threads": 1, "progress_bar": False,
              "data": "task:passkey,storyqa,summary?text=builtin:stories&frac=0.75"},
    # The control comes first: it must wait for the variant whose reach it matches.
    "variants": {"fixed_window": {"span": "fixed", "match_reach": "dyn_span", "seeds": 1}, "baseline": {},
                 "dyn_span": {"span": "dynamic"}, "static_residual": {"residual": "dynamic", "dyn_step": False,
                                                                       "dyn_position": False, "dyn_content": False,
                                                                       "seeds": 1}},
    "seeds": 2,
    "eval": {"tasks": ["passkey", "storyqa", "summary"], "n_per_distance": 4, "text_tokens": 1024,
             "diag_windows": 2, "multiples": [1, 2], "fractions": [0.5, 0.9], "cost_lengths": [256],
             "cost_repeats": 1},
    "questions": {"residual": "static_residual", "controls": {"span": ["fixed_window"]}},
}


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory) -> Path:
    """The study grid, trained once per session (tests copy it to change it)."""

    def build(folder: Path) -> None:
        status = run_grid(grid_from_dict(STUDY), folder / "out", workers=0, progress=False)
        assert not status["failed"] and len(status["done"]) == 6, status

    return shared_dir(tmp_path_factory, "study", build) / "out"


@pytest.fixture(scope="module")
def study_report(study_dir, tmp_path_factory) -> dict[str, Path]:
    """The study grid's report (report.json, .md, .html, cost.json), written once per session; tests copy it to
    change it."""
    folder = shared_dir(tmp_path_factory, "study-report", lambda f: write_report([study_dir], f / "rep")) / "rep"
    return {"json": folder / "report.json", "markdown": folder / "report.md", "html": folder / "report.html"}


def test_fixed_window_control_matches_the_learned_reach(study_dir):
    dyn = json.loads((study_dir / "cells" / "dyn_span" / "seed0" / "result.json").read_text())
    fixed = json.loads((study_dir / "cells" / "fixed_window" / "seed0" / "result.json").read_text())
    keys = dyn["span_reach"]["keys_per_query"]
    w = fixed["matched_window"]["window"]
    assert w == matched_window(keys, 128) and fixed["model"]["span_window"] == w
    run = json.loads((study_dir / "cells" / "fixed_window" / "seed0" / "run" / "run.json").read_text())
    assert run["model"]["span_window"] == w  # the model really trained with that window
    # Equal attention work: the window's keys per query are the learned spans', to within one key.
    T = 128
    assert abs(sum(min(t + 1, w) for t in range(T)) / T - keys) <= 1.0
    assert fixed["span_reach"]["keys_per_query"] == pytest.approx(sum(min(t + 1, w) for t in range(T)) / T, rel=1e-3)
    assert not (study_dir / "cells" / "fixed_window" / "seed1").exists()  # seeds: 1
    assert not (study_dir / "cells" / "baseline" / "seed0" / "result.json").read_text().count("matched_window")


def test_matched_window_is_the_smallest_that_does_the_work():
    assert matched_window(1.0, 64) == 1 and matched_window(64.5 / 2 * 2 / 2, 64) <= 64
    for keys in (3.3, 10.0, 40.0):
        w = matched_window(keys, 100)
        work = [sum(min(t + 1, x) for t in range(100)) / 100 for x in (w - 1, w)]
        assert work[0] < keys <= work[1]


def test_report_json_schema_and_rendering(study_dir, study_report, tmp_path):
    import shutil

    shutil.copytree(study_report["json"].parent, tmp_path / "rep")
    rep = {k: tmp_path / "rep" / p.name for k, p in study_report.items()}
    data = json.loads(Path(rep["json"]).read_text())
    assert {"verdicts", "variants", "longrange", "cost"} <= set(data)
    assert len(data["verdicts"]) == 10
    for v in data["verdicts"]:
        assert v["question"] in ("residual", "span") and v["option"] in range(1, 6)
        for key in ("claim", "metric", "verdict", "variant_mean", "variant_sd", "reference_mean", "reference_sd",
                    "p", "floor"):
            assert key in v, key
        assert isinstance(v["floor"], bool)
        assert v["verdict"] in ("supported", "contradicted", "inconclusive")
    span3 = next(v for v in data["verdicts"] if v["question"] == "span" and v["option"] == 3)
    assert [e["metric"] for e in span3["evidence"]] == ["qa_acc", "summary_rouge", "train_ms_long"]
    assert span3["vs_controls"].keys() == {"fixed_window"}
    for metrics in data["variants"].values():
        for m in metrics.values():
            assert set(m) == {"mean", "sd", "n"}
    assert data["variants"]["baseline"]["val_bpb"]["n"] == 2 and data["variants"]["fixed_window"]["val_bpb"]["n"] == 1
    for tasks in data["longrange"].values():
        assert set(tasks) == {"passkey", "storyqa", "summary"}
        for t in tasks.values():
            assert len(t["distance"]) == len(t["exact"]) and all(0 <= x <= 1 for x in t["exact"])
        assert len(tasks["summary"]["rouge_l"]) == len(tasks["summary"]["distance"])
    cost = data["cost"]
    assert cost["lengths"] == [128, 256]  # the training context, then the grid's cost lengths
    for rec in cost["variants"].values():
        assert len(rec["train_ms"]) == 2 and all(x > 0 for x in rec["train_ms"] + rec["decode_ms"])
    assert set(cost["crossover"]) == {"fixed_window", "dyn_span", "static_residual"}
    # Every cell's training steps are timed side by side at their shapes, and the equal-time reading uses them.
    raw_cost = json.loads((tmp_path / "rep" / "cost.json").read_text())
    for key, rec in raw_cost["models"].items():
        assert len(rec["stage_ms"]) == len(rec["stages"]) >= 1 and all(x > 0 for x in rec["stage_ms"]), key
    for q in data["wall_clock"]["questions"].values():
        assert q.get("why") or q["clock"] == ["side_by_side"]
    controls = {(c["variant"], c["control"]) for c in data["controls"]}
    assert controls == {("dyn_span", "fixed_window"), ("fixed_window", "baseline")}
    # The Markdown is rendered from report.json: every verdict of it appears in the document.
    md = Path(rep["markdown"]).read_text()
    for section in ("Answers at a glance", "Mechanism versus controls", "Cost at long lengths",
                    "Long text: one pass and sliding window"):
        assert section in md
    assert md.count("**supported**") + md.count("**contradicted**") + md.count("**inconclusive**") >= 10
    assert 'class="inconclusive"' in Path(rep["html"]).read_text() or 'class="supported"' in Path(
        rep["html"]).read_text()
    # What the study cannot tell at its size: the seed spread it cannot resolve, the tasks not learned.
    lim = data["limits"]
    assert lim["n_layer"] == 2 and lim["context_len"] == 128 and lim["params"] > 0 and lim["tokens"] > 0
    n = lim["seeds"]
    arms = [data["questions"][k] for k in ("reference", "residual", "span")]
    assert n == min(data["variants"][v]["val_bpb"]["n"] for v in arms if v in data["variants"])
    for t, x in lim["tasks"].items():
        assert len(x["per_seed"]) == 2 and x["exact"] == pytest.approx(data["longrange"]["baseline"][t]["exact"][0])
        assert (t in lim["not_learned"]) == (max(x["per_seed"]) < 0.6)
    if n == 1:  # the tiny grid's residual arm has one seed
        assert lim["mde_exact"] is None and "With one seed per arm" in md
    assert md.index("What this study cannot tell at this size") < md.index("## Verdicts")
    assert "<strong>What this study cannot tell at this size.</strong>" in Path(rep["html"]).read_text()
    # A second report reuses the cost measurement of the same cells and lengths.
    before = (tmp_path / "rep" / "cost.json").read_text()
    write_report([study_dir], tmp_path / "rep")
    assert (tmp_path / "rep" / "cost.json").read_text() == before


def test_limits_name_the_noise_floor_and_the_tasks_not_learned():
    """Three seeds per arm, the reference learning passkey in one seed only: the smallest accuracy difference
    found with 80% power is (t(0.975, 4) + t(0.8, 4))·sd·√(2/3), passkey is seed-split, selcopy not learned,
    storyqa learned."""
    from types import SimpleNamespace

    from dynaformer.study.report import limits_text
    from dynaformer.study.results import limits_record
    from dynaformer.study.stats import t_quantile

    def res(pk, sc, qa):
        tasks = {"passkey": {"exact": [pk, 0.1]}, "selcopy": {"exact": [sc, 0.0]}, "storyqa": {"exact": [qa, 0.5]}}
        return {"model": {"n_layer": 2, "d_model": 64, "context_len": 128}, "compute": {"params": 115_000},
                "tokens": 6_144_000, "longrange": {"tasks": tasks}}

    ref = [res(0.9, 0.1, 1.0), res(0.0, 0.2, 0.9), res(0.1, 0.0, 0.95)]
    col = SimpleNamespace(questions={"reference": "baseline", "residual": "dyn_residual", "span": "dyn_span"},
                          results={"baseline": ref, "dyn_residual": ref, "dyn_span": ref})
    lim = limits_record(col, {"cpu": "AVX512"})
    sds = [np.std(x, ddof=1) for x in ([0.9, 0.0, 0.1], [0.1, 0.2, 0.0], [1.0, 0.9, 0.95])]
    spread = math.sqrt(np.mean(np.square(sds)))
    assert lim["seeds"] == 3 and lim["accuracy_spread"] == pytest.approx(spread)
    # 80% power at α = 0.05: (t(0.975, 4) + t(0.8, 4)) · sd · √(2/3), the quantiles as tables give them
    assert lim["mde_exact"] == pytest.approx((2.776 + 0.941) * spread * math.sqrt(2 / 3), rel=1e-3)
    assert t_quantile(0.975, 4) == pytest.approx(2.776, abs=1e-3)
    assert lim["seed_split"] == ["passkey"] and lim["not_learned"] == ["selcopy"]
    text = limits_text(lim)
    assert "models have 115k parameters (2 layers × 64 wide, context 128) and train on 6.1M tokens" in text
    assert "passkey 0.9, 0, 0.1" in text and "selcopy" in text and "AVX512" in text


def test_sliding_window_equals_one_pass_when_the_text_fits():
    torch.manual_seed(0)
    model = Transformer(tiny_config(context_len=16)).eval()
    windows = torch.randint(0, 64, (3, 17))
    tb = torch.ones(64, dtype=torch.long)
    one = position_losses(model, windows, 2, tb)
    slide = sliding_position_losses(model, windows, 16, 2, tb)
    assert np.array_equal(one[0], slide[0]) and np.array_equal(one[1], slide[1])


@pytest.mark.parametrize("T", [40, 48, 37])
def test_sliding_window_matches_a_slow_reference(T):
    torch.manual_seed(0)
    C = 16
    model = Transformer(tiny_config(context_len=C)).eval()
    windows = torch.randint(0, 64, (2, T + 1))
    nats, nbytes = sliding_position_losses(model, windows, C, 4, torch.ones(64, dtype=torch.long))
    # Reference: each position t is predicted by the window that first covers it, windows start at
    # 0, C/2, C, ... and the last one ends at T.
    starts = list(range(0, T - C + 1, C // 2))
    if starts[-1] != T - C:
        starts.append(T - C)
    ref = np.zeros(T)
    for t in range(T):
        s = next(s for s in starts if s <= t < s + C)
        with torch.no_grad():
            logits, _ = model(windows[:, s : s + C])
        ref[t] = float(torch.nn.functional.cross_entropy(logits[:, t - s], windows[:, t + 1], reduction="sum"))
    assert np.allclose(nats, ref, atol=1e-4) and (nbytes == 2).all()
    # Every position after the first window sees at least C/2 tokens of history.
    assert all(t - next(s for s in starts if s <= t < s + C) >= C // 2 - 1 for t in range(C, T))


def test_evaluate_text_reports_both_ways():
    model = Transformer(tiny_config(context_len=16)).eval()
    data = np.random.default_rng(0).integers(0, 64, 2000)
    out = evaluate_text(model, data, 16, 512, (1, 2, 4), 4, torch.ones(64, dtype=torch.long))
    c1, c4 = out["contexts"][0], out["contexts"][2]
    assert c1["sliding"]["bpb"] == c1["bpb"] and c1["sliding"]["stride"] == 8
    assert c4["sliding"]["bpb"] != c4["bpb"] and len(c4["sliding"]["buckets"]) == len(c4["buckets"])


def test_mixed_batches_weight_each_source_by_its_share():
    from dynaformer.data import BatchSampler

    text = np.random.default_rng(0).integers(0, 256, 5000).astype(np.uint8)
    spec = parse_task_spec("task:passkey,storyqa?text=builtin:stories&frac=0.75")
    s = TaskSampler(spec, 8, 128, seed=0, text_sampler=BatchSampler(text, 8, 128, seed=0))
    x, y = s.next()
    w = s.loss_weights(y)
    n = s.n_task
    assert n == 6 and w.shape == y.shape
    assert math.isclose(float(w[:n].sum()), 0.75, rel_tol=1e-6) and math.isclose(float(w[n:].sum()), 0.25,
                                                                                  rel_tol=1e-6)
    assert (w[y == -100] == 0).all()
    assert TaskSampler(parse_task_spec("task:passkey"), 8, 128, seed=0).loss_weights(y) is None


def test_task_probe_scores_answers():
    spec = parse_task_spec("task:passkey,summary")
    probe = TaskProbe(spec, 128, n_per_task=8)
    model = Transformer(ModelConfig(n_layer=1, n_head=2, d_model=32, context_len=128)).eval()
    out = probe.evaluate(model)
    assert set(out) == {"val_answer_loss", "val_exact", "val_exact_passkey", "val_exact_summary"}
    x, y = probe.batches[0].inputs_targets("answer")
    with torch.no_grad():
        logits, loss0 = model(x, y)
    start = int(probe.batches[0].answers[0, 0])  # the passkey answer: the last 5 of 129 tokens
    assert start == 124
    want_exact = score(probe.batches[0], logits[:, start - 1 :].argmax(-1).numpy())[0].mean()
    assert out["val_exact_passkey"] == pytest.approx(want_exact)
    assert out["val_answer_loss"] > 0 and math.isfinite(out["val_answer_loss"])
    assert TaskProbe(spec, 128, n_per_task=8).batches[0].tokens.tobytes() == probe.batches[0].tokens.tobytes()


def test_cost_measurement_and_crossover():
    models = {"dense": Transformer(tiny_config(context_len=32)),
              "span": Transformer(tiny_config(context_len=32, span="fixed", span_window=8))}
    text = np.random.default_rng(0).integers(0, 64, 300)
    cost = measure_cost(models, text, [64, 32], repeats=1, warmup=0)
    assert cost["lengths"] == [32, 64]
    for rec in cost["models"].values():
        assert len(rec["train_ms"]) == len(rec["decode_ms"]) == len(rec["kv_bytes"]) == 2
    assert cost["models"]["span"]["kv_bytes"][1] < cost["models"]["dense"]["kv_bytes"][1]  # bounded cache
    c = crossover([1024, 2048, 4096], [10.0, 20.0, 40.0], [12.0, 18.0, 20.0])
    assert c["at"] == 2048 and c["between"] == (1024, 2048) and c["speedup"][2] == 2.0
    assert crossover([1024, 2048], [1.0, 1.0], [2.0, 2.0])["at"] is None
    assert crossover([1024, 2048], [2.0, 2.0], [1.0, 1.0]) == {"speedup": [2.0, 2.0], "at": 1024, "between": None}


@pytest.mark.parametrize("change, needle", [
    ({"eval": {"tasks": ["passkey", "nosuchtask"]}}, "unknown task 'nosuchtask'"),
    ({"eval": {"multiples": [1, 0]}}, "grid.eval.multiples"),
    ({"eval": {"cost_lengths": [1024, 10**10]}}, "grid.eval.cost_lengths: length 10000000000"),
    ({"eval": {"cost_length": [1024]}}, "unknown config key 'grid.eval.cost_length'"),
    ({"variants": {"baseline": {}, "fx": {"span": "fixed", "match_reach": "nope"}}}, "match_reach names 'nope'"),
    ({"variants": {"dyn_span": {"span": "dynamic"}, "fx": {"match_reach": "dyn_span"}}}, "add span: fixed"),
    ({"variants": {"baseline": {}, "fx": {"span": "fixed", "match_reach": "baseline"}}}, "learned-span variant"),
    ({"variants": {"baseline": {}, "x": {"dyn_stepp": False}}}, "unknown config key 'dyn_stepp'"),
    ({"variants": {"baseline": {"seeds": 0}}}, "seeds must be a positive integer"),
    ({"questions": {"controls": {"span": ["nope"]}}}, "controls.span: 'nope'"),
])
def test_grid_bad_inputs(change, needle, tmp_path, capsys):
    raw = {**STUDY, **change}
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        grid_from_dict(raw)
    import yaml

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = cli_in_process(capsys, "compare", str(path), "--out", str(tmp_path / "out"))
    assert_user_error(res, needle.split("'")[0].strip())
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


@pytest.mark.parametrize("digits", [1, 2, 5, 8])
def test_passkey_key_length_and_evaluation_with_training_parameters(digits):
    from dynaformer.data.tasks import make_task
    from dynaformer.eval.longrange import evaluate_longrange

    task = make_task("passkey", digits=digits)
    lo, hi = task.distance_range(128)
    assert (lo, hi) == (digits + 7, 129 - digits - 5)
    b = task.generate(16, 128, np.array([lo, hi] * 8), seed=1)
    assert b.answer_len == digits and (b.distance == np.array([lo, hi] * 8)).all()
    rows = np.arange(16)[:, None]
    assert (b.tokens[rows, b.evidence[:, 0]] == b.tokens[rows, b.answers[:, :1] + np.arange(digits)]).all()
    prompt = [bytes(t[: b.answers[i, 0]]) for i, t in enumerate(b.tokens)]
    assert all(sum(ch.isdigit() for ch in p.decode()) == digits for p in prompt)  # the key, once

    def oracle(batch):
        return np.take_along_axis(batch.tokens, batch.evidence[:, -1], 1)

    res = evaluate_longrange(oracle, 128, ["passkey"], 8, params={"passkey": {"digits": digits}})
    assert all(x == 1.0 for x in res["tasks"]["passkey"]["exact"])
    assert parse_task_spec(f"task:passkey?digits={digits}").params == {"passkey": {"digits": digits}}
    with pytest.raises(Exception, match="digits must be in 1..16"):
        make_task("passkey", digits=0)


def test_report_html_renders_in_a_browser(study_report, tmp_path):
    """The HTML as a reader sees it: every embedded plot is a valid PNG, the Answers block comes first, and a
    headless Chromium renders the first screen (skipped where no Chromium is installed)."""
    import base64
    import re
    import shutil
    import subprocess

    rep = study_report
    html = Path(rep["html"]).read_text()
    assert html.index("Answers at a glance") < html.index("<h2>Verdicts</h2>")
    assert 'class="supported"' in html or 'class="inconclusive"' in html or 'class="contradicted"' in html
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(pngs) >= 8
    import io

    import matplotlib.image

    for b64 in pngs:
        img = matplotlib.image.imread(io.BytesIO(base64.b64decode(b64)), format="png")
        assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0.01  # decodes, and is not blank
    browser = next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if browser is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium) for the screenshot")
    shot = tmp_path / "first-screen.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1400,1100", Path(rep["html"]).resolve().as_uri()], capture_output=True, timeout=120)
    img = matplotlib.image.imread(shot)
    assert img.shape[:2] == (1100, 1400) and img.std() > 0.05  # a rendered page, not an empty one
