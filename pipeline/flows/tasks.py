"""The flow's tasks: one stage here (`run_stage`), or on whichever host takes it
(`dispatch_stage`), inside a GPU slot of its host for a GPU stage.

A Prefect GPU slot is two things: first the first free per-device lock file of
`dag.first_free_device`, then one slot of the host's global concurrency limit
`gpu:<host>` (blocking), and the stage runs with `CUDA_VISIBLE_DEVICES` set to that
device. The local lock comes first because a blocked Prefect limit is polled with a
Retry-After of up to 30 s (the limit's mean slot occupancy), which would idle a GPU for
that long at every hand-over of a 36-item grid; with the lock files a freed GPU is taken
within 0.25 s, and the limit (sized to the same count by `setup`) is then free at once.
CPU stages take no slot. A stage that failed on a DVC lock is retried.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.flows.dag import (LOCK_RETRY_DELAYS_S, StageFailed, StageLockError, first_free_device,
                                host, raise_for, repro_args, run_dvc, stage_env)
from pipeline.flows.deploy import STAGE_DEPLOYMENT, slot_limit_name

# A slot of a process that died is freed when its lease runs out: the server's minimum
# (60 s, renewed every 45 s) rather than Prefect's default 300 s, so a dead host's next run
# does not wait five minutes for its own GPU.
SLOT_LEASE_S = 60


@contextlib.contextmanager
def gpu_slot(devices: list[str], log: Callable[[str], None]) -> Iterator[str]:
    """Hold one device of this host and one slot of its limit `gpu:<host>`; yield the device
    (`0`, `1`, ... or `cpu<i>`). Both are released when the block exits or the process dies
    (the lock by the kernel, the limit's slot when its lease runs out: SLOT_LEASE_S)."""
    from prefect.concurrency.sync import concurrency

    name = slot_limit_name()
    log(f"waiting for a GPU slot: {name}, devices {', '.join(devices)}")
    with first_free_device(devices) as dev:
        # A failed lease renewal must not kill a training of hours (prefect #19068).
        with concurrency(name, occupy=1, strict=True, lease_duration=SLOT_LEASE_S,
                         raise_on_lease_renewal_failure=False):
            log(f"GPU slot taken: {name} device {dev}")
            try:
                yield dev
            finally:
                log(f"GPU slot released: {name} device {dev}")


def read_slot_limit() -> int:
    """The size of this host's GPU-slot limit on the Prefect server (made by `setup`)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = slot_limit_name()
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            raise ValueError(f"no GPU-slot limit {name!r} on the Prefect server: run "
                             f"`python -m pipeline.flows setup` on this host first") from None


def _retry_on_lock(task_, task_run, state) -> bool:
    try:
        state.result()
    except StageLockError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


_STAGE_TASK = dict(cache_policy=NO_CACHE, persist_result=False, retries=len(LOCK_RETRY_DELAYS_S),
                   retry_delay_seconds=list(LOCK_RETRY_DELAYS_S), retry_condition_fn=_retry_on_lock)


@task(name="stage", task_run_name="{stage}", **_STAGE_TASK)
def run_stage(stage: str, gpu: bool, force: bool, devices: list[str], root: str,
              pull: bool = False, push: bool = False,
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` in the workspace (inside a GPU slot for a GPU
    stage), its output streamed into this task's log; with `pull`/`push`, data and run
    cache come from / go to the DVC remote (several hosts)."""
    logger = get_run_logger()
    t0 = time.monotonic()
    with gpu_slot(devices, logger.info) if gpu else contextlib.nullcontext("-") as dev:
        env = stage_env(extra_env)
        if gpu and not dev.startswith("cpu"):
            env["CUDA_VISIBLE_DEVICES"] = dev
        t1 = time.monotonic()
        res = run_dvc(Path(root), repro_args(stage, force, pull), env, logger.info)
        t2 = time.monotonic()
    raise_for(stage, res)
    if push:
        raise_for(stage, run_dvc(Path(root), ["push", "--run-cache", stage], stage_env(extra_env),
                                 logger.info), "dvc push")
    return {"stage": stage, "status": res.status, "wall_s": round(t2 - t1, 1),
            "waited_s": round(t1 - t0, 1), "gpu": dev, "host": host()}


_SUMMARY = re.compile(r"^(?P<stage>\S+) (?P<status>\w+) on (?P<host>\S+), device (?P<gpu>\S+), "
                      r"(?P<wall_s>[\d.]+) s")


def summary(row: dict[str, Any]) -> str:
    """A stage run's row as the final message of its `pcgpt-stage` flow run (read back by
    `dispatch_stage`)."""
    return f"{row['stage']} {row['status']} on {row['host']}, device {row['gpu']}, {row['wall_s']} s"


@task(name="dispatch", task_run_name="{stage} (any host)", **_STAGE_TASK)
def dispatch_stage(stage: str, params: dict[str, Any], root: str, extra_env: dict[str, str]) -> dict[str, Any]:
    """Run `stage` through the stage deployment on whichever host takes it, then restore
    its result here from the DVC remote's run cache."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    t0 = time.monotonic()
    run = run_deployment(STAGE_DEPLOYMENT, parameters={"stage": stage, **params}, timeout=None,
                         tags=[f"pcgpt-coordinator:{params['pipeline_flow_run_id']}"])
    state = run.state
    if state is None or not state.is_completed():
        raise StageFailed(f"{stage}: {STAGE_DEPLOYMENT} run {run.name} ended "
                          f"{state.name if state else 'without a state'}: {state.message if state else ''}")
    m = _SUMMARY.match(state.message or "")
    row = m.groupdict() if m else {"stage": stage, "status": "ran", "host": "?", "gpu": "?", "wall_s": "0"}
    logger.info("%s: %s (flow run %s)", stage, state.message, run.name)
    res = run_dvc(Path(root), repro_args(stage, pull=True), stage_env(extra_env), logger.info)
    raise_for(stage, res, "restoring from the run cache")
    if res.status == "ran":
        logger.warning("%s: not in the DVC remote's run cache, so it ran again here", stage)
    return {"stage": stage, "status": f"{row['status']} on {row['host']}, {res.status} here",
            "wall_s": float(row["wall_s"]), "waited_s": round(time.monotonic() - t0 - float(row["wall_s"]), 1),
            "gpu": row["gpu"], "host": row["host"]}
