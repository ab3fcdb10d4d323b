"""Typed loading of `params.yaml` sections into stage dataclasses, and the whole-file check.

Every stage owns a dataclass that mirrors its section of params.yaml.
`load_section(Config, "data")` reads the file, checks every key and type
against the dataclass (recursively, for nested dataclasses, lists, dicts,
Optionals and Literals) and raises `ParamsError` naming every offending key
*before* the stage does any work.

Check a whole file (every section on its own, every `runs.*` and every ablation
variant after merging) in well under a second, before a long study:

    python -m pipeline.params check [params.yaml]

It prints one line per problem, naming its key path, and exits 1 if there is any.
Every stage runs the same checks of the sections it reads at start-up (`validate`).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import re
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

PARAMS_FILE = "params.yaml"
T = TypeVar("T")


class ParamsError(ValueError):
    """params.yaml problems: each names its key path; `str()` puts one per line."""

    def __init__(self, *problems: str):
        self.problems = [str(p) for p in problems] or ["invalid params"]
        super().__init__("\n".join(self.problems))


MERGED = " (after merging "


def merged(where: str, e: ParamsError) -> ParamsError:
    """`e` raised while checking a merged config (`runs.<run>`, an ablation variant): every
    line says which merge it came from. `check` drops a line whose problem is already
    reported by a section on its own (a bad base value is one problem, not one per run)."""
    return ParamsError(*(f"{p}{MERGED}{where})" for p in e.problems))


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    """The whole params file as a dict (an empty file is an error)."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: file not found (run from the repository root)")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ParamsError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _each(items: list[tuple[Any, Callable[[], Any]]]) -> list[Any]:
    """Run every thunk; collect all their problems instead of stopping at the first."""
    out, problems = [], []
    for _, thunk in items:
        try:
            out.append(thunk())
        except ParamsError as e:
            problems.extend(e.problems)
    if problems:
        raise ParamsError(*problems)
    return out


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
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ParamsError:
                pass
        raise ParamsError(f"{key}: {value!r} does not match {' | '.join(_type_name(a) for a in args)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return build(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        out = _each([(i, functools.partial(_convert, v, inner, f"{key}[{i}]")) for i, v in enumerate(value)])
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        keys = _each([(k, functools.partial(_convert, k, kt, key)) for k in value])
        vals = _each([(k, functools.partial(_convert, v, vt, f"{key}.{k}")) for k, v in value.items()])
        return dict(zip(keys, vals))
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


_KEY_PATH = re.compile(r"[A-Za-z_][\w-]*(?:\.[\w-]+)*")


def _at(prefix: str, message: str, fields: Iterable[str]) -> str:
    """A dataclass's own error `message` with its key path made absolute under `prefix`:
    ('model', 'n_embd=30: ...') -> 'model.n_embd=30: ...'; ('model.attention',
    'attention.kernel=...') -> 'model.attention.kernel=...'; else 'prefix: message'."""
    if not prefix:
        return message
    m = _KEY_PATH.match(message)
    if m and message[m.end():m.end() + 1] in ("=", ":", " ", ",", "["):
        path, rest = m.group(0), message[m.end():]
        head = path.split(".", 1)[0]
        if path == prefix or path.startswith(prefix + "."):
            return message
        if "." in path and head == prefix.rsplit(".", 1)[-1]:
            return prefix + path[len(head):] + rest
        if head in fields:
            return f"{prefix}.{message}"
    return f"{prefix}: {message}"


def _unknown(key: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    return f"unknown key ({hint})"


def build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    """Build dataclass `cls` from `data`, naming `prefix.key` in every error.

    Unknown keys are errors (a typo must not silently fall back to a default);
    missing keys take the dataclass default, or are errors where there is none.
    Every bad key is reported (one ParamsError, one line each); the dataclass's own
    `__post_init__` checks run once the keys are fine, and their ValueError becomes a
    ParamsError naming the key path.
    """
    if not isinstance(data, dict):
        raise ParamsError(f"{prefix}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    problems = [f"{prefix}.{k}: {_unknown(k, fields)}" for k in data if k not in fields]
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name in data:
            try:
                kwargs[name] = _convert(data[name], hints[name], key)
            except ParamsError as e:
                problems.extend(e.problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"{key}: missing (required, {_type_name(hints[name])})")
    if problems:
        raise ParamsError(*problems)
    try:
        return cls(**kwargs)
    except ParamsError as e:
        raise ParamsError(*(_at(prefix, p, fields) for p in e.problems)) from e
    except (ValueError, TypeError) as e:
        raise ParamsError(_at(prefix, str(e), fields)) from e


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


# --------------------------------------------------------------------------- checks

Check = Callable[[dict[str, Any]], object]
"""Validates the sections of a params dict it owns; raises ParamsError naming every problem."""

# The modules that own params.yaml's sections: each has `SECTIONS` (the top-level keys it
# owns) and `check_params(params)`. Named, not imported: the stages import this module, so it
# imports them only inside the `check` command (a stage's schema lives beside its code).
SCHEMA_MODULES = ("stages.data_config", "pipeline.tracking", "stages.pretrain.config",
                  "stages.ablate", "stages.report.config")


def check_seed(params: dict[str, Any]) -> int:
    """The shared `seed` (default 0)."""
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ParamsError(f"seed: expected an integer, got {type(seed).__name__} {seed!r}")
    return seed


def check_seeds(params: dict[str, Any]) -> list[int]:
    """The model seeds `seeds`: every pretrain run and every ablation variant is trained once
    per seed, and the report's intervals are over them (default: [seed])."""
    seeds = params.get("seeds", [check_seed(params)])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ParamsError(f"seeds: expected a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ParamsError(f"seeds={seeds}: must not repeat")
    return seeds


def attempt(found: list[str], fn: Callable[..., T], *args: Any) -> T | None:
    """`fn(*args)`, or None with its problems appended to `found`, unless already there (the
    same problem, e.g. a bad base value seen again after merging each run, is one line)."""
    try:
        return fn(*args)
    except ParamsError as e:
        seen = {p.split(MERGED, 1)[0] for p in found}
        for p in e.problems:
            if p.split(MERGED, 1)[0] not in seen:
                found.append(p)
                seen.add(p.split(MERGED, 1)[0])
        return None


def problems(params: dict[str, Any], checks: Iterable[Check]) -> list[str]:
    """Every problem the checks find in `params`, one line each, in order (see `attempt`)."""
    found: list[str] = []
    for check in checks:
        attempt(found, check, params)
    return found


def validate(params: dict[str, Any], checks: Iterable[Check]) -> None:
    """Run `checks`; raise one ParamsError listing every problem. A stage calls this at
    start-up, with the checks of the sections it reads, before touching any data."""
    found = problems(params, checks)
    if found:
        raise ParamsError(*found)


def check_file(path: str | Path = PARAMS_FILE) -> list[str]:
    """Every problem of a whole params file: unknown sections, every section on its own,
    every run and every ablation variant after merging (the `check` command)."""
    try:
        params = read_params(path)
    except ParamsError as e:
        return e.problems
    modules = [importlib.import_module(name) for name in SCHEMA_MODULES]
    owned = {"seed", "seeds", *(s for m in modules for s in m.SECTIONS)}
    found = [f"{k}: unknown section (known: {', '.join(sorted(owned))})" for k in params if k not in owned]
    found += problems(params, [check_seed, check_seeds, *(m.check_params for m in modules)])
    order = {key: i for i, key in enumerate(params)}

    def section(problem: str) -> str:  # where a merged problem was merged, else its own key
        where = problem.split(MERGED, 1)[1] if MERGED in problem else problem
        return re.split(r"[.:=\[ ]", where, maxsplit=1)[0]
    return sorted(found, key=lambda p: order.get(section(p), len(order)))  # in the file's order


def fail(stage: str, error: BaseException) -> None:
    """Exit the stage's process with `<stage>: error: <line>` for every line of `error`."""
    sys.exit("\n".join(f"{stage}: error: {line}" for line in str(error).splitlines() or [""]))


def _skip_package_init(name: str) -> None:
    """Make package `name` importable without running its __init__. The check command needs
    only model/config.py (pure Python); model/__init__.py imports torch, ~1 s."""
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = package


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.params",
                                 description="Check a params file before running the pipeline.")
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="check every section, run and ablation variant; exit 1 "
                           "on any problem (one line each, naming the key path)")
    check.add_argument("path", nargs="?", default=PARAMS_FILE, help="default: %(default)s")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    _skip_package_init("model")
    found = check_file(args.path)
    for p in found:
        print(f"{args.path}: {p}")
    seconds = time.perf_counter() - t0
    if found:
        print(f"{args.path}: {len(found)} problem{'s' if len(found) != 1 else ''} ({seconds:.2f} s)")
        return 1
    print(f"{args.path}: ok ({seconds:.2f} s)")
    return 0


__all__ = ["ParamsError", "read_params", "build", "load_section", "deep_merge", "to_dict", "flatten",
           "merged", "attempt", "check_seed", "check_seeds", "problems", "validate", "check_file", "fail", "PARAMS_FILE"]

if __name__ == "__main__":
    # Through the package, not this __main__ copy: the stages raise pipeline.params.ParamsError.
    from pipeline.params import main as _main
    sys.exit(_main())
