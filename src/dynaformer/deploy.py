"""Deployment graphs of a trained model: `torch.export` programs and ONNX files, for every residual and span kind.

The graph maps token ids (B, T) to logits (B, T, V) for any T from 2 to `max_len` (the context by default),
without a KV cache. While exporting, the kernel planner takes the masked SDPA for span attention (a graph cannot
branch on the spans' values), which is exact for every span and length; the eager model's band kernels are a
speed choice, not a different function.

    dynaformer export-onnx RUN OUT.onnx [--max_len N] [--force]     # needs the [onnx] extra
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import DynaformerError
from .extras import require
from .model import Transformer


class Logits(torch.nn.Module):
    """The model as a function of token ids alone: (B, T) → logits (B, T, V)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)[0]


def _prepared(model: Transformer, max_len: int | None) -> tuple[Logits, tuple, dict]:
    n = max_len or model.cfg.context_len
    if n < 2:
        raise DynaformerError(f"export: max_len must be at least 2, got {n}")
    # Position tables (rotary, the dynamic residual's φ and its inference tables) grow lazily; grown past max_len
    # first, by one forward of max_len + 1 positions, their sizes do not bound the traced length.
    device = next(model.parameters()).device
    model.rotary.reserve(n + 1, device)
    with torch.no_grad():
        model.eval()(torch.zeros(1, n + 1, dtype=torch.long, device=device))
    # Two rows and several tokens: an example of size 1 would fix that dimension at 1 in the graph.
    example = (torch.zeros(2, min(n, 16), dtype=torch.long, device=next(model.parameters()).device),)
    dims = {"idx": {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("T", min=2, max=n)}}
    return Logits(model.eval()), example, dims


def export_program(model: Transformer, max_len: int | None = None) -> torch.export.ExportedProgram:
    """A `torch.export` program of the model's logits for batches of 1..1024 rows and 2..max_len tokens."""
    module, example, dims = _prepared(model, max_len)
    with torch.no_grad():
        return torch.export.export(module, example, dynamic_shapes=dims)


def export_onnx(run: str | Path, out: str | Path, max_len: int | None = None, force: bool = False) -> dict:
    """The run's newest checkpoint as an ONNX file (opset from torch's dynamo exporter), input `idx` (int64,
    (batch, T)), output `logits` (float32, (batch, T, V))."""
    require("onnxscript", "onnx")
    from .runs import load_model

    out = Path(out)
    if out.is_dir():
        raise DynaformerError(f"export-onnx: '{out}' is a folder; give the path of the .onnx file to write")
    if out.exists() and not force:
        raise DynaformerError(f"export-onnx: '{out}' exists; choose another path or pass --force")
    model, tokenizer, ckpt = load_model(run)
    module, example, dims = _prepared(model, max_len)
    with torch.no_grad():
        program = torch.onnx.export(module, example, dynamo=True, dynamic_shapes=dims, input_names=["idx"],
                                    output_names=["logits"], verbose=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        program.save(str(tmp))
        os.replace(tmp, out)  # a failed write never leaves a partial OUT
    finally:
        tmp.unlink(missing_ok=True)
    return {"checkpoint": str(ckpt), "out": str(out), "max_len": max_len or model.cfg.context_len,
            "vocab_size": model.cfg.vocab_size, "tokenizer": tokenizer.kind, "bytes": out.stat().st_size}
