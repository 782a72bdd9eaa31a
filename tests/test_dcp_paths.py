"""A DCP checkpoint never makes dynaformer read outside its own folder: shard paths in `.metadata` that are
absolute, climb with '..', or leave through a symlink are refused before any read, the step counts as damaged,
and readers fall back to the previous good step."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaformer.errors import CheckpointError
from dynaformer.files import sha256_file
from dynaformer.train.checkpoint import (
    DCP_DIR,
    FORMAT,
    MANIFEST,
    latest_checkpoint,
    read_model_tensors,
    verify_checkpoint,
)

TENSORS = {"w": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.ones(5)}


def _rehash(ckpt: Path) -> None:
    """A manifest that matches the files again: the forgery verifies by checksum."""
    files = {str(p.relative_to(ckpt)): sha256_file(p) for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    (ckpt / MANIFEST).write_text(json.dumps({"format": FORMAT, "layout": "dcp", "step": int(ckpt.name[5:]),
                                             "world": 1, "files": files}))


def _dcp_step(run: Path, step: int) -> Path:
    import torch.distributed.checkpoint as dcp

    ckpt = run / f"step-{step}"
    (ckpt / DCP_DIR).mkdir(parents=True)
    dcp.save({"model": {k: v.clone() for k, v in TENSORS.items()}},
             storage_writer=dcp.FileSystemWriter(ckpt / DCP_DIR), no_dist=True)
    (ckpt / "config.json").write_text("{}")
    torch.save({"step": step}, ckpt / "trainer.pt")
    _rehash(ckpt)
    return ckpt


def _forge(ckpt: Path, path_for) -> None:
    """Rewrite every shard path of .metadata through path_for(old) and fix the manifest."""
    meta_file = ckpt / DCP_DIR / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())  # noqa: S301 (our own file, in a test)
    meta.storage_data = {k: dataclasses.replace(v, relative_path=path_for(v.relative_path))
                         for k, v in meta.storage_data.items()}
    meta_file.write_bytes(pickle.dumps(meta))
    _rehash(ckpt)


def test_a_sound_dcp_step_reads(tmp_path):
    ckpt = _dcp_step(tmp_path, 1)
    verify_checkpoint(ckpt)
    got = read_model_tensors(ckpt)
    assert all(torch.equal(got[k], TENSORS[k]) for k in TENSORS)


@pytest.mark.parametrize("how", ["parent", "absolute", "symlink"])
def test_shards_outside_the_folder_are_refused_and_readers_fall_back(tmp_path, how, capsys):
    run = tmp_path / "run"
    good = _dcp_step(run, 1)
    bad = _dcp_step(run, 2)
    # The outside file holds the real shard's bytes, so a reader that followed the path would succeed.
    shard = next(p for p in (bad / DCP_DIR).iterdir() if p.suffix == ".distcp")
    outside = tmp_path / "outside.distcp"
    outside.write_bytes(shard.read_bytes())
    if how == "parent":
        _forge(bad, lambda rel: "../../../outside.distcp")
    elif how == "absolute":
        _forge(bad, lambda rel: str(outside))
    else:
        shard.unlink()
        os.symlink(outside, shard)
        _rehash(bad)
    with pytest.raises(CheckpointError, match="outside its folder"):
        verify_checkpoint(bad)
    with pytest.raises(CheckpointError, match="outside its folder"):
        read_model_tensors(bad)
    assert latest_checkpoint(run) == good
    assert "skipping" in capsys.readouterr().err


def test_bad_offsets_are_refused(tmp_path):
    ckpt = _dcp_step(tmp_path, 1)
    meta_file = ckpt / DCP_DIR / ".metadata"
    meta = pickle.loads(meta_file.read_bytes())  # noqa: S301
    meta.storage_data = {k: dataclasses.replace(v, offset=-8) for k, v in meta.storage_data.items()}
    meta_file.write_bytes(pickle.dumps(meta))
    _rehash(ckpt)
    with pytest.raises(CheckpointError, match="bad offset"):
        verify_checkpoint(ckpt)


_SEGMENT = st.sampled_from(["..", ".", "", "a", "__0_0.distcp", "dcp", "x..y", "..x", "/", "\\", "\x00"])


@settings(max_examples=60, deadline=None)
@given(parts=st.lists(_SEGMENT, min_size=1, max_size=5), absolute=st.booleans())
def test_any_shard_path_either_stays_inside_or_is_refused(tmp_path_factory, parts, absolute):
    """Random shard paths: verification either refuses the step with one CheckpointError, or every path it
    accepted resolves inside the checkpoint's dcp folder."""
    run = tmp_path_factory.mktemp("prop")
    ckpt = _dcp_step(run, 1)
    rel = ("/" if absolute else "") + "/".join(parts)
    _forge(ckpt, lambda old: rel)
    root = (ckpt / DCP_DIR).resolve()
    try:
        verify_checkpoint(ckpt)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    target = (root / rel).resolve()
    assert target != root and target.is_relative_to(root) and not rel.startswith("/") and ".." not in rel.split("/")
