"""Provenance read from a real git repo and a real `dvc repro` (foreach + a sub-folder dvc.yaml)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import provenance

GIT = ["git", "-c", "user.name=pcgpt-test", "-c", "user.email=test@pcgpt.invalid"]


def sh(cwd: Path, *args: str) -> str:
    proc = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{args}: {proc.stderr[-2000:]}"
    return proc.stdout.strip()


def test_git_state_commit_and_dirty_flag(tmp_path):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None, "changed": None}
    sh(tmp_path, "git", "init", "-q")
    (tmp_path / "a.txt").write_text("1")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "m.json").write_text("{}")
    sh(tmp_path, *GIT, "add", "a.txt", "metrics")
    sh(tmp_path, *GIT, "commit", "-q", "-m", "a")
    head = sh(tmp_path, "git", "rev-parse", "HEAD")
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": False, "changed": 0}
    (tmp_path / "untracked.bin").write_text("x")  # DVC outputs are untracked: not dirty
    (tmp_path / "metrics" / "m.json").write_text('{"a": 1}')  # a pipeline output: not dirty
    assert provenance.git_state(tmp_path)["dirty"] is False
    (tmp_path / "a.txt").write_text("2")
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": True, "changed": 1}


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A git+DVC repo whose pipeline ran once: `gen@a`, `gen@b` (foreach) and `sub/dvc.yaml:inner`."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "data" / "x.txt").write_text("hello\n")
    (repo / "params.yaml").write_text(yaml.safe_dump({"gen": {"n": 2, "names": ["p", "q"]},
                                                      "other": 1}))
    copy = f"{sys.executable} -c \"import shutil,sys; shutil.copy(sys.argv[1], sys.argv[2])\""
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"gen": {
        "foreach": ["a", "b"],
        "do": {"cmd": f"{copy} data/x.txt out_${{item}}.txt",
               "deps": ["data"], "params": ["gen"], "outs": ["out_${item}.txt"]}}}}))
    (repo / "sub").mkdir()
    (repo / "sub" / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"inner": {
        "cmd": f"{copy} ../data/x.txt inner.txt", "deps": ["../data"],
        "outs": ["inner.txt"]}}}))
    sh(repo, "git", "init", "-q")
    sh(repo, sys.executable, "-m", "dvc", "init", "-q")
    sh(repo, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    sh(repo, sys.executable, "-m", "dvc", "repro", "-q", "gen@a", "gen@b", "sub/dvc.yaml:inner")
    return repo


@pytest.mark.slow
def test_lock_entries_by_dvc_address(dvc_repo):
    entry = provenance.lock_entry("gen@b", dvc_repo)
    assert entry is not None and "out_b.txt" in entry["cmd"]
    inner = provenance.lock_entry("sub/dvc.yaml:inner", dvc_repo)
    assert inner is not None and "inner.txt" in inner["cmd"]
    assert provenance.lock_entry("gen@zzz", dvc_repo) is None
    assert provenance.lock_entry("gen@a", dvc_repo.parent) is None  # no dvc.lock there

    hashes = provenance.hashes_from_lock(entry)
    assert hashes["deps"] == {"data": entry["deps"][0]["md5"]}
    assert hashes["deps"]["data"].endswith(".dir")
    assert hashes["params"] == {"params.yaml": provenance.params_sha256(
        {"gen": {"n": 2, "names": ["p", "q"]}})}


@pytest.mark.slow
def test_workspace_hashes_equal_what_dvc_lock_records(dvc_repo, monkeypatch):
    """The hashes DVC computes now are the ones it writes to dvc.lock: the reason the
    tracker can tag them while a stage runs, before DVC writes the lock."""
    for stage in ("gen@a", "sub/dvc.yaml:inner"):
        assert provenance.hashes_from_workspace(stage, dvc_repo) == \
            provenance.hashes_from_lock(provenance.lock_entry(stage, dvc_repo))

    monkeypatch.delenv("DVC_STAGE", raising=False)
    from_lock = provenance.stage_hashes("gen@a", dvc_repo)
    assert from_lock["dvc.hashes_from"] == "dvc.lock"
    monkeypatch.setenv("DVC_STAGE", "gen@a")
    from_dvc = provenance.stage_hashes("gen@a", dvc_repo)
    assert from_dvc.pop("dvc.hashes_from") == "workspace"
    assert from_dvc == {k: v for k, v in from_lock.items() if k != "dvc.hashes_from"}
    assert set(from_dvc) == {"dvc.dep.data", "dvc.params.params.yaml"}

    # After a change, DVC sees the new data while dvc.lock still holds the old run.
    (dvc_repo / "data" / "x.txt").write_text("changed\n")
    assert provenance.stage_hashes("gen@a", dvc_repo)["dvc.dep.data"] != from_lock["dvc.dep.data"]
    monkeypatch.delenv("DVC_STAGE")
    assert provenance.stage_hashes("gen@a", dvc_repo)["dvc.dep.data"] == from_lock["dvc.dep.data"]
    assert provenance.stage_hashes("nope", dvc_repo) == {}


def test_params_hash_ignores_key_order():
    assert provenance.params_sha256({"a": 1, "b": {"c": [1, 2]}}) == \
        provenance.params_sha256({"b": {"c": [1, 2]}, "a": 1})
    assert provenance.params_sha256({"a": 1}) != provenance.params_sha256({"a": 2})


def test_manifest_sha256(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_bytes(os.urandom(3000))
    assert provenance.manifest_sha256(manifest) == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert provenance.manifest_sha256(tmp_path / "missing.json") is None
    assert provenance.manifest_sha256(None) is None
