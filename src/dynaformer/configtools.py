"""Strict dataclass configs: unknown keys, wrong types and bad values are errors that name the field.

Every config in the project (model, training, fine-tuning, a grid's settings) is a dataclass; this module turns
dicts (YAML, JSON, CLI overrides) into them and back, with type coercion from the annotations. A field whose
type is a dataclass is a section (`FinetuneConfig.train`): read from a mapping that sets some of its fields,
the rest keep the section's default.

`first_difference` is the one answer to "is this the same run?": a run folder, a fine-tuning folder and a grid
cell each compare the config record they wrote with the one about to run through it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import types
import typing
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from .errors import ConfigError, DynaformerError

T = TypeVar("T")


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert `value` (possibly a string from the command line) to type `tp`, or raise ConfigError."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        for a in args:
            if a is type(None):
                continue
            with contextlib.suppress(ConfigError):  # the next member type may take it
                return coerce(value, a, name)
        raise ConfigError(f"{name}: expected {_describe(tp)}, got {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{name}: expected one of {', '.join(map(str, choices))}; got {value!r}")
    if origin is dict or tp is dict:  # a mapping of overrides, its values kept as written
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        args = get_args(tp)
        return {str(k): coerce(v, args[1], f"{name}.{k}") if args else v for k, v in value.items()}
    if origin in (list, tuple):
        (inner, *_) = get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        out = [coerce(v, inner, name) if inner is not Any else v for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if tp is int:
        out = _coerce_int(value, name)
        if not -(2**63) <= out < 2**63:  # every integer setting is a count, a size or a seed
            raise ConfigError(f"{name}: {value!r} is out of range (a 64-bit integer)")
        return out
    if tp is float:
        out = _coerce_float(value, name)
        if not math.isfinite(out):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name}: expected a string, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, name)
    raise ConfigError(f"{name}: unsupported field type {tp}")


def _coerce_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            try:
                f = float(value)
            except ValueError:
                f = None
            if f is not None and f.is_integer():
                return int(f)
    raise ConfigError(f"{name}: expected an integer, got {value!r}")


def _coerce_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{name}: expected a number, got {value!r}")


def field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: dict[str, Any], section: str = "") -> T:
    """Build dataclass `cls` from `data`; unknown keys and bad values raise ConfigError naming them."""
    if not isinstance(data, dict):
        raise ConfigError(f"{section or cls.__name__}: expected a mapping, got {type(data).__name__}")
    types_ = field_types(cls)
    prefix = f"{section}." if section else ""
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(types_))})")
    defaults = field_defaults(cls)
    kwargs = {}
    for k, v in data.items():
        if dataclasses.is_dataclass(types_[k]) and isinstance(v, dict) and k in defaults:
            v = {**to_dict(defaults[k]), **v}  # a section given in part: the rest keep the section's default
        kwargs[k] = coerce(v, types_[k], prefix + k)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def field_defaults(cls: type) -> dict[str, Any]:
    """Each field's default value (a new object for fields with a default factory); fields without one are left
    out."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def to_dict(obj: Any) -> dict[str, Any]:
    """A config as JSON-ready data: sections become mappings, tuples lists."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return [plain(x) for x in v] if isinstance(v, list | tuple) else v

    return plain(dataclasses.asdict(obj))


def replace(obj: T, **changes: Any) -> T:
    """dataclasses.replace with coercion and validation."""
    return from_dict(type(obj), {**to_dict(obj), **changes})


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file that must hold a mapping; unreadable or malformed files are one-line user errors."""
    # Imported by name: this module ships inside exported model folders (hf/bundle.py), whose users need not
    # have PyYAML, and transformers refuses remote code with an import statement of a missing package.
    yaml = importlib.import_module("yaml")

    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise DynaformerError(f"{what}: cannot read '{path}': {e.strerror}") from None
    except UnicodeDecodeError:
        raise DynaformerError(f"{what}: '{path}' is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise DynaformerError(f"{what}: '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what}: '{path}' must hold a mapping")
    return raw


def first_difference(old: Mapping[str, Any], new: Mapping[str, Any], defaults: Mapping[str, Mapping[str, Any]],
                     may_change: Mapping[str, Collection[str]] | None = None,
                     same: Callable[[str, Any, Any], bool] | None = None) -> str | None:
    """Whether `old` (the record a folder holds of the run it was made for) and `new` (the record of the run about
    to use it) describe the same run: None when they do, else the first difference, "section.field: OLD in the
    folder, NEW now".

    Keys named in `defaults` are config sections compared field by field: a field missing from `old` was added by
    a newer dynaformer and counts as equal when the new value is its default (folders survive an upgrade that adds
    fields without changing what runs); fields in `may_change[section]` may differ (where and how a run is
    continued, not what it computes). Other keys compare whole. `same(field, a, b)` replaces == for fields
    (run folders compare paths by where they lead)."""
    may_change = may_change or {}
    same = same or (lambda _key, a, b: a == b)
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key not in defaults:
            if a != b:
                return f"{key}: {a!r} in the folder, {b!r} now"
            continue
        a, b, skip = a or {}, b or {}, set(may_change.get(key, ()))
        for name in sorted((set(a) | set(b)) - skip):
            if name not in a and b.get(name) == defaults[key].get(name):
                continue
            if not same(name, a.get(name), b.get(name)):
                return f"{key}.{name}: {a.get(name)!r} in the folder, {b.get(name)!r} now"
    return None
