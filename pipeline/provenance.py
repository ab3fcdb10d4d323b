"""Where a stage run came from: git state, DVC dependency hashes, data manifests.

Everything here is read-only and best-effort: a missing git repo, DVC repo,
`dvc.lock` or manifest gives `None`/`{}` (never an exception), because
provenance is recorded *about* a run and must never stop one.

DVC hashes and timing. `dvc repro` writes a stage's `dvc.lock` entry only
*after* the stage's command has finished, so while a stage runs its lock
entry (if any) describes the previous completed run, not this one.
`stage_hashes` therefore asks DVC itself for the current hashes of the stage's
deps when the process runs under DVC (`DVC_STAGE` is set): these are exactly
the values the lock entry will hold once the stage completes, and they come
from DVC's state cache (DVC hashed the deps a moment ago to decide the stage
had to run), so this costs well under a second. Outside DVC, or if that
fails, the `dvc.lock` entry is used where present. The tag
`dvc.hashes_from` says which (`workspace` or `dvc.lock`).

Stage names are DVC addresses: `download`, `pretrain@baseline` (`foreach`),
`ablate@gaussian-0` (`matrix`), or `sub/dvc.yaml:name` for a stage defined
in another folder's dvc.yaml (its lock file sits beside that dvc.yaml).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from pipeline.io import sha256_file

log = logging.getLogger(__name__)

# MLflow tag keys may hold alphanumerics, `_ - . / ` and spaces, up to 250 chars.
_TAG_KEY_BAD = re.compile(r"[^A-Za-z0-9_\-./ ]")


# Pipeline outputs that git tracks (cache: false in dvc.yaml): a run rewrites them, so they
# say nothing about whether the code and params match the commit.
OUTPUT_PATHS = ("metrics", "reports", "dvc.lock")


def git_state(root: str | Path = ".") -> dict[str, Any]:
    """{'commit': <sha or None>, 'dirty': <bool or None>, 'changed': <int or None>} of the git
    repo at `root`: the one answer MLflow's tags and the report's provenance both give.

    Dirty means tracked files other than the pipeline's own outputs (OUTPUT_PATHS) differ
    from HEAD; `changed` counts them. Untracked files don't count: DVC outputs and scratch
    folders are git-ignored or untracked by design.
    """
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None, "changed": None}
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 *(f":(exclude){p}" for p in OUTPUT_PATHS))
    if status is None:
        return {"commit": commit, "dirty": None, "changed": None}
    changed = len([ln for ln in status.splitlines() if ln.strip()])
    return {"commit": commit, "dirty": changed > 0, "changed": changed}


def _split_address(stage: str, root: Path) -> tuple[Path, str]:
    """'sub/dvc.yaml:name' -> (root/sub/dvc.lock, 'name'); 'name' -> (root/dvc.lock, 'name')."""
    if ":" in stage:
        dvcfile, name = stage.rsplit(":", 1)
        return (root / dvcfile).with_suffix(".lock"), name
    return root / "dvc.lock", stage


def lock_entry(stage: str, root: str | Path = ".") -> dict[str, Any] | None:
    """The `dvc.lock` entry of `stage` (e.g. 'pretrain@baseline'), or None if absent.

    DVC writes `foreach`/`matrix` items into the lock under their full
    `name@key` address, so a plain dict lookup finds them.
    """
    lock_path, name = _split_address(stage, Path(root))
    if not lock_path.is_file():
        return None
    try:
        # libyaml's loader: dvc.lock of a full ablation grid takes ~1 s in pure Python,
        # paid by every stage run at start-up.
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        lock = yaml.load(lock_path.read_text(encoding="utf-8"), Loader=loader) or {}
    except (OSError, yaml.YAMLError) as e:
        log.warning("could not read %s: %s", lock_path, e)
        return None
    entry = (lock.get("stages") or {}).get(name)
    return entry if isinstance(entry, dict) else None


def params_sha256(values: Any) -> str:
    """sha256 of a params mapping in canonical JSON (key order does not matter)."""
    blob = json.dumps(values, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def hashes_from_lock(entry: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{'deps': {path: md5}, 'params': {file: sha256}} of a `dvc.lock` entry."""
    deps = {}
    for dep in entry.get("deps") or []:
        value = dep.get("md5") or dep.get(dep.get("hash", ""), None) or dep.get("etag")
        if dep.get("path") and value:
            deps[str(dep["path"])] = str(value)
    params = {str(f): params_sha256(v) for f, v in (entry.get("params") or {}).items()}
    return {"deps": deps, "params": params}


def hashes_from_workspace(stage: str, root: str | Path = ".") -> dict[str, dict[str, str]]:
    """The same mapping as `hashes_from_lock`, computed now by DVC for `stage`.

    Uses DVC's state cache, so it is cheap right after DVC checked the stage;
    on an uncached multi-GB dependency it hashes the data (call it under DVC).
    Raises whatever DVC raises (not a DVC repo, unknown stage, ...).
    """
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    root = Path(root).resolve()
    dvcfile, name = stage.rsplit(":", 1) if ":" in stage else ("dvc.yaml", stage)
    with Repo(str(root)) as repo:
        # An absolute dvc.yaml path: DVC resolves targets against the cwd, not the repo.
        (st,) = repo.stage.collect(f"{root / dvcfile}:{name}")
        deps: dict[str, str] = {}
        params: dict[str, str] = {}
        for dep in st.deps:
            if isinstance(dep, ParamsDependency):
                params[str(dep.def_path)] = params_sha256(dep.read_params())
            else:
                info = dep.get_hash()
                if info and info.value:
                    deps[str(dep.def_path)] = str(info.value)
    return {"deps": deps, "params": params}


def stage_hashes(stage: str, root: str | Path = ".") -> dict[str, str]:
    """MLflow tags with the DVC dependency and params hashes of `stage`.

    Keys: `dvc.dep.<path>` (DVC's md5, `.dir` suffix for folders),
    `dvc.params.<file>` (sha256 of the stage's params values, see
    `params_sha256`), and `dvc.hashes_from`. Empty if neither DVC nor
    `dvc.lock` knows the stage.
    """
    hashes, source = None, None
    if os.environ.get("DVC_STAGE"):
        try:
            hashes, source = hashes_from_workspace(stage, root), "workspace"
        except Exception as e:  # noqa: BLE001 - provenance must never stop a stage
            log.debug("DVC could not hash the deps of %s: %s", stage, e)
    if hashes is None:
        entry = lock_entry(stage, root)
        if entry is None:
            return {}
        hashes, source = hashes_from_lock(entry), "dvc.lock"
    tags = {"dvc.hashes_from": source}
    for kind, key in (("deps", "dvc.dep"), ("params", "dvc.params")):
        for path, value in sorted(hashes[kind].items()):
            tags[_TAG_KEY_BAD.sub("_", f"{key}.{path}")[:250]] = value
    return tags


def manifest_sha256(path: str | Path | None) -> str | None:
    """sha256 of a data manifest file (e.g. `data/raw/<name>/manifest.json`), None if absent."""
    if path is None or not Path(path).is_file():
        return None
    return sha256_file(path)


__all__ = ["OUTPUT_PATHS", "git_state", "lock_entry", "params_sha256", "hashes_from_lock",
           "hashes_from_workspace", "stage_hashes", "manifest_sha256"]
