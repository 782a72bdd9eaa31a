"""train.dtype: `auto` picks bf16 autocast only where it pays (capability, then a cached probe), records the choice
and why in run.json and the first line; `bf16` where it cannot run is one line and exit 2; bf16 training stays
within tolerance of fp32."""

from __future__ import annotations

import json

import pytest
import torch

from dynaformer.model import ModelConfig
from dynaformer.train import device as dev
from dynaformer.train.config import TrainConfig
from dynaformer.train.metrics import read_metrics
from dynaformer.train.rundir import open_run
from dynaformer.train.trainer import Trainer

from .conftest import assert_user_error, cli_in_process

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # never the user's cache
    monkeypatch.delenv(dev.PROBE_ENV, raising=False)


def _native_bf16_cpu(monkeypatch, pays: bool) -> list[int]:
    """Pretend an AVX-512 CPU whose oneDNN has bf16, with a probe that says `pays`; returns the probe's calls."""
    calls: list[int] = []

    def probe():
        calls.append(1)
        return {"fp32_ms": 10.0, "bf16_ms": 4.0 if pays else 30.0, "bf16_pays": pays}

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(dev, "probe_bf16_matmul", probe)
    return calls


@pytest.mark.parametrize("pays", [True, False])
def test_auto_follows_the_probe_and_caches_it(monkeypatch, tmp_path, pays):
    calls = _native_bf16_cpu(monkeypatch, pays)
    p = dev.resolve_precision("auto", CPU)
    assert p.dtype == ("bf16" if pays else "fp32") and "probe" in p.reason
    assert dev.resolve_precision("auto", CPU) == p and len(calls) == 1  # measured once per machine
    cache = json.loads((tmp_path / "cache" / "dynaformer" / "dtype-probe.json").read_text())
    (key, entry), = cache.items()
    assert torch.__version__ in key and dev.cpu_model() in key and entry["bf16_pays"] is pays


def test_auto_on_an_avx2_cpu_is_fp32_without_probing(monkeypatch):
    calls = _native_bf16_cpu(monkeypatch, True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(dev.platform, "machine", lambda: "x86_64")
    p = dev.resolve_precision("auto", CPU)
    assert p.dtype == "fp32" and "AVX2" in p.reason and not calls
    assert dev.resolve_precision("fp32", CPU).dtype == "fp32"


def test_the_probe_really_times_both_dtypes():
    r = dev.probe_bf16_matmul()
    assert r["fp32_ms"] > 0 and r["bf16_ms"] > 0 and isinstance(r["bf16_pays"], bool)


def _cfgs(out, data, **train):
    model = ModelConfig(context_len=32, n_layer=2, n_head=2, d_model=32)
    base = dict(data=str(data), out=str(out), max_steps=12, batch_size=4, lr=3e-3, warmup_steps=2, log_interval=1,
                eval_interval=12, eval_tokens=512, progress_bar=False, seed=3)
    return model, TrainConfig(**{**base, **train})


def test_both_branches_train_and_bf16_stays_near_fp32(tmp_path, text_file, monkeypatch):
    monkeypatch.setenv(dev.PROBE_ENV, "fp32")
    a = Trainer(open_run(*_cfgs(tmp_path / "fp32", text_file)))
    assert a.autocast is None
    a.fit()
    monkeypatch.setenv(dev.PROBE_ENV, "bf16")
    b = Trainer(open_run(*_cfgs(tmp_path / "bf16", text_file)))
    assert b.autocast is torch.bfloat16
    b.fit()
    for run, want in (("fp32", "fp32"), ("bf16", "bf16")):
        info = json.loads((tmp_path / run / "run.json").read_text())
        assert info["precision"]["dtype"] == want and dev.PROBE_ENV in info["precision"]["reason"]
        assert info["identity"]["train"]["dtype"] == want and info["train"]["dtype"] == "auto"
    la, lb = ([r["loss"] for r in read_metrics(tmp_path / r / "metrics.jsonl") if "loss" in r]
              for r in ("fp32", "bf16"))
    assert la != lb  # bf16 really ran
    assert max(abs(x - y) for x, y in zip(la, lb, strict=True)) < 0.05 * max(la), (la, lb)
    va, vb = (json.loads((tmp_path / r / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]
              for r in ("fp32", "bf16"))
    assert abs(va - vb) < 0.03 * va


def test_the_choice_is_in_the_first_line(tmp_path, text_file, capsys, monkeypatch):
    monkeypatch.setenv(dev.PROBE_ENV, "fp32")
    res = cli_in_process(capsys, "train", "--data", str(text_file), "--n_layer", "1", "--n_head", "2", "--d_model",
                         "32", "--context_len", "32", "--max_steps", "1", "--eval_tokens", "256", "--out",
                         str(tmp_path / "r"), "--progress_bar", "false")
    assert res.returncode == 0, res.stderr
    assert f"fp32 (auto: {dev.PROBE_ENV}=fp32)" in res.stdout.splitlines()[0]


def test_bf16_where_it_cannot_run_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dev, "bf16_runs", lambda device: False)
    _native_bf16_cpu(monkeypatch, pays=False)  # what `auto` would pick, whatever this machine's CPU is
    res = cli_in_process(capsys, "train", "--dtype", "bf16", "--out", str(tmp_path / "r"))
    assert_user_error(res, "train.dtype", "bf16 autocast is not supported", "auto would pick fp32")
    assert not (tmp_path / "r").exists()


def test_bf16_on_an_avx2_cpu_warns_and_runs(monkeypatch, capsys):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    p = dev.resolve_precision("bf16", CPU)
    assert p.dtype == "bf16" and "emulated" in capsys.readouterr().err
