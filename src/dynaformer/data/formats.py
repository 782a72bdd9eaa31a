"""Corpora as people keep them: JSON Lines, Parquet and Hugging Face `datasets` folders (`save_to_disk`), read as
the texts of one field; plain text files as they are. Parquet and `datasets` need the [data] extra.

A record's text is one document; documents are joined by a blank line, as the files of a folder are joined by a
newline. Anything else is one error naming the file (and for a record, its line or row), never raw JSON trained
as text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DynaformerError
from ..extras import require
from ..resources import check_fits_in_memory

DOC_SEP = "\n\n"
# Files that hold no plain text: what to do instead.
_REFUSED = {".gz": "compressed: decompress it first", ".xz": "compressed: decompress it first",
            ".bz2": "compressed: decompress it first", ".zst": "compressed: decompress it first",
            ".zip": "an archive: unpack it first", ".tar": "an archive: unpack it first",
            ".arrow": "one shard of a datasets folder: pass the folder that `save_to_disk` wrote",
            ".json": "one JSON document: write one record per line as JSON Lines (.jsonl)",
            ".npy": "binary (numpy): not text", ".bin": "binary: not text", ".pt": "binary (torch): not text",
            ".safetensors": "binary (weights): not text"}


def file_kind(path: Path) -> str:
    """"jsonl", "parquet" or "text" by the file's suffix; a kind that holds no plain text is refused."""
    suffix = path.suffix.lower()
    if suffix in _REFUSED:
        raise DynaformerError(f"data: '{path}' is {_REFUSED[suffix]}")
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(suffix, "text")


def is_datasets_folder(path: Path) -> bool:
    """A folder that `datasets.Dataset.save_to_disk` (or `DatasetDict.save_to_disk`) wrote."""
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file())


def _size_check(paths: list[Path], what: str) -> None:
    # The text, its tokens (int64) and the token files' bytes: about 24 bytes per byte of input at most.
    check_fits_in_memory(24 * sum(p.stat().st_size for p in paths), f"data: reading {what}")


def jsonl_records(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line of a JSON Lines file; a missing, non-regular, too large
    or non-UTF-8 file, or a line that is not JSON, is one error naming it."""
    p = Path(path)
    if not p.exists():
        raise DynaformerError(f"data: '{p}' does not exist")
    if not p.is_file():
        raise DynaformerError(f"data: '{p}' is not a regular file")
    _size_check([p], f"'{p}'")
    try:
        with open(p, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line)
                except ValueError:
                    raise DynaformerError(f"data: '{p}' line {i} is not JSON") from None
    except UnicodeDecodeError:
        raise DynaformerError(f"data: '{p}' is not UTF-8 text") from None


def read_jsonl(path: Path, field: str) -> str:
    """The `field` of every line's object, joined as documents; a line without it, or not an object, is an error
    naming the line. Blank lines are skipped."""
    docs = []
    for i, rec in jsonl_records(path):
        if not isinstance(rec, dict) or not isinstance(rec.get(field), str):
            got = f"keys {sorted(rec)[:6]}" if isinstance(rec, dict) else type(rec).__name__
            raise DynaformerError(f"data: '{path}' line {i} has no text field '{field}' ({got}); choose the field "
                                  f"with --text_field")
        docs.append(rec[field])
    return _joined(docs, f"'{path}'")


def _column_texts(values: list, field: str, where: str) -> str:
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise DynaformerError(f"data: {where} row {bad} has no text in '{field}' (got {type(values[bad]).__name__})")
    return _joined(values, where)


def read_parquet(path: Path, field: str) -> str:
    require("pyarrow", "data")
    import pyarrow.parquet as pq

    _size_check([path], f"'{path}'")
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow's own error types: a damaged or foreign file
        raise DynaformerError(f"data: '{path}' is not a Parquet file ({type(e).__name__})") from None
    if field not in schema.names:
        raise DynaformerError(f"data: '{path}' has no column '{field}' (columns: {', '.join(schema.names[:8])}); "
                              f"choose the field with --text_field")
    return _column_texts(pq.read_table(path, columns=[field]).column(field).to_pylist(), field, f"'{path}'")


def read_datasets_folder(path: Path, field: str) -> str:
    """A `save_to_disk` folder: a Dataset, or a DatasetDict's `train` split (or its only split)."""
    require("datasets", "data")
    import datasets

    _size_check([p for p in path.rglob("*.arrow")], f"'{path}'")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises its own types for damaged folders
        raise DynaformerError(f"data: '{path}' is not a readable datasets folder ({type(e).__name__})") from None
    where = f"'{path}'"
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        name = "train" if "train" in ds else (splits[0] if len(splits) == 1 else None)
        if name is None:
            raise DynaformerError(f"data: '{path}' holds the splits {', '.join(splits)} and none is 'train'; save "
                                  f"the split to train on as its own folder")
        ds, where = ds[name], f"'{path}' (split {name})"
    if field not in ds.column_names:
        raise DynaformerError(f"data: {where} has no column '{field}' (columns: {', '.join(ds.column_names[:8])}); "
                              f"choose the field with --text_field")
    return _column_texts(ds[field], field, where)


def _joined(docs: list[str], where: str) -> str:
    text = DOC_SEP.join(d for d in docs if d)
    if not text:
        raise DynaformerError(f"data: {where} holds no text")
    return text
