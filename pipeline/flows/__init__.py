"""Running the DVC pipeline: scheduled Prefect runs on GPU workers, or a local run.

DVC stays the source of truth for what runs and what is cached; a runner decides when,
where and on which GPU. Both runners read the DAG from DVC's index and run each stage as
`python -m dvc --wait-for-lock repro --single-item <stage>` as soon as its upstream stages
have finished, GPU stages in a GPU slot of their host.

    dag.py        the DAG, running a stage, GPU slots, overrides: no Prefect (both runners)
    local.py      the local runner: a thread pool, no Prefect, no MLflow
    flow.py       flow `pcgpt`: one pipeline execution (deployments pcgpt/nightly, pcgpt/adhoc)
    hosts.py      flow `pcgpt-stage`: one stage on whichever host takes it (pcgpt-stage/any-host)
    tasks.py      the flow's tasks: a stage here or on any host, Prefect GPU slots
    artifacts.py  what a flow run shows: stage table, headline table, MLflow link
    deploy.py     names prefect.yaml shares with the code; `setup` of the Prefect server

Run:    python -m pipeline.flows setup           # work pool `gpu`, this host's GPU-slot limit,
                                                 # the zombie automation (idempotent)
        prefect --no-prompt deploy --all         # prefect.yaml: pcgpt/nightly, pcgpt/adhoc,
                                                 # pcgpt-stage/any-host
        prefect worker start --pool gpu          # on every GPU host
        python -m pipeline.flows run [TARGET ...] [-f] [-S key=value ...]   # the flow, no worker
        python -m pipeline.flows local [TARGET ...] [-S key=value ...] [--gpus 0,1] [--per-gpu N]
                                                 # no Prefect at all (README, local.py)

This package imports only `dag` when imported; the Prefect names below load their module
(and Prefect) on first use, so `python -m pipeline.flows local` runs without Prefect.
"""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.flows.dag import (ENV_HOST, ENV_WORKSPACE, GPU_DEP, DvcResult, Stage, StageFailed,
                                StageLockError, first_free_device, params_with, raise_for, read_dag,
                                run_dag, run_dvc, select, slot_devices, visible_gpus, workspace)

# name -> the module that defines it (Prefect, or read by the Prefect side)
_LAZY = {
    **dict.fromkeys(["POOL", "STAGE_DEPLOYMENT", "HEARTBEAT_S", "ZOMBIE_AFTER_S",
                     "ZOMBIE_AUTOMATION", "slot_limit_name", "setup", "zombie_automation"], "deploy"),
    **dict.fromkeys(["gpu_slot", "run_stage", "dispatch_stage"], "tasks"),
    **dict.fromkeys(["pcgpt", "plan_run", "dispatched", "Plan"], "flow"),
    "pcgpt_stage": "hosts",
    **dict.fromkeys(["publish", "headline_table"], "artifacts"),
}

__all__ = ["ENV_HOST", "ENV_WORKSPACE", "GPU_DEP", "DvcResult", "Stage", "StageFailed",
           "StageLockError", "first_free_device", "params_with", "raise_for", "read_dag", "run_dag",
           "run_dvc", "select", "slot_devices", "visible_gpus", "workspace", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
