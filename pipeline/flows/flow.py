"""The flow `pcgpt`: one pipeline execution. It reads the DAG from DVC's index and runs each
stage as one task (`python -m dvc --wait-for-lock repro --single-item <stage>`), submitted
as soon as its upstream stages have finished; GPU stages wait for a GPU slot of the host.

Reads:  dvc.yaml (the DAG, through DVC), params.yaml (`tracking`; `report` for the
        headline table), the report's `results.csv` after a run.
Writes: what DVC writes; params.yaml only while a run's `overrides` apply (restored
        afterwards, atomically); a DVC experiment per run that produced results; the
        MLflow parent run of the execution; Prefect artifacts (stage table, headline
        table, MLflow link). Nothing outside the workspace but lock files in the temp dir.

Lineage. The flow owns the MLflow parent run (`tracking.pipeline_run`); DVC's stage
processes inherit `PCGPT_PARENT_RUN_ID`, `PREFECT__FLOW_RUN_ID` and
`PCGPT_FLOW_RUN_URL`, so every stage run is its child, tagged with the flow run. A
parent left RUNNING by a flow run that crashed is closed by the next flow run.

Crash safety. Cancelling sends SIGTERM to the flow's process group, so the running
`dvc` and stage processes get it: pretrain checkpoints and exits, the flow waits for
them before it releases the workspace, and a re-run resumes from the checkpoints.
DVC lock errors (another process holds a DVC lock) are retried; other failures fail
the stage, skip its downstream stages and fail the flow. A dead worker leaves its runs
going (prefect.yaml turns `stream_output` off); the run of a dead host is turned into
`Crashed` by the automation `setup` creates (missing heartbeats).

Several hosts. With `distribute=True` the coordinator (the host running the flow) runs
the CPU stages and the GPU stages with git-tracked outputs (pretrain: DVC restores a stage
from its run cache only if its `cache: false` outputs already match) and pushes them
(`dvc push --run-cache`); every other GPU stage (the ablation items) goes to the
`pcgpt-stage/any-host` deployment (`pipeline.flows.hosts`), and the coordinator then
restores its result from the run cache without running it. The MLflow server is shared by
URI (`MLFLOW_TRACKING_URI`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed
from prefect.states import Cancelled
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import provenance, tracking
from pipeline.flows.artifacts import publish
from pipeline.flows.dag import (Stage, StageFailed, git, params_applied, params_with, read_dag,
                                run_dag, save_experiment, select, slot_devices, workspace,
                                workspace_lock)
from pipeline.flows.tasks import dispatch_stage, read_slot_limit, run_stage
from pipeline.params import load_section

REPORT_STAGE = "report"  # its results.csv gives the headline table
MAX_PARALLEL = 64  # task threads: a 36-item grid waits on its GPU slots all at once
CHILD_GRACE_S = 25.0  # < the worker's 30 s between SIGTERM and SIGKILL


@dataclasses.dataclass
class Plan:
    root: Path
    dag: dict[str, Stage]
    order: list[str]
    params_text: str | None  # params.yaml with the overrides; None without overrides
    overrides: list[str]
    devices: list[str]  # what this host's GPU slots pin
    commit: str | None  # the commit other hosts check out (distribute)


def plan_run(root: Path, targets: list[str] | None, overrides: list[str], distribute: bool) -> Plan:
    """Every check before any work: the DAG, the targets, the overrides, this host's GPU-slot
    limit (GPU stages run here) or a clean commit (GPU stages run elsewhere)."""
    params_text = params_with(root, overrides) if overrides else None
    with params_applied(root, params_text):  # overrides of `seeds` or the grid change the DAG
        dag = read_dag(root)
    order = select(dag, targets)
    devices: list[str] = []
    commit = None
    if distribute:
        commit = git(root, "rev-parse", "HEAD")
        deps = sorted({p for p in git(root, "diff", "--name-only", "HEAD").splitlines()}
                      - set(_pipeline_outputs(dag)) - {"dvc.lock"})
        if deps:
            raise ValueError(f"distribute: other hosts check out {commit[:12]}, but these tracked "
                             f"files differ from it here: {', '.join(deps)} (commit them first)")
    if any(dag[n].gpu and not dispatched(dag[n], distribute) for n in order):
        devices = slot_devices(read_slot_limit())
    return Plan(root, dag, order, params_text, list(overrides), devices, commit)


def dispatched(st: Stage, distribute: bool) -> bool:
    """A distributed run sends a GPU stage to another host only if the run cache can bring
    all of it back (no `cache: false` outputs: those must already match the workspace for
    DVC to restore a stage; pretrain's git-tracked metrics stay on the coordinator)."""
    return distribute and st.gpu and not st.uncached


def _pipeline_outputs(dag: dict[str, Stage]) -> list[str]:
    return [p for s in dag.values() for p in s.uncached]


def _experiment_name(run_name: str, run_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"prefect-{run_name}-{run_id[:8]}")


@flow(name="pcgpt", task_runner=ThreadPoolTaskRunner(max_workers=MAX_PARALLEL),
      persist_result=False)
def pcgpt(targets: list[str] | None = None, force: bool = False,
          overrides: list[str] | None = None, distribute: bool = False):
    """Run the pcgpt DVC pipeline in this workspace: each stage one task, GPU stages on
    GPU slots, the MLflow parent run, a DVC experiment of the results.

    Args:
        targets: stage names (`pretrain@pcgpt`) or groups (`ablate`); their upstream stages
            run too. Empty: the whole pipeline.
        force: re-run the selected stages even where DVC finds them up to date.
        overrides: params in DVC's `-S` form, e.g. `train.steps=5000`: applied for this run,
            saved with its results as a DVC experiment (`dvc exp show`), then params.yaml is
            restored (the next scheduled run uses the branch's params).
        distribute: run the GPU stages through the `pcgpt-stage/any-host` deployment on
            whichever host takes them, with data exchanged through the DVC remote.
    """
    from prefect.runtime import flow_run

    logger = get_run_logger()
    root = workspace()
    os.chdir(root)  # the default MLflow store (sqlite:///mlflow.db) is relative to it
    run_id, run_name = str(flow_run.get_id()), flow_run.get_name()
    url = flow_run.get_flow_run_ui_url() or ""
    overrides = list(overrides or [])
    with workspace_lock(root, f"flow run {run_name} ({run_id})") as busy:
        if busy:
            return Cancelled(message=f"already running: {busy} holds the workspace {root}")
        plan = plan_run(root, targets, overrides, distribute)
        logger.info("%d stages: %s", len(plan.order), ", ".join(plan.order))
        with params_applied(root, plan.params_text):
            rows = _execute(plan, force, distribute, run_id, run_name, url)
            if overrides or any(r["status"].startswith("ran") for r in rows.values()):
                save_experiment(plan.root, plan.dag, plan.order, _experiment_name(run_name, run_id),
                                logger.info)
    return {n: r["status"] for n, r in rows.items()}


def _execute(plan: Plan, force: bool, distribute: bool, run_id: str, run_name: str,
             url: str) -> dict[str, dict[str, Any]]:
    """The stages of `plan` as tasks under one MLflow parent run; artifacts; raises if a
    stage failed. On cancellation: the parent is KILLED, dispatched stage runs are cancelled
    and the stages' processes are waited for (they checkpoint on the SIGTERM)."""
    from prefect.exceptions import TerminationSignal

    logger = get_run_logger()
    root = plan.root
    tcfg = load_section(tracking.TrackingConfig, "tracking", root / "params.yaml")
    # housekeeping: never stops a run, and never waits on a store that does not answer
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(tracking.PROBE_TIMEOUT_S)}
    with contextlib.suppress(Exception), tracking._http_limits(probe, override=True):
        _close_stale_parents(tcfg)
    tags = {"prefect.flow_run_id": run_id, "prefect.flow_run_url": url,
            "pcgpt.overrides": " ".join(plan.overrides) or None}
    with tracking.pipeline_run(f"prefect {run_name}", tcfg, tags=tags) as parent:
        extra = {tracking.ENV_PREFECT_FLOW_RUN_ID: run_id, tracking.ENV_FLOW_RUN_URL: url,
                 tracking.ENV_PARENT_RUN_ID: parent.run_id or ""}

        def submit(name: str, upstream: list):
            st = plan.dag[name]
            if dispatched(st, distribute):
                params = {"commit": plan.commit, "overrides": plan.overrides, "force": force,
                          "upstream_lock": {u: provenance.lock_entry(u, root) for u in st.upstream},
                          "parent_run_id": parent.run_id, "pipeline_flow_run_id": run_id,
                          "pipeline_flow_run_url": url}
                return dispatch_stage.submit(name, params, str(root), extra, wait_for=upstream)
            return run_stage.submit(name, st.gpu, force, plan.devices, str(root), push=distribute,
                                    extra_env=extra, wait_for=upstream)

        try:
            rows = run_dag(plan.dag, plan.order, submit, lambda fs: next(as_completed(fs)),
                           logger.error)
        except (TerminationSignal, KeyboardInterrupt):
            parent.end("KILLED")
            if distribute:
                with contextlib.suppress(Exception):
                    _cancel_dispatched(run_id)
            _wait_for_children(CHILD_GRACE_S)
            raise
        report = rows.get(REPORT_STAGE, {}).get("status") in ("ran", "restored", "unchanged")
        publish(rows, root, parent, report)
        failed = [r["stage"] for r in rows.values() if r["status"].startswith(("failed", "not run"))]
        if failed:
            raise StageFailed(f"{len(failed)} of {len(rows)} stages failed or were not run: "
                              f"{', '.join(failed)}")
    return rows


def _wait_for_children(timeout: float) -> None:
    """Wait until no other process of this flow's process group is alive (the stages got
    the cancellation's SIGTERM and checkpoint), so the workspace is released only after."""
    import psutil

    me, group = os.getpid(), os.getpgrp()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for p in psutil.process_iter(["pid"]):
            try:
                if p.pid != me and os.getpgid(p.pid) == group and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        if not alive:
            return
        time.sleep(0.2)


def _cancel_dispatched(flow_run_id: str) -> None:
    """Cancel the stage runs this coordinator dispatched (cancelling a parent does not
    cascade to `run_deployment` children: prefect #10339)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
    from prefect.states import Cancelling

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"pcgpt-coordinator:{flow_run_id}"])))
        for r in runs:
            if r.state and not r.state.is_final():
                client.set_flow_run_state(r.id, Cancelling(message="the pipeline run was cancelled"))


def _close_stale_parents(config: tracking.TrackingConfig) -> None:
    """End MLflow parents still RUNNING whose flow run is over (crashed or killed before it
    could end its parent), with the status the flow run ended in."""
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client

    if not config.enabled:
        return
    client = MlflowClient(tracking_uri=tracking.tracking_uri())
    exp = client.get_experiment_by_name(config.experiment)
    if exp is None:
        return
    runs = client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'pipeline' and "
                              "attributes.status = 'RUNNING'", max_results=200)
    final = {"COMPLETED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED", "CRASHED": "KILLED"}
    with get_client(sync_client=True) as prefect:
        for r in runs:
            fr_id = r.data.tags.get("prefect.flow_run_id")
            if not fr_id:
                continue
            try:
                state = prefect.read_flow_run(fr_id).state
            except Exception:  # noqa: BLE001 - a run of another server, or deleted
                continue
            if state is not None and state.type.value in final:
                client.set_terminated(r.info.run_id, final[state.type.value])
