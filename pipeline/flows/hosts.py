"""The flow `pcgpt-stage`: one stage of a distributed pipeline run on whichever host's
worker takes it (deployment `pcgpt-stage/any-host`, started by the flow `pcgpt` with
`distribute=True`).

A worker on any host runs it in its own clone: the coordinator's commit and overrides, the
coordinator's dvc.lock entries of the upstream stages with their outputs pulled from the
DVC remote (the same bytes, so the same run-cache key), the stage in a GPU slot of that
host, a push. The coordinator then restores the result from the run cache without running
it. Hosts run the deployment's code at its path, or in `$PCGPT_WORKSPACE`.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any, Callable

import yaml
from prefect import flow, get_run_logger
from prefect.states import Completed

from pipeline import tracking
from pipeline.flows.dag import (git, params_with, raise_for, read_dag, run_dvc, slot_devices,
                                stage_env, workspace)
from pipeline.flows.tasks import read_slot_limit, run_stage, summary
from pipeline.io import write_text


@flow(name="pcgpt-stage", persist_result=False)
def pcgpt_stage(stage: str, commit: str, upstream_lock: dict[str, Any] | None = None,
                overrides: list[str] | None = None, force: bool = False,
                parent_run_id: str | None = None, pipeline_flow_run_id: str | None = None,
                pipeline_flow_run_url: str | None = None):
    """One stage of a distributed pipeline run, on the host whose worker took it.

    In this host's clone: check out `commit` with the coordinator's `overrides`, take the
    coordinator's `dvc.lock` entries of the upstream stages and pull their outputs from the
    DVC remote (the same bytes, so the same run-cache key as on the coordinator), run the
    stage in a GPU slot of this host and push its outputs and run cache. Its MLflow run is
    a child of `parent_run_id`.
    """
    logger = get_run_logger()
    root = workspace()
    os.chdir(root)
    _host_workspace(root, commit, list(overrides or []), upstream_lock or {}, logger.info)
    dag = read_dag(root)
    if stage not in dag:
        raise ValueError(f"stage {stage!r}: not in dvc.yaml at {commit[:12]}")
    extra = {tracking.ENV_PARENT_RUN_ID: parent_run_id or "",
             tracking.ENV_PREFECT_FLOW_RUN_ID: pipeline_flow_run_id or "",
             tracking.ENV_FLOW_RUN_URL: pipeline_flow_run_url or ""}
    if upstream_lock:
        raise_for(stage, run_dvc(root, ["pull", *sorted(upstream_lock)], stage_env(extra), logger.info),
                  "pulling the upstream outputs")
    devices = slot_devices(read_slot_limit()) if dag[stage].gpu else []
    row = run_stage(stage, dag[stage].gpu, force, devices, str(root), push=True, extra_env=extra)
    return Completed(message=summary(row))


def _host_workspace(root: Path, commit: str, overrides: list[str], upstream_lock: dict[str, Any],
                    log: Callable[[str], None]) -> None:
    """Bring this clone to `commit` with `overrides` and the coordinator's lock entries of
    the upstream stages. Stage runs of one pipeline share the clone (same commit, same
    overrides); the lock file serialises them, DVC's repo lock guards dvc.lock."""
    from dvc.repo import Repo

    lock = root / ".dvc" / "tmp" / "pcgpt-stage-sync.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if git(root, "rev-parse", "HEAD") != commit:
                git(root, "fetch", "--quiet", "origin", check=False)
                log(f"checking out {commit[:12]} (the coordinator's commit)")
                git(root, "-c", "advice.detachedHead=false", "checkout", "--quiet", "--force", commit)
            git(root, "checkout", commit, "--", "params.yaml")
            text = params_with(root, overrides) if overrides else None
            if text is not None and text != (root / "params.yaml").read_text(encoding="utf-8"):
                write_text(root / "params.yaml", text)
            if upstream_lock:
                with Repo(str(root), _wait_for_lock=True) as repo, repo.lock:
                    path = root / "dvc.lock"
                    data = (yaml.safe_load(path.read_text(encoding="utf-8")) if path.exists() else None) \
                        or {"schema": "2.0", "stages": {}}
                    data.setdefault("stages", {}).update(upstream_lock)
                    write_text(path, yaml.safe_dump(data, sort_keys=False))
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
