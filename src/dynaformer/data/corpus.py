"""Text sources: a file, a folder of text files, or a built-in generated corpus (no download)."""

from __future__ import annotations

import hashlib
import lzma
import random
from functools import lru_cache
from pathlib import Path

from ..errors import DynaformerError
from ..resources import check_fits_in_memory
from .formats import file_kind, is_datasets_folder, read_datasets_folder, read_jsonl, read_parquet

BUILTIN_PREFIX = "builtin:"
# Packaged with dynaformer (data/corpora/README.md: source, licence), so `builtin:default` is the same bytes
# on every installation, whatever lies beside the checkout.
_CORPORA = Path(__file__).resolve().parent / "corpora"
_SHAKESPEARE_XZ = _CORPORA / "tinyshakespeare.txt.xz"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
BUILTINS = ("default", "shakespeare", "stories")


@lru_cache(maxsize=1)
def shakespeare() -> str:
    """tiny-shakespeare (1,115,394 characters), decompressed from the package and checked against its SHA-256."""
    try:
        raw = lzma.decompress(_SHAKESPEARE_XZ.read_bytes())
    except (OSError, lzma.LZMAError) as e:
        raise DynaformerError(f"data: the packaged corpus '{_SHAKESPEARE_XZ}' cannot be read ({e}); "
                              f"reinstall dynaformer") from None
    if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
        raise DynaformerError(f"data: the packaged corpus '{_SHAKESPEARE_XZ}' is damaged (checksum mismatch); "
                              f"reinstall dynaformer")
    return raw.decode("utf-8")

_NAMES = ["Ada", "Bruno", "Chiara", "Dev", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Lars"]
_PLACES = ["kitchen", "garden", "library", "harbour", "attic", "market", "station", "orchard", "cellar", "bridge"]
_THINGS = ["apple", "lantern", "letter", "key", "violin", "map", "kettle", "compass", "scarf", "coin"]
_VERBS_MOVE = ["went to", "walked to", "ran to", "travelled to", "returned to"]
_VERBS_TAKE = ["picked up", "took", "grabbed", "found"]
_VERBS_DROP = ["dropped", "left", "put down"]
_FILLER = ["The weather was mild.", "Nobody spoke for a while.", "A bell rang in the distance.",
           "The clock struck the hour.", "It began to rain.", "The wind turned cold."]


def generated_stories(n_chars: int, seed: int = 0) -> str:
    """Simple English stories with entities, places and objects: structured enough to learn
    (a model can track who holds what), varied enough not to be memorised in a few steps."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < n_chars:
        cast = rng.sample(_NAMES, 3)
        held: dict[str, str] = {}
        where: dict[str, str] = {}
        lines = []
        for _ in range(rng.randint(6, 14)):
            who = rng.choice(cast)
            r = rng.random()
            if r < 0.4:
                place = rng.choice(_PLACES)
                where[who] = place
                lines.append(f"{who} {rng.choice(_VERBS_MOVE)} the {place}.")
            elif r < 0.65:
                thing = rng.choice(_THINGS)
                held[who] = thing
                lines.append(f"{who} {rng.choice(_VERBS_TAKE)} the {thing}.")
            elif r < 0.8 and who in held:
                lines.append(f"{who} {rng.choice(_VERBS_DROP)} the {held.pop(who)}.")
            else:
                lines.append(rng.choice(_FILLER))
        who = rng.choice(cast)
        if who in where:
            lines.append(f"Where is {who}? In the {where[who]}.")
        elif who in held:
            lines.append(f"What does {who} hold? The {held[who]}.")
        story = " ".join(lines) + "\n\n"
        parts.append(story)
        total += len(story)
    return "".join(parts)[:n_chars]


def read_text(source: str, context_len: int | None = None, text_field: str = "text") -> tuple[str, str]:
    """Return (text, description) for a data source: a text FILE; a `.jsonl` or `.parquet` file or a `datasets`
    folder (`save_to_disk`), read as the `text_field` of every record (data/formats.py); a FOLDER of files of one
    kind (sorted, joined by newlines); `builtin:default` = `builtin:shakespeare` (the packaged
    tiny-shakespeare), `builtin:stories` (generated), or a `task:` spec (data/tasks.py: its `text=` source, or
    rendered task examples of length `len` or `context_len`)."""
    if source.startswith("task:"):
        from .tasks import check_task_data, parse_task_spec, render_text

        spec = parse_task_spec(source) if context_len is None else check_task_data(source, context_len)
        if spec.text is not None:
            text, desc = read_text(spec.text)
            return text, f"{source} (text: {desc})"
        length = spec.length or context_len or 256
        return render_text(spec, length, max(64, 200_000 // (length * len(spec.tasks)))), source
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name in ("default", "shakespeare"):
            return shakespeare(), f"{source} (tiny-shakespeare, packaged, 1,115,394 characters)"
        if name == "stories":
            return generated_stories(1_000_000), "builtin:stories (1,000,000 generated characters)"
        known = ", ".join(BUILTIN_PREFIX + b for b in BUILTINS)
        raise DynaformerError(f"data: unknown built-in source '{source}' (known: {known})")
    path = Path(source)
    if path.is_dir():
        if is_datasets_folder(path):
            return read_datasets_folder(path, text_field), f"{source} (datasets folder, field '{text_field}')"
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DynaformerError(f"data: folder '{source}' holds no files")
        kinds = {p: file_kind(p) for p in files}
        if len(set(kinds.values())) > 1:
            first = {k: p for p, k in reversed(kinds.items())}
            raise DynaformerError(f"data: folder '{source}' mixes kinds of files ("
                                  + ", ".join(f"{k}: {first[k].name}" for k in sorted(first))
                                  + "); give it files of one kind")
        texts = [_read_any(p, kinds[p], text_field) for p in files]
        return "\n".join(texts), f"{source} ({len(files)} files)"
    if not path.exists():
        raise DynaformerError(f"data: '{source}' does not exist")
    kind = file_kind(path)
    return _read_any(path, kind, text_field), str(path) + (f" (field '{text_field}')" if kind != "text" else "")


def _read_any(path: Path, kind: str, text_field: str) -> str:
    if not path.is_file():
        raise DynaformerError(f"data: '{path}' is not a regular file")
    if kind == "jsonl":
        return read_jsonl(path, text_field)
    if kind == "parquet":
        return read_parquet(path, text_field)
    return _read_file(path)


def _read_file(path: Path) -> str:
    if not path.is_file():  # a device such as /dev/zero or a FIFO can be endless
        raise DynaformerError(f"data: '{path}' is not a regular file")
    # The text, its tokens (int64) and the token files' bytes: about 24 bytes per byte of text at most.
    check_fits_in_memory(24 * path.stat().st_size, f"data: reading '{path}'")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DynaformerError(f"data: '{path}' is not UTF-8 text") from None
    except OSError as e:
        raise DynaformerError(f"data: cannot read '{path}': {e.strerror}") from None
    if not text:
        raise DynaformerError(f"data: '{path}' is empty")
    return text
