"""compare (resume == uninterrupted, locks, bad variants), report (every plot, the full verdict
table, skipped runs), verdicts (flip with their evidence), statistics, compute accounting."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from dynaformer.errors import ConfigError, DynaformerError
from dynaformer.eval.compute import flops_per_token, kv_cache_bytes
from dynaformer.eval.text import position_buckets
from dynaformer.locks import try_lock, unlock
from dynaformer.model import ModelConfig, Transformer
from dynaformer.study import verdicts as V
from dynaformer.study.compare import run_grid
from dynaformer.study.grid import grid_from_dict
from dynaformer.study.render import Image
from dynaformer.study.report import build, collect, write_report
from dynaformer.study.stats import t_sf2, welch

from .conftest import shared_dir


def run_cli(*argv: str):
    """The CLI in this process (its exit paths are the same as a subprocess's, without the start-up)."""
    import contextlib
    import io
    import subprocess

    from dynaformer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())

GRID = {
    "name": "fixture",
    "model": {"n_layer": 2, "n_head": 2, "d_model": 32, "context_len": 128},
    "train": {"max_steps": 12, "batch_size": 4, "eval_interval": 6, "eval_tokens": 1024, "log_interval": 3,
              "ckpt_interval": 6, "warmup_steps": 2, "data": "task:suite?text=builtin:stories&frac=0.5",
              "threads": 1, "progress_bar": False},
    "variants": {"baseline": {}, "dyn_span": {"span": "dynamic"}},  # a mechanism variant beside the reference
    "seeds": 2,
    "eval": {"n_per_distance": 4, "text_tokens": 1024, "diag_windows": 2, "multiples": [1, 2],
             "fractions": [0.25, 0.75], "cost_lengths": [256], "cost_repeats": 1},  # the report times one length
    "questions": {"residual": "dyn_span", "span": "dyn_span", "size_matched": "dyn_span"},
}
VOLATILE = {"elapsed_s", "compute", "summary", "curve"}  # timings differ between runs; everything else must not


def _stable(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in VOLATILE}


@pytest.fixture(scope="module")
def grid_dir(tmp_path_factory) -> Path:
    """The fixture grid, trained once per session (tests copy it to change it)."""

    def build(folder: Path) -> None:
        status = run_grid(grid_from_dict(GRID), folder / "out", workers=0, progress=False)
        assert len(status["done"]) == 4 and not status["failed"]

    return shared_dir(tmp_path_factory, "grid", build) / "out"


def test_compare_resume_equals_uninterrupted(grid_dir, tmp_path):
    # Simulate a grid killed mid-cell: the cell lost its result and its final checkpoint (kept step-6),
    # and its process died holding the lock; another cell never started.
    out = tmp_path / "out"
    shutil.copytree(grid_dir, out)
    cell = out / "cells" / "dyn_span" / "seed1"
    want = json.loads((cell / "result.json").read_text())
    (cell / "result.json").unlink()
    shutil.rmtree(cell / "run" / "step-12")
    assert (cell / "run" / "step-6").is_dir()
    (cell / ".lock").write_text(f"{__import__('socket').gethostname()}:999999")
    shutil.rmtree(out / "cells" / "baseline" / "seed0")
    want0 = json.loads((grid_dir / "cells" / "baseline" / "seed0" / "result.json").read_text())
    status = run_grid(grid_from_dict(GRID), out, workers=0, progress=False)
    assert sorted(status["done"]) == ["baseline/seed0", "baseline/seed1", "dyn_span/seed0", "dyn_span/seed1"]
    got = json.loads((cell / "result.json").read_text())
    assert _stable(got) == _stable(want)
    assert _stable(json.loads((out / "cells" / "baseline" / "seed0" / "result.json").read_text())) == _stable(want0)
    assert not (cell / ".lock").exists()


def test_lock_is_exclusive(tmp_path):
    assert try_lock(tmp_path)
    assert not try_lock(tmp_path)  # held by a live process (this one)
    unlock(tmp_path)
    assert try_lock(tmp_path)


def test_grid_validation():
    with pytest.raises(ConfigError, match="variant 'dyn': model.residual"):
        grid_from_dict({**GRID, "variants": {"dyn": {"residual": "no_such_kind"}}}).cells()
    g = grid_from_dict({**GRID, "variants": {"baseline": {}, "dyn": {"residual": "no_such_kind"}}})
    cells = g.cells(skip_invalid=True)
    assert [c.error is not None for c in cells] == [False, False, True, True]
    with pytest.raises(ConfigError, match="unknown variant 'nope'"):
        grid_from_dict(GRID, variants=["nope"])
    with pytest.raises(ConfigError, match="variant 'x': unknown config key 'bogus'"):
        grid_from_dict({**GRID, "variants": {"x": {"bogus": 1}}})


def _inject_recorded(grid_dir: Path, dst: Path) -> Path:
    """A copy of the fixture grid whose runs also recorded mechanism diagnostics (as the residual and
    span modules log them to metrics.jsonl)."""
    shutil.copytree(grid_dir, dst)
    for p in dst.glob("cells/*/seed*/result.json"):
        r = json.loads(p.read_text())
        steps = [3, 6, 9, 12]
        r["diagnostics"]["recorded"] = {
            "layer_grad_norms": {"steps": steps, "series": {f"grad_norm/layer{i}": [1.0 + i, 1.1, 1.2, 1.3]
                                                            for i in range(2)}},
            "spans": {"steps": steps, "series": {f"span/layer{l}/head{h}": [8.0 * (h + 1), 9, 10, 11.0 + l]
                                                 for l in range(2) for h in range(2)}},
            "residual_coefs": {"steps": steps, "series": {f"res_coef/{i}": [1.0, 0.9, 0.8, 0.7] for i in range(4)}},
        }
        p.write_text(json.dumps(r))
    return dst


def test_report_has_every_plot_and_full_verdict_table(grid_dir, tmp_path):
    src = _inject_recorded(grid_dir, tmp_path / "g")
    half = src / "cells" / "dyn_span" / "seed9"  # a half-written cell: listed as skipped, not fatal
    (half / "run").mkdir(parents=True)
    (half / "cell.json").write_text(json.dumps({"train": {"max_steps": 12}}))
    (half / "run" / "metrics.jsonl").write_text('{"step": 3, "loss": 5.0}\n')
    rep = write_report([src], tmp_path / "rep")
    md = Path(rep["markdown"]).read_text()
    html = Path(rep["html"]).read_text()
    titles = ["Loss curves", "Bits per byte by token position", "Long-range accuracy by distance",
              "Per-layer gradient norms at the end", "Per-layer gradient norms over training", "Attention ablation",
              "Spans per layer and head", "Residual coefficients over training", "Compute"]
    for t in titles:
        assert t in md and t in html, t
    assert md.count("![") == len(titles) and html.count("data:image/png;base64,") == len(titles)
    assert "not recorded" not in md
    assert len(rep["verdicts"]) == 10 and {v["question"] for v in rep["verdicts"]} == {"residual", "span"}
    assert all(v["verdict"] in ("supported", "contradicted", "inconclusive") for v in rep["verdicts"])
    assert "seed9" in md and "training not finished (step 3/12)" in md
    # Without recorded diagnostics, those plots say so. The trainer logs per-layer gradient norms and
    # the span variant its spans; this grid has no dynamic-residual variant, so no coefficients.
    blocks = build(collect([grid_dir]), plots=False)
    missing = [b.title for b in blocks if isinstance(b, Image) and b.png is None]
    assert missing == ["Residual coefficients over training"]
    spans = json.loads((grid_dir / "cells" / "dyn_span" / "seed0" / "result.json").read_text())
    assert spans["diagnostics"]["recorded"]["spans"]["series"]  # span_mean/span_max from metrics.jsonl
    assert spans["compute"]["flops"]["attention_fraction"] != 1.0  # the span kernels' measured work


def test_report_bad_inputs(grid_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DynaformerError, match="is not a compare folder"):
        collect([tmp_path / "empty"])
    half = tmp_path / "half"
    shutil.copytree(grid_dir / "cells" / "baseline" / "seed0", half)
    (half / "result.json").write_text('{"variant": "baseline", "seed"')  # half-written
    with pytest.raises(DynaformerError, match="result.json unreadable"):
        collect([half])
    res = run_cli("report", str(tmp_path / "empty"))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "empty" in res.stderr
    res = run_cli("report", str(tmp_path / "missing"))
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_cli_bad_variant_and_task(tmp_path):
    grid = tmp_path / "g.yaml"
    import yaml

    grid.write_text(yaml.safe_dump({**GRID, "variants": {"baseline": {}, "dyn": {"residual": "no_such_kind"}}}))
    res = run_cli("compare", str(grid), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "variant 'dyn'" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = run_cli("compare", str(grid), "--variants", "nope", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "unknown variant 'nope'" in res.stderr
    res = run_cli("train", "--data", "task:passkey?dist=5000", "--out", str(tmp_path / "r"))
    assert res.returncode == 2 and "impossible" in res.stderr and not (tmp_path / "r").exists()


# --- verdicts and statistics -----------------------------------------------------------------------

def _fake(variant: str, seed: int, **m) -> dict:
    return {"variant": variant, "seed": seed, "status": "ok", "val_bpb": m.get("val_bpb", 2.0),
            "gen_gap": m.get("gen_gap", 0.0), "longrange": {"far_exact": m.get("far", 0.3), "tasks": {}},
            "diagnostics": {"grad_norm_layers": [1.0, 1.0], "attn_ablation": {"delta": [0.5, 0.5]}},
            "compute": {"ms_step": m.get("ms", 100.0), "flops": {"forward": 1e6}},
            "cost": {"lengths": [1024, 4096], "train_ms": [10.0, m.get("ms", 100.0)],
                     "decode_ms": [1.0, m.get("ms", 100.0) / 10]}}


def test_verdict_flips_with_its_evidence():
    claim = V.QUESTIONS[0].options[2].claim  # residual, option 3: long-range dependencies improve
    better = [_fake("dyn", s, far=0.60 + 0.01 * s) for s in range(3)]
    worse = [_fake("base", s, far=0.30 + 0.01 * s) for s in range(3)]
    assert V.judge(claim, better, worse, "dyn", "base")[0] == V.SUPPORTED
    assert V.judge(claim, worse, better, "dyn", "base")[0] == V.CONTRADICTED
    noisy = [_fake("dyn", s, far=[0.1, 0.9, 0.5][s]) for s in range(3)]
    assert V.judge(claim, noisy, worse, "dyn", "base")[0] == V.INCONCLUSIVE
    # Compound: "more compute without meaningful improvement" (residual option 5)
    claim5 = V.QUESTIONS[0].options[4].claim
    slow_same = [_fake("dyn", s, ms=130.0 + s, far=0.30 + 0.01 * s, val_bpb=2.0 + 0.001 * s) for s in range(3)]
    base = [_fake("base", s, ms=100.0 + s, far=0.30 + 0.01 * s, val_bpb=2.0 + 0.001 * s) for s in range(3)]
    assert V.judge(claim5, slow_same, base, "dyn", "base")[0] == V.SUPPORTED
    slow_better = [_fake("dyn", s, ms=130.0 + s, far=0.60 + 0.01 * s) for s in range(3)]
    assert V.judge(claim5, slow_better, base, "dyn", "base")[0] == V.CONTRADICTED
    # Floor: every model at (or near) 0% cannot tell the variants apart.
    zero = [_fake("x", s, far=0.0) for s in range(3)]
    assert V.judge(claim, zero, zero, "dyn", "base")[0] == V.INCONCLUSIVE
    near = [_fake("x", s, far=[0.0, 0.0, 0.003][s]) for s in range(3)]
    assert V.judge(claim, near, near, "dyn", "base")[0] == V.INCONCLUSIVE
    # Missing metric
    gone = copy.deepcopy(better)
    gone[0]["longrange"] = None
    assert V.judge(claim, gone, worse, "dyn", "base")[0] == V.INCONCLUSIVE


def test_welch_matches_reference_values():
    assert abs(t_sf2(2.0, 4) - 0.116117) < 1e-5  # scipy.stats.t.sf(2, 4) * 2
    assert abs(t_sf2(1.0, 30) - 0.325309) < 1e-5  # (numerical integration of the t density)
    w = welch([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.0, 10.0])
    # Welch: t = -2.2514, df = 5.5208, p = 0.069134 (numerical integration of the t density)
    assert abs(w.p - 0.069134) < 1e-5 and abs(w.df - 5.520788) < 1e-5 and w.lo < 0 < w.hi
    assert welch([1.0, 1.0], [1.0, 1.0]).p == 1.0 and welch([2.0, 2.0], [1.0, 1.0]).p == 0.0


# --- evaluation pieces -----------------------------------------------------------------------------

def test_position_buckets_cover_every_position():
    b = position_buckets(100)
    assert b[0] == (0, 1) and b[-1][1] == 100
    assert all(x[1] == y[0] for x, y in zip(b[:-1], b[1:], strict=True))


def test_flops_honour_the_span_hook():
    model = Transformer(ModelConfig(n_layer=2, n_head=2, d_model=32, context_len=64))
    dense = flops_per_token(model, 64)
    assert dense["attention_fraction"] == 1.0 and dense["keys_per_layer"] == [32.5, 32.5]
    for blk in model.blocks:
        blk.attn.attended_keys = lambda T: 8.0
        blk.attn.kv_cache_len = lambda T: 16
    spanned = flops_per_token(model, 64)
    assert math.isclose(spanned["attention_fraction"], 8 / 32.5)
    assert spanned["forward"] < dense["forward"]
    kv = kv_cache_bytes(model, 64)
    assert kv["analytic"] == kv["dense"] // 4 and kv["measured"] == kv["dense"]  # measured: what the cache holds
    x = torch.zeros(1, 8, dtype=torch.long)
    model(x)


def test_matched_wall_clock_sets_steps_per_variant(tmp_path):
    from dynaformer.study.compare import prepare

    raw = {**GRID, "match": "wall_clock", "wall_clock_s": 2.0,
           "variants": {"small": {}, "big": {"d_model": 128, "n_head": 2, "n_layer": 4}}, "seeds": 1}
    cells = prepare(grid_from_dict(raw), tmp_path / "o", skip_invalid=False)
    steps = json.loads((tmp_path / "o" / "grid.json").read_text())["steps"]
    assert steps["small"] > steps["big"] >= 1  # the slower variant gets fewer steps in the same time
    assert {c.variant: c.train["max_steps"] for c in cells} == steps
    again = prepare(grid_from_dict(raw), tmp_path / "o", skip_invalid=False)  # resume reuses the calibration
    assert {c.variant: c.train["max_steps"] for c in again} == steps


ENC_GRID = {
    **GRID, "name": "enc-fixture", "seeds": 2,
    "train": {**GRID["train"], "max_steps": 2, "eval_interval": 2, "ckpt_interval": 2, "log_interval": 1},
    "eval": {**GRID["eval"], "tasks": ["passkey"], "n_per_distance": 2, "text_tokens": 256, "multiples": [1]},
    "encoder": {"model": {"n_layer": 1, "context_len": 64},
                "finetune": {"n_train": 96, "n_val": 48, "max_steps": 6, "batch_size": 8, "eval_interval": 3,
                             "threads": 1, "progress_bar": False},
                "tasks": {"keyword": {"distance": 8}, "listops": {"depth": 1}}},
}


def test_encoder_cells_run_resume_and_reach_the_report(tmp_path):
    grid = grid_from_dict(ENC_GRID)
    enc = [c for c in grid.cells() if c.task is not None]
    assert sorted({(c.task, c.variant) for c in enc}) == [("keyword", "baseline"), ("keyword", "dyn_span"),
                                                          ("listops", "baseline"), ("listops", "dyn_span")]
    assert all(c.model["causal"] is False and c.model["n_layer"] == 1 for c in enc)
    assert {c.model["span"] for c in enc if c.variant == "dyn_span"} == {"dynamic"}
    out = tmp_path / "out"
    status = run_grid(grid, out, workers=0, progress=False)
    assert len(status["done"]) == 4 + 8 and not status["failed"], status
    one = out / "encoder" / "listops" / "dyn_span" / "seed1"
    first = json.loads((one / "result.json").read_text())
    assert first["kind"] == "encoder" and 0 <= first["accuracy"] <= 1 and first["steps"] == 6
    (one / "result.json").unlink()  # as if killed after training, before its result was written
    status = run_grid(grid, out, workers=0, progress=False)
    assert len(status["done"]) == 12
    again = json.loads((one / "result.json").read_text())
    assert {k: v for k, v in again.items() if k != "elapsed_s"} == {k: v for k, v in first.items()
                                                                     if k != "elapsed_s"}
    rep = write_report([out], tmp_path / "rep")
    md = Path(rep["markdown"]).read_text()
    assert "Understanding tasks: encoders fine-tuned on classification" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| keyword |") or ln.startswith("| listops |")]
    assert len(rows) == 4
    assert sum("(reference)" in r for r in rows) == 2
    assert all(any(v in r for v in ("supported", "contradicted", "inconclusive")) for r in rows
               if "(reference)" not in r)
    assert "Encoder accuracy by distance" in md
    assert len(rep["verdicts"]) == 10  # the seed-question table is unchanged


def test_encoder_grid_validation():
    with pytest.raises(ConfigError, match="unknown task 'sentiment'"):
        grid_from_dict({**ENC_GRID, "encoder": {"tasks": ["sentiment"]}})
    with pytest.raises(ConfigError, match="'nope' is not a variant"):
        grid_from_dict({**ENC_GRID, "encoder": {"variants": ["nope"]}})
    with pytest.raises(ConfigError, match="finetune.bogus"):
        grid_from_dict({**ENC_GRID, "encoder": {"finetune": {"bogus": 1}}}).cells()


PRETRAIN = {"data": "builtin:stories", "max_steps": 4, "batch_size": 4, "eval_interval": 4, "ckpt_interval": 4,
            "eval_tokens": 512, "log_interval": 2, "warmup_steps": 1}


def test_encoder_pretraining_feeds_fine_tuning_across_workers(tmp_path):
    raw = {**ENC_GRID, "variants": {"baseline": {}}, "seeds": 1,
           "encoder": {**ENC_GRID["encoder"], "pretrain": PRETRAIN}}
    grid = grid_from_dict(raw)
    assert [c.kind.name for c in grid.cells()] == ["lm", "encoder_pretrain", "encoder", "encoder"]
    out = tmp_path / "out"
    status = run_grid(grid, out, workers=2, progress=False)  # subprocesses: fine-tuning waits for pretraining
    assert len(status["done"]) == 4 and not status["failed"], status
    pre = out / "encoder-pretrain" / "baseline" / "seed0"
    assert json.loads((pre / "result.json").read_text())["val_loss"] > 0
    for task in ("keyword", "listops"):
        cell = out / "encoder" / task / "baseline" / "seed0"
        assert json.loads((cell / "cell.json").read_text())["finetune"]["init"] == str(pre / "run")
        assert json.loads((cell / "result.json").read_text())["pretrained"] is True
    md = Path(write_report([out], tmp_path / "rep")["markdown"]).read_text()
    assert "fine-tuned from its masked-LM pretrained encoder" in md and "Masked-LM pretraining of the encoders" in md


def test_fine_tuning_cells_fail_cleanly_when_their_pretraining_fails(tmp_path):
    raw = {**ENC_GRID, "variants": {"baseline": {}}, "seeds": 1,
           "encoder": {**ENC_GRID["encoder"], "pretrain": {**PRETRAIN, "data": str(tmp_path / "missing.txt")}}}
    status = run_grid(grid_from_dict(raw), tmp_path / "out", workers=0, progress=False)
    failed = sorted(f.split(":")[0] for f in status["failed"])
    assert failed == ["encoder-keyword/baseline/seed0", "encoder-listops/baseline/seed0",
                      "encoder-pretrain/baseline/seed0"], status
    assert any("its pretraining cell did not finish" in f for f in status["failed"])


def test_two_compares_on_one_wall_clock_grid_agree(tmp_path):
    """Both processes share one calibration (taken under the grid's lock): grid.json and every cell.json
    agree, every cell runs once, and a rerun resumes instead of failing on a different config. (Each trains its
    cells in its own process, --workers 0: cell processes add only their start-up here; test_two_hosts_share_one_grid
    [wall_clock] and test_encoder_pretraining_feeds_fine_tuning_across_workers run them.)"""
    import subprocess
    import sys

    import yaml

    raw = {**GRID, "match": "wall_clock", "wall_clock_s": 0.3, "seeds": 1,
           "variants": {"small": {}, "big": {"d_model": 64, "n_head": 2}}}
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "dynaformer.cli", "compare", str(path), "--out", str(out), "--workers", "0"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), results
    steps = json.loads((out / "grid.json").read_text())["steps"]
    for v in ("small", "big"):
        cell = json.loads((out / "cells" / v / "seed0" / "cell.json").read_text())
        assert cell["train"]["max_steps"] == steps[v]
        assert (out / "cells" / v / "seed0" / "result.json").exists()
    # status.json describes the folder, not whichever process finished last (each saw the other's cell busy).
    status = json.loads((out / "status.json").read_text())
    assert sorted(status["done"]) == ["big/seed0", "small/seed0"] and status["busy"] == [], status
    again = run_cli(*cmd[3:])  # the same command again, in this process
    assert again.returncode == 0, again.stderr


# --- devices and several hosts ------------------------------------------------------------------

def test_workers_are_pinned_to_gpus(tmp_path, monkeypatch):
    """Worker slot i gets GPU i mod (GPUs), or its nproc_per_cell GPUs; the device count is mocked."""
    import types

    from dynaformer.study import compare as C
    from dynaformer.study import runner, slots

    monkeypatch.setattr(slots, "visible_gpus", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert C.parse_devices(None) == [0, 1, 2, 3] and C.parse_devices("3,1") == [3, 1]
    assert [C.slot_env(i, [0, 1, 2, 3])["CUDA_VISIBLE_DEVICES"] for i in range(6)] == ["0", "1", "2", "3", "0", "1"]
    assert [C.slot_env(i, [3, 1])["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["3", "1", "3"]
    assert [C.slot_env(i, [0, 1, 2, 3], 2)["CUDA_VISIBLE_DEVICES"] for i in range(3)] == ["0,1", "2,3", "0,1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # indices are the parent's visible GPUs
    assert C.slot_env(1, [0, 2]) == {"CUDA_VISIBLE_DEVICES": "6"}
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert C.slot_env(0, []) == {}  # no GPUs: nothing pinned
    for bad, why in (("4", "GPU 4 does not exist"), ("0,x", "'x' is not a GPU index"), ("1,1", "named twice")):
        with pytest.raises(DynaformerError, match=why):
            C.parse_devices(bad)
    with pytest.raises(DynaformerError, match="needs that many GPUs"):
        C.parse_devices("0,1", nproc_per_cell=3)

    # run_grid hands each cell process its slot's GPUs (and a torchrun command for nproc_per_cell > 1).
    launched = []

    def fake_popen(cmd, env, **kw):
        launched.append((cmd, env.get("CUDA_VISIBLE_DEVICES")))
        return types.SimpleNamespace(pid=999999, returncode=0, poll=lambda: None if len(launched) < 2 else 0)

    monkeypatch.setattr(runner.subprocess, "Popen", fake_popen)
    monkeypatch.setattr(runner.time, "sleep", lambda s: None)
    raw = {**GRID, "seeds": 1, "variants": {"a": {}, "b": {}}}
    C.run_grid(grid_from_dict(raw), tmp_path / "o", workers=2, progress=False, devices="1,3", nproc_per_cell=2)
    assert [env for _, env in launched] == ["1,3", "1,3"]  # both slots wrap round the two GPUs
    launched.clear()
    C.run_grid(grid_from_dict(raw), tmp_path / "o2", workers=2, progress=False, devices="2,3")
    assert sorted(env for _, env in launched) == ["2", "3"] and "torch.distributed.run" not in launched[0][0]


def test_compare_bad_devices_is_one_line(tmp_path, monkeypatch):
    import yaml

    from dynaformer.study import slots

    monkeypatch.setattr(slots, "visible_gpus", lambda: 2)
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(GRID))
    res = run_cli("compare", str(path), "--out", str(tmp_path / "o"), "--devices", "2")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "GPU 2 does not exist" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("match", ["tokens", "wall_clock"])
def test_two_hosts_share_one_grid(tmp_path, match):
    """Two compare processes that are two hosts to the lock files (DYNAFORMER_HOST) on one grid folder, as
    on two nodes of a shared filesystem: every cell runs exactly once, by one of them, none is taken over
    (another host's lock never looks stale), and the grid ends complete. The cells run in cell processes
    (--workers 1) for wall_clock, in the compare processes themselves (--workers 0) for tokens: a cell's lock then
    names the compare process rather than the cell process, and both must hold the other host off."""
    import os
    import subprocess
    import sys

    import yaml

    raw = {**GRID, "seeds": 1, "variants": {"a": {}, "c": {"d_model": 48}},
           "train": {**GRID["train"], "max_steps": 6, "ckpt_interval": 3, "eval_interval": 6, "log_interval": 1}}
    if match == "wall_clock":
        raw.update(match="wall_clock", wall_clock_s=0.2)
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "dynaformer.cli", "compare", str(path), "--out", str(out), "--workers",
           "1" if match == "wall_clock" else "0"]
    procs = {h: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "DYNAFORMER_HOST": h, "OMP_NUM_THREADS": "1"})
             for h in ("node-a", "node-b")}
    logs = {h: p.communicate(timeout=600) for h, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), logs
    started = {h: [ln.split(" start ")[1].split(" |")[0] for ln in err.splitlines() if " start " in ln]
               for h, (_, err) in logs.items()}
    keys = ["a/seed0", "c/seed0"]
    assert sorted(started["node-a"] + started["node-b"]) == keys, started  # each cell once, in all
    steps = json.loads((out / "grid.json").read_text())["steps"]
    for h, mine in started.items():
        for key in mine:
            cell = out / "cells" / key
            result = json.loads((cell / "result.json").read_text())
            assert result["host"] == h
            trained = [r["step"] for r in map(json.loads, (cell / "run" / "metrics.jsonl").read_text().splitlines())
                       if "loss" in r]
            want = steps[key.split("/")[0]] if match == "wall_clock" else 6
            assert trained == list(range(1, want + 1))  # one uninterrupted run, never two trainers
    status = json.loads((out / "status.json").read_text())
    assert sorted(status["done"]) == keys and not status["failed"] and not status["busy"], status


def test_one_document_renders_three_ways(tmp_path):
    """report.json, Markdown and HTML come from one Document: the same table cells in both texts, a bold verdict
    colours its HTML cell, a '|' in a cell is escaped for Markdown, and a figure without data says why."""
    from dynaformer.study.render import Document, Heading, Paragraph, Table, write_document
    from dynaformer.study.report import VerdictRow

    row = VerdictRow("span", "3", "a | b", "qa_acc", "0.5 ± 0.1 (n=2)", "0.4 ± 0.1 (n=2)", "0.03", "ev",
                     "**supported**", "—", "—")
    doc = Document({"verdicts": [{"question": "span"}]},
                   [Heading(1, "t"), Paragraph("**bold** text"), Table(list(VerdictRow.HEAD), [row.cells()]),
                    Image("Spans", None, "not recorded by any run", "caption")])
    paths = write_document(doc, tmp_path)
    md, html = Path(paths["markdown"]).read_text(), Path(paths["html"]).read_text()
    assert json.loads(Path(paths["json"]).read_text()) == doc.data
    assert "| span | 3 | a \\| b | qa_acc |" in md and "**supported**" in md
    assert '<td class="supported">supported</td>' in html and "<td>a | b</td>" in html
    assert "<strong>bold</strong> text" in html
    assert "*not recorded by any run*" in md and "<em>not recorded by any run</em>" in html
    assert dict(zip(VerdictRow.HEAD, row.cells(), strict=True))["verdict"] == "**supported**"


def test_a_cell_folder_from_before_a_new_config_field_still_matches():
    from dynaformer.study.compare import same_cell

    new = {"variant": "b", "seed": 0, "model": {"n_layer": 2}, "train": {"lr": 1e-3, "optimizer": "adamw"}}
    old = {"variant": "b", "seed": 0, "model": {"n_layer": 2}, "train": {"lr": 1e-3}}  # before `optimizer` existed
    assert same_cell(old, new)
    assert not same_cell(old, {**new, "train": {"lr": 1e-3, "optimizer": "muon"}})  # not the default: differs
    assert not same_cell(old, {**new, "train": {"lr": 2e-3, "optimizer": "adamw"}})
    assert not same_cell({**old, "match_reach": {}}, new)


def test_relatives_must_be_variants_of_the_grid():
    grid = grid_from_dict({**GRID, "questions": {**GRID["questions"], "relatives": {"span": ["dyn_span"]}}})
    assert grid.questions["relatives"] == {"span": ["dyn_span"]}
    with pytest.raises(ConfigError, match="questions.relatives.span: 'fox' is not a variant"):
        grid_from_dict({**GRID, "questions": {**GRID["questions"], "relatives": {"span": ["fox"]}}})
    with pytest.raises(ConfigError, match="questions.relatives"):
        grid_from_dict({**GRID, "questions": {**GRID["questions"], "relatives": {"depth": ["dyn_span"]}}})
