"""The run folder: a self-describing record of one training run.

    run_dir/
      run.json          model + train config, tokenizer, data summary, environment
      tokenizer.json
      data/             train.bin, val.bin (token memmaps), meta.json
      metrics.jsonl     one JSON object per log/eval step
      step-N/           checkpoints (see checkpoint.py)

Nothing in an existing run folder is overwritten unless the user asks to resume the same run.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configtools import first_difference, to_dict
from ..data import ByteTokenizer, CharTokenizer, load_tokenizer, open_splits, read_text, save_tokenizer, write_splits
from ..data.dataset import TokenSplits
from ..errors import DynaformerError
from ..files import write_json_atomic
from ..model import ModelConfig
from .config import RESUMABLE_CHANGES, TrainConfig, check_compatible
from .device import Precision, resolve_device, resolve_precision


@dataclass
class Run:
    dir: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    tokenizer: ByteTokenizer | CharTokenizer
    splits: TokenSplits | None  # None for a fine-tuning run (its examples are not token files)
    resumed: bool
    precision: Precision | None = None  # train.dtype resolved on this machine (None: the trainer resolves it)


def model_vocab_size(tokenizer, train_cfg: TrainConfig) -> int:
    """The tokenizer's vocabulary, plus one [MASK] id (= tokenizer.vocab_size) for masked-LM."""
    return tokenizer.vocab_size + (1 if train_cfg.objective == "mlm" else 0)


_PATH_FIELDS = ("data", "tokenizer_file")  # a relative and an absolute path to one file name the same run


def _real_path(value: str) -> str:
    """The resolved path of a file or folder argument; other sources (builtin:…, task:…) as written."""
    return os.path.realpath(value) if value and os.path.exists(value) else value


def identity(model_cfg: ModelConfig, train_cfg: TrainConfig, precision: Precision) -> dict:
    """The fields that define a run's results (what must match to resume it). dtype is the resolved one: `auto`
    that picks fp32 here names the same run as `fp32`, and a machine where it picks bf16 does not."""
    train = {k: v for k, v in to_dict(train_cfg).items() if k not in RESUMABLE_CHANGES}
    train["dtype"] = precision.dtype
    for key in _PATH_FIELDS:
        train[key] = _real_path(train[key])
    return {"model": to_dict(model_cfg), "train": train}


def _precision(train_cfg: TrainConfig) -> Precision:
    return resolve_precision(train_cfg.dtype, resolve_device(train_cfg.device))


def _same(key: str, a, b) -> bool:
    if a == b:
        return True
    # Folders written before paths were resolved hold the literal argument.
    return key in _PATH_FIELDS and isinstance(a, str) and isinstance(b, str) and _real_path(a) == _real_path(b)


def _first_difference(old: dict, new: dict) -> str | None:
    """The first field in which the folder's run identity `old` differs from `new` (configtools.first_difference),
    the fields a resumed run may change left out."""
    return first_difference(old, new, {"model": to_dict(ModelConfig()), "train": to_dict(TrainConfig())},
                            may_change={"train": RESUMABLE_CHANGES}, same=_same)


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    from .. import __version__

    return {"dynaformer": __version__, "git_commit": commit, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def load_run_json(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        raise DynaformerError(f"'{run_dir}' is not a dynaformer run folder (no readable run.json)") from None


# What a run folder holds before run.json is written: a crash then leaves only these, and the
# next attempt may start the folder again.
_SETUP_FILES = {"data", "tokenizer.json", ".lock"}  # .lock: the trainer's (locks.py)


def _setup_only(entries: set[str]) -> bool:
    """Only what a setup leaves before run.json exists (run.json's temporary included: files.py)."""
    return all(e in _SETUP_FILES or e.startswith(".run.json.tmp") for e in entries)


def open_run(model_cfg: ModelConfig, train_cfg: TrainConfig, attach: bool = False) -> Run:
    """Create a new run folder, or reopen an existing one when resuming the same run.
    attach=True: open the folder another process (rank 0) has just set up, without checks."""
    run_dir = Path(train_cfg.out)
    check_compatible(model_cfg.causal, train_cfg.objective, model_cfg.context_len, train_cfg.short_context)
    if attach:
        tokenizer = load_tokenizer(run_dir / "tokenizer.json")
        model_cfg.vocab_size = model_vocab_size(tokenizer, train_cfg)
        return Run(run_dir, model_cfg, train_cfg, tokenizer, open_splits(run_dir / "data"),
                   resumed=train_cfg.resume != "none", precision=_precision(train_cfg))
    if run_dir.exists() and not run_dir.is_dir():
        raise DynaformerError(f"run folder '{run_dir}' exists and is not a folder")
    entries = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    # An interrupted setup (no run.json, only setup files) holds nothing of value: start it again.
    if entries and not (_setup_only(entries) and not (run_dir / "run.json").is_file()):
        return _reopen_run(run_dir, model_cfg, train_cfg)
    return _create_run(run_dir, model_cfg, train_cfg)


def _reopen_run(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> Run:
    """An existing folder: resumed when it holds this very run and resuming was asked for; an error otherwise."""
    if not (run_dir / "run.json").is_file():
        raise DynaformerError(f"'{run_dir}' exists and is not a dynaformer run folder; choose another --out")
    info = load_run_json(run_dir)
    tokenizer = load_tokenizer(run_dir / "tokenizer.json")
    model_cfg.vocab_size = model_vocab_size(tokenizer, train_cfg)
    precision = _precision(train_cfg)
    diff = _first_difference(info.get("identity", {}), identity(model_cfg, train_cfg, precision))
    if train_cfg.resume == "none":
        if diff:
            raise DynaformerError(f"run folder '{run_dir}' holds a run with a different config ({diff}); "
                                  f"choose another --out")
        raise DynaformerError(f"run folder '{run_dir}' already holds this run; pass --resume auto to continue "
                              f"it, or choose another --out")
    if diff:
        raise DynaformerError(f"cannot resume '{run_dir}': the config differs ({diff})")
    if train_cfg.tokenizer == "bpe":
        from ..data.bpe import load_bpe_file

        if load_bpe_file(train_cfg.tokenizer_file).to_dict() != tokenizer.to_dict():
            raise DynaformerError(f"cannot resume '{run_dir}': tokenizer file '{train_cfg.tokenizer_file}' "
                                  f"does not match the run's tokenizer (its tokenizer.json)")
    return Run(run_dir, model_cfg, train_cfg, tokenizer, open_splits(run_dir / "data"), resumed=True,
               precision=precision)


def _create_run(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> Run:
    """A new folder: tokenizer, token files, then run.json last (its presence marks a finished setup)."""
    precision = _precision(train_cfg)  # before anything is written: bf16 where it cannot run is an error
    text, source = read_text(train_cfg.data, model_cfg.context_len, train_cfg.text_field)
    if train_cfg.tokenizer == "bpe":
        from ..data.bpe import load_bpe_file

        tokenizer = load_bpe_file(train_cfg.tokenizer_file)
    else:
        tokenizer = CharTokenizer.fit(text) if train_cfg.tokenizer == "char" else ByteTokenizer()
    vocab = model_vocab_size(tokenizer, train_cfg)
    if model_cfg.vocab_size not in (vocab, ModelConfig().vocab_size):  # set by the user, and not what it will be
        print(f"warning: --vocab_size {model_cfg.vocab_size} is not used: the {tokenizer.kind} tokenizer gives "
              f"this model {vocab} tokens", file=sys.stderr)
    model_cfg.vocab_size = vocab
    n_tokens = len(tokenizer.encode_array(text))
    n_val = int(round(n_tokens * train_cfg.val_fraction))
    need = model_cfg.context_len + 2
    if n_tokens - n_val < need or n_val < need - 1:
        raise DynaformerError(
            f"data: '{train_cfg.data}' gives {n_tokens} tokens ({n_tokens - n_val} train, {n_val} validation); "
            f"each split needs at least one window of context_len + 1 = {model_cfg.context_len + 1} tokens")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, run_dir / "tokenizer.json")
    splits = write_splits(text, tokenizer, run_dir / "data", train_cfg.val_fraction, source)
    info = {"identity": identity(model_cfg, train_cfg, precision), "model": to_dict(model_cfg),
            "train": to_dict(train_cfg), "precision": precision.to_dict(),
            "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "data": splits.meta,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "env": environment()}
    write_json_atomic(run_dir / "run.json", info, ensure_ascii=False)
    return Run(run_dir, model_cfg, train_cfg, tokenizer, splits, resumed=False, precision=precision)


@contextlib.contextmanager
def locked_run(model_cfg: ModelConfig, train_cfg: TrainConfig, dist) -> Iterator[Run]:
    """The run folder for one training process or every rank of a torchrun job: rank 0 holds the folder's lock
    (one writer per folder) for the block and creates or checks the folder; the other ranks attach once it exists."""
    from ..locks import exclusive
    from .distributed import barrier

    with exclusive(Path(train_cfg.out), "run folder") if dist.is_main else contextlib.nullcontext():
        run = open_run(model_cfg, train_cfg) if dist.is_main else None
        barrier(dist)
        yield run or open_run(model_cfg, train_cfg, attach=True)
