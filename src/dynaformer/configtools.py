"""Strict dataclass configs: unknown keys, wrong types and bad values are errors that name the field.

Every config in the project (model, training, generation) is a dataclass; this module turns dicts
(YAML, JSON, CLI overrides) into them and back, with type coercion from the annotations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import math
import types
import typing
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
    kwargs = {k: coerce(v, types_[k], prefix + k) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def to_dict(obj: Any) -> dict[str, Any]:
    d = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


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
