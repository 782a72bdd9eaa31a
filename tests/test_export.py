"""Deployment export of every residual × span kind (deploy.py): `torch.export` traces the model without guards on
the spans' values (the planner takes the masked SDPA while exporting), the program gives our logits for any batch
and length up to the context, and `dynaformer export-onnx` writes a file onnxruntime runs to the same logits."""

from __future__ import annotations

import pytest
import torch

from dynaformer.deploy import export_program
from dynaformer.model import ModelConfig, Transformer

from .conftest import MATRIX, cli_in_process

T_LONG = 150  # past one band chunk (64): the eager model runs the band / split kernels here


def _model(residual: str, span: str, context: int = 256) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_len=context, n_layer=2, n_head=4, d_model=32, residual=residual,
                      span=span, span_max=96, span_init=24.0, span_window=48)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # spans that differ per head and token, some reaching every key, as trained ones do
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("residual,span", MATRIX)
def test_torch_export_matches_eager_at_any_length(residual, span):
    model = _model(residual, span)
    program = export_program(model)
    for B, T in ((1, 2), (2, 17), (3, T_LONG), (2, 256)):
        x = torch.randint(0, 64, (B, T))
        with torch.no_grad():
            want = model(x)[0]
            got = program.module()(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_export_onnx_command_matches_onnxruntime(tmp_path, text_file, capsys):
    """A trained span + dynamic-residual run, exported by the command line; onnxruntime's logits are ours."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from dynaformer.runs import load_model

    run, out = tmp_path / "run", tmp_path / "m.onnx"
    tiny = ["--n_layer", "2", "--n_head", "2", "--d_model", "32", "--context_len", "160", "--batch_size", "2",
            "--max_steps", "3", "--eval_tokens", "320", "--progress_bar", "false", "--residual", "dynamic",
            "--span", "dynamic", "--span_max", "64", "--span_init", "16"]
    assert cli_in_process(capsys, "train", *tiny, "--data", str(text_file), "--out", str(run)).returncode == 0
    res = cli_in_process(capsys, "export-onnx", str(run), str(out))
    assert res.returncode == 0, res.stderr
    again = cli_in_process(capsys, "export-onnx", str(run), str(out))
    assert again.returncode == 2 and "exists" in again.stderr  # never overwritten without --force
    model, _, _ = load_model(run)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for B, T in ((1, 5), (2, 150)):
        x = torch.randint(0, model.cfg.vocab_size, (B, T))
        (got,) = sess.run(None, {"idx": x.numpy()})
        with torch.no_grad():
            want = model(x)[0]
        torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # 16 ONNX exports: ≈ 50 s of two cores; the default loop keeps the trained run's export above
@pytest.mark.parametrize("residual,span", MATRIX)
def test_onnx_matches_over_the_matrix(tmp_path, residual, span):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    from dynaformer.deploy import _prepared

    model = _model(residual, span, context=160)
    module, example, dims = _prepared(model, None)
    with torch.no_grad():
        prog = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dims, input_names=["idx"],
                                 output_names=["logits"], verbose=False)
    prog.save(str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randint(0, 64, (2, T_LONG))
    (got,) = sess.run(None, {"idx": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x)[0], rtol=1e-4, atol=1e-4)
