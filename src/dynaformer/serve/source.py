"""What `dynaformer serve SOURCE` loads: a run folder (its newest verified checkpoint), one of its step-N
checkpoints, or a folder `dynaformer export-hf` wrote (loaded by the project's own `hf.export.load_export`, so
the same engine serves it). Anything else is one line naming what was expected."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DynaformerError

EXPECTED = ("give a run folder, one of its step-N checkpoints, or a folder written by `dynaformer export-hf` "
            "(config.json with model_type \"dynaformer\")")


def is_export(folder: Path) -> bool:
    """A folder with a config.json of model_type "dynaformer": what `export_hf` writes (read without transformers)."""
    try:
        return folder.is_dir() and json.loads((folder / "config.json").read_text()).get("model_type") == "dynaformer"
    except (OSError, ValueError, AttributeError):
        return False


def source_kind(source: str | Path) -> str:
    """"checkpoint", "run" or "export", or a DynaformerError naming what was expected."""
    p = Path(source)
    if not p.exists():
        raise DynaformerError(f"serve: '{source}' does not exist ({EXPECTED})")
    if (p / "manifest.json").exists() or p.name.startswith("step-"):
        return "checkpoint"
    if is_export(p):
        return "export"
    if p.is_dir() and any(c.name.startswith("step-") for c in p.iterdir()):
        return "run"  # load_model says which of its checkpoints is incomplete or damaged
    raise DynaformerError(f"serve: '{source}' is neither a run folder with a checkpoint, a step-N checkpoint nor "
                          f"an exported model; {EXPECTED}")


def load_source(source: str | Path):
    """(model, tokenizer, default model name) of a run folder, step-N checkpoint or exported folder."""
    kind = source_kind(source)
    p = Path(source)
    if kind == "export":
        from ..extras import require

        require("transformers", "hf")
        from ..hf.export import load_export

        model, tokenizer = load_export(p)
        return model, tokenizer, p.resolve().name
    from ..runs import load_model

    model, tokenizer, ckpt = load_model(p)
    return model, tokenizer, ckpt.parent.name if p.resolve() != ckpt.resolve() else ckpt.name
