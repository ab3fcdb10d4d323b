"""Shared fixtures: GPU skipping and throwaway copies of the project for real DVC runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from pipeline.params import deep_merge

ROOT = Path(__file__).resolve().parents[1]
# Small public-domain text shipped with the tests (provenance and sha256: tests/data/README.md).
SHAKESPEARE = ROOT / "tests" / "data" / "shakespeare.txt"
# What a project copy needs to run its stages (DVC outputs are made fresh).
PROJECT_FILES = ["model", "stages", "pipeline", "dvc.yaml", "params.yaml", "pyproject.toml"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_tf32_flags():
    """Training turns TF32 on process-wide (stages/pretrain/runtime.py); an fp32 test run
    after it in the same process would then compare TF32 matmuls against 1e-4 bounds."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


class Project:
    """A copy of the repository in a temp dir, with its own git repo and DVC."""

    def __init__(self, path: Path):
        self.path = path
        self.env = dict(os.environ)
        # The venv's python/dvc first on PATH, so `python -m stages.x` in dvc.yaml
        # runs the interpreter of this test session on the copied sources.
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        self.env["PYTHONPATH"] = str(path)
        self.env["MLFLOW_TRACKING_URI"] = f"sqlite:///{path / 'mlflow.db'}"
        self.env.pop("DVC_STAGE", None)
        self.env["GIT_AUTHOR_NAME"] = self.env["GIT_COMMITTER_NAME"] = "pcgpt-test"
        self.env["GIT_AUTHOR_EMAIL"] = self.env["GIT_COMMITTER_EMAIL"] = "test@pcgpt.invalid"

    def run(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(args), cwd=self.path, env=self.env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
                f"\n--- stderr\n{proc.stderr[-4000:]}")
        return proc

    def dvc(self, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, check=check, timeout=timeout)

    @property
    def params(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, override: dict[str, Any], replace: tuple[str, ...] = ()) -> None:
        """Deep-merge `override` into the copy's params.yaml; the top-level sections named
        in `replace` are replaced whole instead (e.g. a smaller ablation grid)."""
        params = deep_merge({k: v for k, v in self.params.items() if k not in replace}, override)
        (self.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    def commit(self, msg: str = "snapshot") -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "--allow-empty", "-m", msg)


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """A fresh git+DVC copy of this repository's code and params in a temp dir."""
    dest = tmp_path / "proj"
    dest.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    shutil.copy2(ROOT / ".gitignore", dest / ".gitignore")
    proj = Project(dest)
    proj.run("git", "init", "-q")
    proj.dvc("init", "-q")
    proj.dvc("config", "core.analytics", "false")
    proj.commit("init")
    return proj
