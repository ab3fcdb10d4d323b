"""What the deployments need on the Prefect server, and the names prefect.yaml shares with
the code: the process work pool, this host's GPU-slot limit, the zombie automation.

    python -m pipeline.flows setup      # idempotent; then `prefect --no-prompt deploy --all`

Prefect is imported inside the functions only, so the command line (`python -m
pipeline.flows --help`, the Prefect-free `local` runner) reads these names without it.
"""

from __future__ import annotations

import time
from typing import Any

from pipeline.flows.dag import host, visible_gpus

POOL = "gpu"
STAGE_DEPLOYMENT = "pcgpt-stage/any-host"  # flow name / deployment name in prefect.yaml
ZOMBIE_AUTOMATION = "pcgpt: crash flow runs whose heartbeats stopped"
# prefect.yaml sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY to HEARTBEAT_S for every deployment;
# the automation waits three heartbeats (fewer gives false positives: prefect #18653, #21932).
HEARTBEAT_S = 60
ZOMBIE_AFTER_S = 3 * HEARTBEAT_S
SERVER_WAIT_S = 120.0  # setup waits this long for a server that is still starting


def slot_limit_name(host_name: str | None = None) -> str:
    """The global concurrency limit that counts this host's GPU slots."""
    return f"gpu:{host_name or host()}"


def zombie_automation(after_s: int):
    """Mark a flow run `Crashed` when no heartbeat (and no final state) follows its last
    heartbeat within `after_s` seconds: the worker's host died or lost the network."""
    from datetime import timedelta

    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=ZOMBIE_AUTOMATION,
        description=f"A flow run whose heartbeats (every {HEARTBEAT_S} s, prefect.yaml) stop "
                    f"for {after_s} s is marked Crashed instead of Running forever.",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed",
                    "prefect.flow-run.Failed", "prefect.flow-run.Cancelled",
                    "prefect.flow-run.Crashed"},
            match={"prefect.resource.id": ["prefect.flow-run.*"]},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"No heartbeat for {after_s} s: the worker or its host died.")])


def setup(gpus: int | None = None, zombie_after_s: int = ZOMBIE_AFTER_S) -> dict[str, Any]:
    """Create (or bring up to date) what the deployments need on the Prefect server:
    the process work pool, this host's GPU-slot limit and the zombie automation."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise ValueError("PREFECT_API_URL is not set: start a server (`prefect server start`) and "
                         "export PREFECT_API_URL=http://127.0.0.1:4200/api (see README)")
    if gpus is not None and gpus < 1:
        raise ValueError(f"--gpus {gpus}: must be >= 1")
    if zombie_after_s < 2 * 30:
        raise ValueError(f"--zombie-after {zombie_after_s}: must be >= 60 s (two of the "
                         "shortest heartbeat interval Prefect allows)")
    n = gpus or max(1, len(visible_gpus()))
    with get_client(sync_client=True) as client:
        # `prefect server start --background` returns before the server listens
        deadline = time.monotonic() + SERVER_WAIT_S
        while (err := client.api_healthcheck()) is not None and time.monotonic() < deadline:
            time.sleep(1)
        if err is not None:
            raise ValueError(f"the Prefect server at {PREFECT_API_URL.value()} did not answer "
                             f"within {SERVER_WAIT_S:.0f} s: {err}")
        try:
            pool = client.read_work_pool(POOL)
            if pool.type != "process":
                raise ValueError(f"work pool {POOL!r} exists with type {pool.type!r}; pcgpt needs "
                                 f"a process pool (delete it: prefect work-pool delete {POOL})")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
        client.upsert_global_concurrency_limit_by_name(slot_limit_name(), n)
        want = zombie_automation(zombie_after_s)
        have = client.read_automations_by_name(ZOMBIE_AUTOMATION)
        same = [a for a in have if a.trigger == want.trigger and a.actions == want.actions and a.enabled]
        for a in have:
            if not same or a.id != same[0].id:
                client.delete_automation(a.id)
        if not same:
            client.create_automation(want)
    return {"work_pool": POOL, "slot_limit": slot_limit_name(), "slots": n,
            "automation": ZOMBIE_AUTOMATION, "zombie_after_s": zombie_after_s}
