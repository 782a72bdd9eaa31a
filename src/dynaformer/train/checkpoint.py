"""Checkpoints: `run_dir/step-N/` with model.safetensors, config.json, trainer.pt and a manifest of
SHA-256 checksums written last. A checkpoint is written in a temporary folder and renamed into place,
so a crash never leaves a half-written `step-N`; loading verifies every checksum and refuses pickled
code (trainer state is read with `torch.load(weights_only=True)`).

Under torchrun the model and optimizer tensors go to `step-N/dcp/` instead, a torch.distributed.checkpoint
(DCP) folder that every rank writes its own shards of, in parallel; the same manifest (its shards' checksums
included) is written last by rank 0, and DCP reshards on load, so such a checkpoint resumes on any world size
and loads into one process (eval, export-hf) through DCP itself."""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import os
import pickle
import re
import shutil
import sys
import warnings
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError, DynaformerError, is_disk_full
from ..files import sha256_file as _sha256

MANIFEST = "manifest.json"
FORMAT = "dynaformer-checkpoint-v1"
DCP_DIR = "dcp"  # the DCP folder inside step-N (layout "dcp" in the manifest)
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
    _publish(run_dir, tmp, final, step, keep_last)
    return final


def _publish(run_dir: Path, tmp: Path, final: Path, step: int, keep_last: int) -> None:
    if final.exists():  # the damaged one: out of the way (atomic), the new one in, then delete the old
        _remove(final, run_dir)
    os.replace(tmp, final)
    if keep_last > 0:
        # Only checkpoints older than the one just written count, so a damaged folder with a higher step
        # (left by an earlier run) can never make pruning delete the checkpoint that was just saved.
        older = [c for c in list_checkpoints(run_dir) if checkpoint_step(c) < step]
        for old in older[: max(0, len(older) - (keep_last - 1))]:
            _remove(old, run_dir)


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
    weights = f"{DCP_DIR}/.metadata" if manifest.get("layout") == "dcp" else "model.safetensors"
    for name in (weights, "config.json", "trainer.pt"):
        if name not in manifest["files"]:
            raise CheckpointError(f"checkpoint '{ckpt}' lacks {name} in its manifest")
    for name, digest in manifest["files"].items():
        path = ckpt / name
        if not path.is_file() or _sha256(path) != digest:
            raise CheckpointError(f"checkpoint '{ckpt}': {name} is missing, truncated or corrupt (checksum mismatch)")
    try:
        config = json.loads((ckpt / "config.json").read_text())
    except ValueError:
        raise CheckpointError(f"checkpoint '{ckpt}': config.json is not valid JSON") from None
    if manifest.get("layout") == "dcp":
        _read_dcp_metadata(ckpt)  # plain data only, every shard inside the folder: else the step is damaged
    return config


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
    """Full model tensors on CPU, from either layout (a DCP checkpoint is read through DCP)."""
    if checkpoint_layout(ckpt) == "dcp":
        tensors = {n: torch.empty(shape, dtype=dtype) for n, (shape, dtype) in _dcp_model_entries(ckpt).items()}
        load_dcp(ckpt, {"model": tensors})
        return tensors
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
    # A classifier's tied head is `backbone.head.weight`: its backbone's.
    missing = [n for n in want if n not in have and not (tied and n in ("head.weight", "backbone.head.weight"))]
    unexpected = [n for n in have if n not in want]
    shapes = [f"{n} {s} vs {want[n]}" for n, s in have.items() if n in want and s != want[n]]
    if missing or unexpected or shapes:
        raise CheckpointError(f"checkpoint '{ckpt}' does not fit this model (missing: {missing[:3]}, unexpected: "
                              f"{unexpected[:3]}, shapes: {shapes[:2]})")


def read_model_shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from model.safetensors' header, without reading the tensors."""
    from safetensors import safe_open

    if checkpoint_layout(ckpt) == "dcp":
        return {n: shape for n, (shape, _) in _dcp_model_entries(ckpt).items()}
    try:
        with safe_open(ckpt / "model.safetensors", framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint '{ckpt}': cannot read model.safetensors ({e})") from None


def load_model_state(ckpt: Path, model: torch.nn.Module) -> None:
    """Weights of either layout into a whole (unsharded) model; eval, generate and export-hf use this."""
    if checkpoint_layout(ckpt) == "dcp":  # straight into the model's own tensors: no second copy
        check_fits(ckpt, model, read_model_shapes(ckpt))
        load_dcp(ckpt, {"model": _dedup_keys(model.state_dict(), ckpt)})
    else:
        tensors = read_model_tensors(ckpt)
        check_fits(ckpt, model, tensors)
        model.load_state_dict(tensors, strict=False)  # strict=False only for the tied head, checked above
    bad = next((n for n, t in model.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())),
               None)
    if bad is not None:
        raise CheckpointError(f"checkpoint '{ckpt}': its weights are not finite ({bad} holds NaN or inf)")


_TRAINER_KEYS = ("step", "elapsed_s", "sampler", "torch_rng")  # + "optimizer" (full layout) / "param_groups" (DCP)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():  # a refused foreign pickle is our one line, not torch's warning too
            warnings.simplefilter("ignore")
            state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything that is not plain data
        raise CheckpointError(
            f"checkpoint '{ckpt}': trainer.pt is not a plain-data trainer state ({type(e).__name__})") from None
    need = (*_TRAINER_KEYS, "param_groups" if checkpoint_layout(ckpt) == "dcp" else "optimizer")
    missing = [k for k in need if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"checkpoint '{ckpt}': trainer.pt lacks {', '.join(missing)} (a damaged or foreign "
                              f"trainer state)")
    return state


# --- DCP (torch.distributed.checkpoint) layout ---------------------------------------------------------

def checkpoint_layout(ckpt: Path) -> str:
    """"dcp" or "safetensors", from the manifest (verify_checkpoint checks it is sound)."""
    try:
        return json.loads((ckpt / MANIFEST).read_text()).get("layout", "safetensors")
    except (OSError, ValueError, AttributeError):
        return "safetensors"


def _dedup_keys(state: dict[str, torch.Tensor], ckpt: Path) -> dict[str, torch.Tensor]:
    """Only the names the checkpoint holds: a tied head shares the embedding's tensor, so loading the
    embedding fills both."""
    have = _dcp_model_entries(ckpt)
    return {n: t for n, t in state.items() if n in have}


# DCP's metadata file is a pickle; only DCP's own dataclasses and enums and these plain torch/stdlib names may
# come out of it (never code), so a forged checkpoint cannot run anything when read.
_SAFE_GLOBALS = {("builtins", "set"), ("builtins", "frozenset"), ("collections", "OrderedDict"), ("torch", "Size"),
                 ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def _read_dcp_metadata(ckpt: Path):
    try:
        data = (ckpt / DCP_DIR / ".metadata").read_bytes()
        meta = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # missing, truncated or refused: a damaged checkpoint like any other
        raise CheckpointError(f"checkpoint '{ckpt}': {DCP_DIR}/.metadata is unreadable or not plain data "
                              f"({type(e).__name__}: {e})") from None
    _check_shard_paths(ckpt, meta)
    return meta


def _check_shard_paths(ckpt: Path, meta: Any) -> None:
    """Every shard the metadata names lies inside ckpt/dcp: a relative path without '..' that does not leave the
    folder through a symlink, with a non-negative offset and length. Checked before any shard is read, so a
    forged checkpoint cannot make us read another file."""
    root = (ckpt / DCP_DIR).resolve()
    entries = getattr(meta, "storage_data", None)
    if not isinstance(entries, dict):
        raise CheckpointError(f"checkpoint '{ckpt}': {DCP_DIR}/.metadata has no shard table")
    for info in entries.values():
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        path = PurePosixPath(rel) if isinstance(rel, str) and rel and "\\" not in rel and "\0" not in rel else None
        inside = path is not None and not path.is_absolute() and ".." not in path.parts
        if inside:
            target = (root / path).resolve()
            inside = target != root and target.is_relative_to(root)
        if not inside:
            raise CheckpointError(f"checkpoint '{ckpt}': {DCP_DIR}/.metadata names a shard outside its folder "
                                  f"({str(rel)[:100]!r}); refused")
        if not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            raise CheckpointError(f"checkpoint '{ckpt}': {DCP_DIR}/.metadata gives shard {rel!r} a bad offset or "
                                  f"length ({offset!r}, {length!r})")


def _dcp_model_entries(ckpt: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Model tensor names → (full shape, dtype), from the DCP metadata (no shard is read)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = _read_dcp_metadata(ckpt)
    out = {}
    for key, m in meta.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata):
            out[key.removeprefix("model.")] = (tuple(m.size), m.properties.dtype)
    return out


def _reader(ckpt: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            meta = _read_dcp_metadata(ckpt)  # DCP's own reader would unpickle anything
            from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta

            if any(isinstance(m, BytesStorageMetadata) for m in meta.state_dict_metadata.values()):
                # DCP unpickles byte entries with weights_only=False; ours never writes any.
                raise CheckpointError(f"checkpoint '{ckpt}': {DCP_DIR} holds pickled objects, not only tensors")
            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return SafeReader(ckpt / DCP_DIR)


def load_dcp(ckpt: Path, state: dict[str, Any]) -> None:
    """Read `state`'s tensors (plain or DTensor shards, any world size) from ckpt/dcp in place. Collective
    when a process group is up; a shard that does not fit is a CheckpointError on every rank."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
            dcp.load(state, storage_reader=_reader(ckpt), no_dist=no_dist)
    except (CheckpointException, RuntimeError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint '{ckpt}': its DCP shards do not load ({first})") from None


def _dcp_target(run_dir: Path, step: int, final: Path) -> tuple[bool, Path]:
    """Rank 0 decides for all ranks: keep a verifying step-N (True), or write into one temporary folder."""
    import torch.distributed as dist

    plan: list[Any] = [None]
    if dist.get_rank() == 0:
        keep = False
        if final.exists():
            try:
                verify_checkpoint(final)
                load_trainer_state(final)
                keep = True
            except CheckpointError as e:
                print(f"warning: rewriting {final}: {e}", file=sys.stderr)
        tmp = run_dir / f".tmp-step-{step}-{os.getpid()}"
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / DCP_DIR).mkdir(parents=True)
        plan = [(keep, str(tmp))]
    dist.broadcast_object_list(plan, src=0)
    return plan[0][0], Path(plan[0][1])


def _dcp_write_shards(tensors: dict[str, Any], tmp: Path) -> tuple[dict[str, str], BaseException | None]:
    """Every rank writes its shards (DCP); returns this rank's share of the shard checksums, or the error."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp / DCP_DIR, sync_files=True))
        shards = sorted(p.name for p in (tmp / DCP_DIR).iterdir())
        return {f"{DCP_DIR}/{n}": _sha256(tmp / DCP_DIR / n) for i, n in enumerate(shards) if i % world == rank}, None
    except Exception as e:  # DCP raises on every rank when any rank's write fails
        return {}, e


def _dcp_write_rank0_files(tmp: Path, step: int, config: dict[str, Any], trainer_state: dict[str, Any],
                           checksums: dict[str, str], world: int) -> None:
    """Rank 0: config.json, trainer.pt and the manifest of every file, all fsynced."""
    (tmp / "config.json").write_text(json.dumps({**config, "step": step}, indent=2, ensure_ascii=False))
    torch.save(trainer_state, tmp / "trainer.pt")
    files = {**checksums, **{n: _sha256(tmp / n) for n in ("config.json", "trainer.pt")}}
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "layout": "dcp", "step": step,
                                            "world": world, "files": dict(sorted(files.items()))}, indent=2))
    for n in ("config.json", "trainer.pt", MANIFEST, f"{DCP_DIR}/.metadata"):
        with open(tmp / n, "rb") as f:
            os.fsync(f.fileno())


def _raise_save_failure(run_dir: Path, step: int, failed: list, error: BaseException | None) -> None:
    """failed: (disk full?, message) per failure. A full disk is one line naming the intact checkpoint."""
    if error is not None and not any(full for full, _ in failed):
        raise error
    if not any(full for full, _ in failed):
        raise CheckpointError(f"step-{step} could not be written to '{run_dir}': {failed[0][1]}")
    good = latest_checkpoint(run_dir, warn=False)
    kept = f"the last good checkpoint {good.name} is intact" if good else "no earlier checkpoint exists"
    raise DynaformerError(f"the disk is full: step-{step} could not be written to '{run_dir}' and was not "
                          f"kept; {kept}. Free space and run again with --resume auto")


def save_dcp_checkpoint(run_dir: Path, step: int, tensors: dict[str, Any], config: dict[str, Any],
                        trainer_state: dict[str, Any], keep_last: int = 0) -> Path:
    """Every rank calls this with its own shards of `tensors`; each writes them in parallel (DCP), then rank 0
    writes config.json, trainer.pt and the manifest (every file's checksum, hashed by all ranks in turn) and
    renames the folder into place. Same rules as save_checkpoint: a verifying step-N is kept, a damaged one
    replaced, a full disk leaves the last good checkpoint intact."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    final = run_dir / f"step-{step}"
    keep, tmp = _dcp_target(run_dir, step, final)
    if keep:
        return final
    mine, error = _dcp_write_shards(tensors, tmp)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (mine, None if error is None else (is_disk_full(error), repr(error)[:300])))
    failed = [f for _, f in gathered if f is not None]
    if rank == 0 and not failed:
        try:
            _dcp_write_rank0_files(tmp, step, config, trainer_state, {k: v for m, _ in gathered for k, v in m.items()},
                                   world)
        except Exception as e:
            failed.append((is_disk_full(e), repr(e)[:300]))
    outcome: list[Any] = [failed]
    dist.broadcast_object_list(outcome, src=0)
    failed = outcome[0]
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # never visible; free its space
        _raise_save_failure(run_dir, step, failed, error)
    if rank == 0:
        _publish(run_dir, tmp, final, step, keep_last)
    dist.barrier()
    return final
