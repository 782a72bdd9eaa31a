"""Checkpoints: `run_dir/step-N/` with model.safetensors, config.json, trainer.pt and a manifest of
SHA-256 checksums written last. A checkpoint is written in a temporary folder and renamed into place,
so a crash never leaves a half-written `step-N`; loading verifies every checksum and refuses pickled
code (trainer state is read with `torch.load(weights_only=True)`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, DynaformerError, is_disk_full
from ..files import sha256_file as _sha256

MANIFEST = "manifest.json"
FORMAT = "dynaformer-checkpoint-v1"
_STEP_RE = re.compile(r"^step-(\d+)$")


def _dedup(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (the head shares the embedding), contiguous, on CPU."""
    out, seen = {}, {}
    for name, t in state.items():
        key = (t.data_ptr(), t.shape, t.dtype) if t.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = name
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], config: dict[str, Any],
                    trainer_state: dict[str, Any], keep_last: int = 0) -> Path:
    """Write `step-N`. An existing `step-N` that verifies is kept (e.g. an interrupt right after a periodic
    save); one that does not is replaced, so a damaged final checkpoint heals when the run is resumed."""
    final = run_dir / f"step-{step}"
    if final.exists():
        try:
            verify_checkpoint(final)
            load_trainer_state(final)  # readable as plain data, too
            return final
        except CheckpointError as e:
            print(f"warning: rewriting {final}: {e}", file=sys.stderr)
    tmp = run_dir / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(_dedup(model_state), tmp / "model.safetensors", metadata={"format": FORMAT})
        (tmp / "config.json").write_text(json.dumps({**config, "step": step}, indent=2, ensure_ascii=False))
        torch.save(trainer_state, tmp / "trainer.pt")
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files}, indent=2))
        for p in tmp.iterdir():  # make the bytes durable before the rename publishes them
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    except Exception as e:  # safetensors and torch.save report I/O failures as their own exception types
        shutil.rmtree(tmp, ignore_errors=True)  # the partial folder was never visible; free its space
        if not is_disk_full(e):
            raise
        good = latest_checkpoint(run_dir, warn=False)
        kept = f"the last good checkpoint {good.name} is intact" if good else "no earlier checkpoint exists"
        raise DynaformerError(f"the disk is full: step-{step} could not be written to '{run_dir}' and was not "
                              f"kept; {kept}. Free space and run again with --resume auto") from None
    if final.exists():  # the damaged one: out of the way (atomic), the new one in, then delete the old
        _remove(final, run_dir)
    os.replace(tmp, final)
    if keep_last > 0:
        # Only checkpoints older than the one just written count, so a damaged folder with a higher step
        # (left by an earlier run) can never make pruning delete the checkpoint that was just saved.
        older = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            _remove(old, run_dir)
    return final


def _remove(ckpt: Path, run_dir: Path) -> None:
    """Rename first (atomic), then delete: a crash mid-delete never leaves a visible, partial step-N."""
    doomed = run_dir / f".tmp-step-delete-{ckpt.name}-{os.getpid()}"
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def checkpoint_step(ckpt: Path) -> int:
    m = _STEP_RE.match(ckpt.name)
    return int(m.group(1)) if m else -1


def list_checkpoints(run_dir: Path) -> list[Path]:
    """step-N folders (complete or not), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def verify_checkpoint(ckpt: Path) -> dict:
    """Check the manifest and every checksum; return the parsed config.json."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        raise CheckpointError(
            f"checkpoint '{ckpt}' is incomplete or not a dynaformer checkpoint (no valid manifest)") from None
    if manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"checkpoint '{ckpt}' is not a dynaformer checkpoint")
    for name in ("model.safetensors", "config.json", "trainer.pt"):
        if name not in manifest["files"]:
            raise CheckpointError(f"checkpoint '{ckpt}' lacks {name} in its manifest")
    for name, digest in manifest["files"].items():
        path = ckpt / name
        if not path.is_file() or _sha256(path) != digest:
            raise CheckpointError(f"checkpoint '{ckpt}': {name} is missing, truncated or corrupt (checksum mismatch)")
    try:
        return json.loads((ckpt / "config.json").read_text())
    except ValueError:
        raise CheckpointError(f"checkpoint '{ckpt}': config.json is not valid JSON") from None


def latest_checkpoint(run_dir: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint whose checksums verify; damaged newer ones are skipped with a warning."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(ckpt)
            return ckpt
        except CheckpointError as e:
            if warn:
                print(f"warning: skipping {e}", file=sys.stderr)
    return None


def set_aside_checkpoints(run_dir: Path) -> list[Path]:
    """Rename every step-N to set-aside-step-N (never deleted: they may hold the only copy of a model)."""
    moved = []
    for ckpt in list_checkpoints(run_dir):
        dst = run_dir / f"set-aside-{ckpt.name}"
        i = 1
        while dst.exists():
            dst, i = run_dir / f"set-aside-{ckpt.name}.{i}", i + 1
        os.replace(ckpt, dst)
        print(f"warning: set {ckpt} aside as {dst.name}", file=sys.stderr)
        moved.append(dst)
    return moved


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary checkpoint folders left by a crash mid-write (never visible as step-N)."""
    for tmp in run_dir.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def read_model_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(ckpt / "model.safetensors")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}': cannot read model.safetensors ({e})") from None


def check_fits(ckpt: Path, model: torch.nn.Module, tensors: dict[str, torch.Tensor | tuple[int, ...]]) -> None:
    """The checkpoint's tensors (or their shapes) are exactly the model's: names and shapes; a tied head
    may be absent. `model` may live on the meta device, so nothing is allocated before this passes."""
    want = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    have = {n: tuple(t if isinstance(t, tuple) else t.shape) for n, t in tensors.items()}
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    missing = [n for n in want if n not in have and not (tied and n == "head.weight")]
    unexpected = [n for n in have if n not in want]
    shapes = [f"{n} {s} vs {want[n]}" for n, s in have.items() if n in want and s != want[n]]
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint '{ckpt}' does not fit this model (missing: {missing[:3]}, unexpected: "
                              f"{unexpected[:3]}, shapes: {shapes[:2]})")


def read_model_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from model.safetensors' header, without reading the tensors."""
    from safetensors import safe_open

    try:
        with safe_open(ckpt / "model.safetensors", framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}': cannot read model.safetensors ({e})") from None


def load_model_state(ckpt: Path, model: torch.nn.Module) -> None:
    tensors = read_model_tensors(ckpt)
    check_fits(ckpt, model, tensors)
    model.load_state_dict(tensors, strict=False)  # strict=False only for the tied head, checked above


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        return torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain data
        raise CheckpointError(
            f"checkpoint '{ckpt}': trainer.pt is not a plain-data trainer state ({type(e).__name__})") from None
