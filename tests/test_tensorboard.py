"""TensorBoard scalars: the same numbers as metrics.jsonl (which is always written); a missing
optional package (tensorboard, lm-eval, transformers) is a one-line error naming the extra to install."""

from __future__ import annotations

import importlib.util
import json

import pytest

from dynaformer.errors import ConfigError
from dynaformer.train.config import TrainConfig


def test_scalars_match_jsonl(tmp_path, text_file, capsys):
    pytest.importorskip("tensorboard", reason="needs the [tensorboard] extra: pip install 'dynaformer[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dynaformer.cli import main

    run = tmp_path / "run"
    rc = main(["train", "--n_layer", "1", "--n_head", "2", "--d_model", "32", "--context_len", "32",
               "--batch_size", "2", "--eval_tokens", "64", "--progress_bar", "false", "--max_steps", "4",
               "--log_interval", "2", "--eval_interval", "2", "--data", str(text_file), "--out", str(run),
               "--tensorboard", "true"])
    assert rc == 0
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    val = {e.step: e.value for e in acc.Scalars("eval/val_loss")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in records if "loss" in r}, rel=1e-6)
    assert val == pytest.approx({r["step"]: r["val_loss"] for r in records if "val_loss" in r}, rel=1e-6)
    assert set(loss) == {2, 4}


def test_per_layer_and_head_series_are_grouped_scalars(tmp_path, text_file):
    pytest.importorskip("tensorboard", reason="needs the [tensorboard] extra: pip install 'dynaformer[tensorboard]'")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dynaformer.cli import main

    run = tmp_path / "run"
    rc = main(["train", "--n_layer", "2", "--n_head", "2", "--d_model", "32", "--context_len", "32",
               "--batch_size", "2", "--eval_tokens", "64", "--progress_bar", "false", "--max_steps", "4",
               "--log_interval", "2", "--eval_interval", "4", "--data", str(text_file), "--out", str(run),
               "--residual", "dynamic", "--span", "dynamic", "--span_max", "16", "--span_init", "4",
               "--tensorboard", "true"])
    assert rc == 0
    records = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "span_mean" in r]
    assert records
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for layer in range(2):
        for head in range(2):
            got = {e.step: e.value for e in acc.Scalars(f"span_mean/L{layer}.H{head}")}
            assert got == pytest.approx({r["step"]: r["span_mean"][layer][head] for r in records}, rel=1e-6)
        got = {e.step: e.value for e in acc.Scalars(f"res_gain/L{layer}.mlp")}
        assert got == pytest.approx({r["step"]: r["res_gain"][2 * layer + 1] for r in records}, rel=1e-6)
        assert f"layer_grad_norm/L{layer}" in tags
    assert "custom_scalars__config__" in acc.Tags()["tensors"]  # one multi-line chart per series


def test_missing_package_is_a_config_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ConfigError, match=r"train.tensorboard.*dynaformer\[tensorboard\]"):
        TrainConfig(tensorboard=True).validate()
    TrainConfig(tensorboard=False).validate()


@pytest.mark.parametrize("argv,module,extra", [
    (["eval", "RUN", "--lm-eval", "dynaformer_story_qa"], "lm_eval", "eval"),
    (["export-hf", "RUN", "OUT"], "transformers", "hf"),
])
def test_missing_extra_is_one_line(argv, module, extra, monkeypatch, capsys, tmp_path):
    from dynaformer.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    capsys.readouterr()
    rc = main([str(tmp_path / a) if a in ("RUN", "OUT") else a for a in argv])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and f"dynaformer[{extra}]" in err[0], err
