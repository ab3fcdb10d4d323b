"""Typed loading of `params.yaml` sections into stage dataclasses.

Every stage owns a dataclass that mirrors its section of params.yaml.
`load_section(Config, "data")` reads the file, checks every key and type
against the dataclass (recursively, for nested dataclasses, lists, dicts,
Optionals and Literals) and raises `ParamsError` naming the offending key
*before* the stage does any work.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params.yaml key is unknown, missing or of the wrong type."""


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict (an empty file is an error)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found (run from the repository root)")
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (nested dataclasses built)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ParamsError(f"{key}: {value!r} is not allowed (must be one of {', '.join(map(str, allowed))})")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ParamsError as e:
                errors.append(str(e))
        raise ParamsError(f"{key}: {value!r} does not match {' | '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        out = [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, key): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ParamsError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from `data`, naming `prefix.key` in every error.

    Unknown keys are errors (a typo must not silently fall back to a default);
    missing keys take the dataclass default, or are errors where there is none.
    A ValueError from the dataclass's own `__post_init__` is re-raised as a
    ParamsError with the prefix attached.
    """
    if not isinstance(data, dict):
        raise ParamsError(f"{prefix}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{prefix}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{key}: missing (required, {_type_name(hints[name])})")
    try:
        return cls(**kwargs)
    except ParamsError:
        raise
    except (ValueError, TypeError) as e:
        raise ParamsError(f"{prefix}: {e}") from e


def load_section(cls: type, section: str, path: str | Path = PARAMS_FILE,
                 params: dict[str, Any] | None = None) -> Any:
    """Load `params[section]` into `cls`; `params` defaults to reading `path`."""
    params = read_params(path) if params is None else params
    if section not in params:
        raise ParamsError(f"{section}: section missing from {path}")
    return build(cls, params[section], section)


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of `base` with `override` merged in, recursively for nested mappings."""
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain dicts/lists, for JSON and MLflow."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: the form MLflow params and reports use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{sep}{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(flatten(v, key, sep))
        else:
            out[key] = v
    return out


__all__ = ["ParamsError", "read_params", "build", "load_section", "deep_merge", "to_dict", "flatten",
           "PARAMS_FILE"]
