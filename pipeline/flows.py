"""Prefect orchestration of the DVC pipeline: scheduled runs on GPU workers.

DVC stays the source of truth for what runs and what is cached; Prefect decides
when, where and on which GPU, and shows it. One flow run is one pipeline execution:

    flow `pcgpt`        reads the DAG from DVC's index, runs each stage as one task
                        (`python -m dvc --wait-for-lock repro --single-item <stage>`),
                        submitted as soon as its upstream stages have finished
    flow `pcgpt-stage`  one stage on whichever host's worker takes it (several hosts)

Reads:  dvc.yaml (the DAG, through DVC), params.yaml (`tracking`; `report` for the
        headline table), the report's `results.csv` after a run.
Writes: what DVC writes; params.yaml only while a run's `overrides` apply (restored
        afterwards, atomically); a DVC experiment per run that produced results; the
        MLflow parent run of the execution; Prefect artifacts (stage table, headline
        table, MLflow link). Nothing outside the workspace but lock files in the temp dir.
Run:    python -m pipeline.flows setup           # work pool `gpu`, this host's GPU-slot limit,
                                                 # the zombie automation (idempotent)
        prefect --no-prompt deploy --all         # prefect.yaml: pcgpt/nightly, pcgpt/adhoc,
                                                 # pcgpt-stage/any-host
        prefect worker start --pool gpu          # on every GPU host
        python -m pipeline.flows run [TARGET ...] [-f] [-S key=value ...]   # the flow, no worker

GPU slots. A stage that depends on the model package (`model` in its DVC deps: it
trains or evaluates a model) takes one slot of its host: first the first free
per-device lock file (`fcntl.flock` in the temp dir, one per visible GPU, or one per
slot of the limit on a CPU-only host; the kernel frees it when the holder dies), then
one slot of the host's global concurrency limit `gpu:<host>` (blocking), and runs
with `CUDA_VISIBLE_DEVICES` set to that GPU. The local lock comes first because a
blocked Prefect limit is polled with a Retry-After of up to 30 s (the limit's mean
slot occupancy), which would idle a GPU for that long at every hand-over of a
36-item grid; with the lock files a freed GPU is taken within 0.25 s, and the limit
(sized to the same count by `setup`) is then free at once. CPU stages take no slot.

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
`pcgpt-stage/any-host` deployment. A worker on any host runs it in its own clone: the
coordinator's commit and overrides, the coordinator's dvc.lock entries of the upstream
stages with their outputs pulled from the DVC remote (the same bytes, so the same run-cache
key), the stage in a GPU slot of that host, a push. The coordinator then restores the
result from the run cache without running it. The MLflow server is shared by URI
(`MLFLOW_TRACKING_URI`); hosts run the deployment's code at its path, or in
`$PCGPT_WORKSPACE`.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import fcntl
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.states import Cancelled, Completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline import provenance, tracking
from pipeline.io import write_text
from pipeline.params import load_section

POOL = "gpu"
STAGE_DEPLOYMENT = "pcgpt-stage/any-host"  # flow name / deployment name in prefect.yaml
GPU_DEP = "model"  # a stage depending on the model package trains or evaluates a model
REPORT_STAGE = "report"  # its results.csv gives the headline table
ENV_WORKSPACE = "PCGPT_WORKSPACE"  # a host's clone, when it is not the deployment's directory
ENV_HOST = "PCGPT_HOST"  # the host name of GPU slots (tests run two "hosts" on one machine)
ZOMBIE_AUTOMATION = "pcgpt: crash flow runs whose heartbeats stopped"
# prefect.yaml sets PREFECT_FLOWS_HEARTBEAT_FREQUENCY to HEARTBEAT_S for every deployment;
# the automation waits three heartbeats (fewer gives false positives: prefect #18653, #21932).
HEARTBEAT_S = 60
ZOMBIE_AFTER_S = 3 * HEARTBEAT_S
MAX_PARALLEL = 64  # task threads: a 36-item grid waits on its GPU slots all at once
LOCK_RETRIES = 3
CHILD_GRACE_S = 25.0  # < the worker's 30 s between SIGTERM and SIGKILL
SLOT_POLL_S = 0.25
# A slot of a process that died is freed when its lease runs out: the server's minimum
# (60 s, renewed every 45 s) rather than Prefect's default 300 s, so a dead host's next run
# does not wait five minutes for its own GPU.
SLOT_LEASE_S = 60
SERVER_WAIT_S = 120.0  # setup waits this long for a server that is still starting
# DVC exits 255 on every failure; these texts mark the ones another process's lock caused.
_LOCK_ERROR = re.compile(r"Unable to acquire lock|is busy, it is being blocked by|LockError")
# How DVC says what it did with a stage (dvc/stage/__init__.py, dvc/stage/run.py).
_STATUS_LINES = (("Running stage '", "ran"), ("is cached - skipping run", "restored"),
                 ("didn't change, skipping", "unchanged"))


class StageFailed(RuntimeError):
    """`dvc repro` of a stage failed."""


class StageLockError(StageFailed):
    """DVC could not take a lock that another process holds: the task is retried."""


# --------------------------------------------------------------------------- workspace

def workspace() -> Path:
    """`$PCGPT_WORKSPACE`, else the current directory (a deployment's working directory)."""
    root = Path(os.environ.get(ENV_WORKSPACE) or Path.cwd()).resolve()
    if not (root / "dvc.yaml").is_file() or not (root / ".dvc").is_dir():
        raise ValueError(f"{root}: not a DVC workspace of pcgpt (no dvc.yaml or .dvc/); "
                         f"run from the repository root or set {ENV_WORKSPACE}")
    return root


@contextlib.contextmanager
def workspace_lock(root: Path, holder: str) -> Iterator[str | None]:
    """Hold this workspace for one pipeline run. Yields None when it is taken, else the
    holder that has it (flow runs of both deployments and hand runs share a workspace)."""
    path = root / ".dvc" / "tmp" / "pcgpt-flow.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            yield f.read().strip() or "another process"
            return
        f.seek(0)
        f.truncate()
        f.write(holder)
        f.flush()
        try:
            yield None
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)


def git(root: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout.strip()


# --------------------------------------------------------------------------- the DAG

@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    """DVC's stage name: `download`, `pretrain@baseline`, `ablate@bp-0`."""
    upstream: tuple[str, ...]
    """The stages whose outputs it depends on."""
    gpu: bool
    """Depends on the model package: takes a GPU slot."""
    uncached: tuple[str, ...]
    """Its `cache: false` outputs (git-tracked files, included in a saved experiment)."""


def read_dag(root: Path) -> dict[str, Stage]:
    """Every pipeline stage of the workspace's dvc.yaml files, upstream before downstream.

    DVC's index graph has an edge stage -> the stage it depends on (dvc 3.67 internal API:
    pinned in requirements.lock and exercised by the tests)."""
    import networkx as nx
    from dvc.repo import Repo
    from dvc.stage import PipelineStage

    with Repo(str(root)) as repo:
        graph = repo.index.graph
        order = [s for s in reversed(list(nx.topological_sort(graph))) if isinstance(s, PipelineStage)]
        dag = {}
        for s in order:
            ups = tuple(sorted(u.name for u in graph.successors(s) if isinstance(u, PipelineStage)))
            gpu = any(Path(d.def_path).parts[:1] == (GPU_DEP,) for d in s.deps)
            uncached = tuple(str(o.def_path) for o in s.outs if not o.use_cache)
            dag[s.name] = Stage(s.name, ups, gpu, uncached)
    return dag


def select(dag: dict[str, Stage], targets: list[str] | None) -> list[str]:
    """The targets (stage names, or a `foreach`/`matrix` group such as `ablate`) and every
    stage upstream of them, in DAG order; all stages when `targets` is empty."""
    if not targets:
        return list(dag)
    wanted: set[str] = set()
    for t in targets:
        hits = [n for n in dag if n == t or n.split("@", 1)[0] == t]
        if not hits:
            raise ValueError(f"targets: no stage {t!r} in dvc.yaml (stages: {', '.join(dag)})")
        wanted.update(hits)
    todo = list(wanted)
    while todo:
        for up in dag[todo.pop()].upstream:
            if up not in wanted:
                wanted.add(up)
                todo.append(up)
    return [n for n in dag if n in wanted]


def params_with(root: Path, overrides: list[str]) -> str:
    """The text of params.yaml with DVC `-S key=value` overrides applied, exactly as `dvc exp
    run -S` applies them (DVC's own Hydra parser). A key that is not in params.yaml, or a
    malformed override, raises ValueError naming it."""
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    for o in overrides:
        if "=" not in o:
            raise ValueError(f"overrides: {o!r} is not of the form key=value")
    by_file = to_path_overrides(overrides)
    other = set(by_file) - {"params.yaml"}
    if other:
        raise ValueError(f"overrides: only params.yaml can be overridden, not {sorted(other)}")
    src = root / "params.yaml"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-params-", suffix=".yaml", dir=root)
    os.close(fd)
    try:
        Path(tmp).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
        try:
            apply_overrides(tmp, by_file.get("params.yaml", []))
        except Exception as e:  # noqa: BLE001 - Hydra's and DVC's errors, reworded
            why = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
            raise ValueError(f"overrides {overrides}: {' '.join(why.split())}") from None
        return Path(tmp).read_text(encoding="utf-8")
    finally:
        Path(tmp).unlink(missing_ok=True)


# --------------------------------------------------------------------------- dvc

@dataclasses.dataclass
class DvcResult:
    code: int
    status: str  # ran | restored | unchanged | failed
    tail: list[str]


def run_dvc(root: Path, args: list[str], env: dict[str, str], log: Callable[[str], None]) -> DvcResult:
    """`python -m dvc --wait-for-lock <args>` in `root`, each output line passed to `log`.

    Started in this process's group (no new session): a cancellation's SIGTERM to the
    flow's group reaches DVC and the stage, which checkpoints."""
    cmd = [sys.executable, "-m", "dvc", "--wait-for-lock", *args]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace")
    status, tail = "", collections.deque(maxlen=40)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        log(line)
        tail.append(line)
        for marker, what in _STATUS_LINES:
            if marker in line and not status:
                status = what
    code = proc.wait()
    return DvcResult(code, status if code == 0 else "failed", list(tail))


def raise_for(stage: str, res: DvcResult, what: str = "dvc repro") -> None:
    if res.code == 0:
        return
    text = "\n".join(res.tail)
    lines = [ln.strip() for ln in res.tail if ln.strip()]
    last = lines[-1] if lines else ""
    if _LOCK_ERROR.search(text):
        raise StageLockError(f"{stage}: {what} could not take a DVC lock held by another "
                             f"process ({last}); retrying")
    # DVC's own last line says only that the command failed; the line before it is the stage's
    own = [ln for ln in lines if not ln.startswith("ERROR: failed to reproduce")]
    why = f"{last}; last output: {own[-1]}" if own and own[-1] != last else last
    raise StageFailed(f"{stage}: {what} exited {res.code}: {why}")


def stage_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("DVC_STAGE", None)
    env["PYTHONUNBUFFERED"] = "1"  # stage output reaches the task log line by line
    env.update({k: v for k, v in (extra or {}).items() if v})
    return env


# --------------------------------------------------------------------------- GPU slots

def host() -> str:
    return os.environ.get(ENV_HOST) or socket.gethostname()


def slot_limit_name(host_name: str | None = None) -> str:
    return f"gpu:{host_name or host()}"


def visible_gpus() -> list[str]:
    """GPU ids this host offers: `CUDA_VISIBLE_DEVICES` if set, else what nvidia-smi lists."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in out.stdout.splitlines() if ln.strip()] if out.returncode == 0 else []


def slot_devices(limit: int) -> list[str]:
    """What a slot pins: the visible GPUs, or `limit` CPU slots on a CPU-only host."""
    return visible_gpus() or [f"cpu{i}" for i in range(max(1, limit))]


@contextlib.contextmanager
def _first_free_device(devices: list[str]) -> Iterator[str]:
    lock_dir = Path(tempfile.gettempdir()) / "pcgpt-gpu-slots"
    lock_dir.mkdir(exist_ok=True)
    files = [open(lock_dir / f"{host()}-{d}.lock", "a") for d in devices]
    try:
        while True:
            for dev, f in zip(devices, files):
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    yield dev
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                return
            time.sleep(SLOT_POLL_S)
    finally:
        for f in files:
            f.close()


@contextlib.contextmanager
def gpu_slot(devices: list[str], log: Callable[[str], None]) -> Iterator[str]:
    """Hold one device of this host and one slot of its limit `gpu:<host>`; yield the device
    (`0`, `1`, ... or `cpu<i>`). Both are released when the block exits or the process dies
    (the lock by the kernel, the limit's slot when its lease runs out: SLOT_LEASE_S)."""
    from prefect.concurrency.sync import concurrency

    name = slot_limit_name()
    log(f"waiting for a GPU slot: {name}, devices {', '.join(devices)}")
    with _first_free_device(devices) as dev:
        # A failed lease renewal must not kill a training of hours (prefect #19068).
        with concurrency(name, occupy=1, strict=True, lease_duration=SLOT_LEASE_S,
                         raise_on_lease_renewal_failure=False):
            log(f"GPU slot taken: {name} device {dev}")
            try:
                yield dev
            finally:
                log(f"GPU slot released: {name} device {dev}")


# --------------------------------------------------------------------------- tasks

def _retry_on_lock(task_, task_run, state) -> bool:
    try:
        state.result()
    except StageLockError:
        return True
    except BaseException:  # noqa: BLE001 - any other failure is final
        return False
    return False


_STAGE_TASK = dict(cache_policy=NO_CACHE, persist_result=False, retries=LOCK_RETRIES,
                   retry_delay_seconds=[2, 5, 10], retry_condition_fn=_retry_on_lock)


@task(name="stage", task_run_name="{stage}", **_STAGE_TASK)
def run_stage(stage: str, gpu: bool, force: bool, devices: list[str], root: str,
              pull: bool = False, push: bool = False,
              extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """`dvc repro --single-item <stage>` in the workspace (inside a GPU slot for a GPU
    stage), its output streamed into this task's log; with `pull`/`push`, data and run
    cache come from / go to the DVC remote (several hosts)."""
    logger = get_run_logger()
    args = ["repro", "--single-item", *(["--pull"] if pull else []), *(["--force"] if force else []),
            stage]
    t0 = time.monotonic()
    with gpu_slot(devices, logger.info) if gpu else contextlib.nullcontext("-") as dev:
        env = stage_env(extra_env)
        if gpu and not dev.startswith("cpu"):
            env["CUDA_VISIBLE_DEVICES"] = dev
        t1 = time.monotonic()
        res = run_dvc(Path(root), args, env, logger.info)
        t2 = time.monotonic()
    raise_for(stage, res)
    if push:
        raise_for(stage, run_dvc(Path(root), ["push", "--run-cache", stage], stage_env(extra_env),
                                 logger.info), "dvc push")
    return {"stage": stage, "status": res.status, "wall_s": round(t2 - t1, 1),
            "waited_s": round(t1 - t0, 1), "gpu": dev, "host": host()}


_SUMMARY = re.compile(r"^(?P<stage>\S+) (?P<status>\w+) on (?P<host>\S+), device (?P<gpu>\S+), "
                      r"(?P<wall_s>[\d.]+) s")


def _summary(row: dict[str, Any]) -> str:
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
    res = run_dvc(Path(root), ["repro", "--pull", "--single-item", stage], stage_env(extra_env),
                  logger.info)
    raise_for(stage, res, "restoring from the run cache")
    if res.status == "ran":
        logger.warning("%s: not in the DVC remote's run cache, so it ran again here", stage)
    return {"stage": stage, "status": f"{row['status']} on {row['host']}, {res.status} here",
            "wall_s": float(row["wall_s"]), "waited_s": round(time.monotonic() - t0 - float(row["wall_s"]), 1),
            "gpu": row["gpu"], "host": row["host"]}


# --------------------------------------------------------------------------- the flow

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
    dag = read_dag(root)
    order = select(dag, targets)
    params_text = params_with(root, overrides) if overrides else None
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
        devices = slot_devices(_slot_limit())
    return Plan(root, dag, order, params_text, list(overrides), devices, commit)


def dispatched(st: Stage, distribute: bool) -> bool:
    """A distributed run sends a GPU stage to another host only if the run cache can bring
    all of it back (no `cache: false` outputs: those must already match the workspace for
    DVC to restore a stage; pretrain's git-tracked metrics stay on the coordinator)."""
    return distribute and st.gpu and not st.uncached


def _pipeline_outputs(dag: dict[str, Stage]) -> list[str]:
    return [p for s in dag.values() for p in s.uncached]


def _slot_limit() -> int:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    name = slot_limit_name()
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            raise ValueError(f"no GPU-slot limit {name!r} on the Prefect server: run "
                             f"`python -m pipeline.flows setup` on this host first") from None


def run_dag(plan: Plan, submit: Callable[[str, list], Any], log) -> dict[str, dict[str, Any]]:
    """Submit each stage once its upstream stages have completed (`submit(name, upstream
    futures)`: passed as `wait_for`, they draw DVC's edges in the UI's run graph); a failed
    stage's downstream stages are not run. Returns one row per stage, in DAG order."""
    rows: dict[str, dict[str, Any]] = {}
    waiting, running, futures = list(plan.order), {}, {}
    while waiting or running:
        for name in list(waiting):
            ups = plan.dag[name].upstream
            if any(rows.get(u, {}).get("status", "").startswith(("failed", "not run")) for u in ups):
                rows[name] = {"stage": name, "status": "not run (upstream failed)"}
                waiting.remove(name)
            elif all(u in rows for u in ups):
                futures[name] = submit(name, [futures[u] for u in ups])
                running[futures[name]] = name
                waiting.remove(name)
        if not running:
            continue
        done = next(as_completed(list(running)))
        name = running.pop(done)
        try:
            rows[name] = done.result()
        except Exception as e:  # noqa: BLE001 - the task's own error, reported as its row
            rows[name] = {"stage": name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            log(f"{name} failed: {e}")
    return {n: rows[n] for n in plan.order}


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


def _mlflow_link(parent: tracking.Tracker) -> tuple[str, str] | None:
    if not parent.run_id:
        return None
    uri = tracking.tracking_uri()
    exp = getattr(parent, "experiment_id", "0")
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{parent.run_id}", "MLflow parent run"
    # A file store has no web address of its own: this is where `mlflow ui` serves it.
    return (f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{parent.run_id}",
            f"MLflow parent run (serve with: mlflow ui --backend-store-uri {uri})")


def headline_table(root: Path) -> list[dict[str, Any]] | None:
    """The report's headline (baseline vs PC-GPT on `report.headline_metrics`), read from
    the results.csv the report stage wrote; None if there is no report."""
    import csv

    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    rep = params.get("report") or {}
    path = root / rep.get("out_dir", "reports") / "results.csv"
    if not path.is_file():
        return None
    with open(path, newline="", encoding="utf-8") as f:
        runs = {r["run"]: r for r in csv.DictReader(f) if r.get("source") == "pretrain"}
    names = [rep.get("baseline_run", "baseline"), rep.get("pcgpt_run", "pcgpt")]
    if not all(n in runs for n in names):
        return None
    return [{"metric": m, **{n: runs[n].get(m, "") for n in names}}
            for m in rep.get("headline_metrics", [])]


def publish(rows: dict[str, dict[str, Any]], root: Path, parent: tracking.Tracker,
            report_ran: bool) -> None:
    from prefect.artifacts import create_link_artifact, create_table_artifact

    table = [{"stage": r["stage"], "status": r["status"], "wall_s": r.get("wall_s", ""),
              "waited_s": r.get("waited_s", ""), "gpu": r.get("gpu", ""), "host": r.get("host", ""),
              "error": r.get("error", "")} for r in rows.values()]
    create_table_artifact(table, key="pcgpt-stages",
                          description="Stages of this run: DVC's verdict (ran / restored from the "
                                      "run cache / unchanged), seconds running and waiting for a "
                                      "GPU slot, the device and host.")
    head = headline_table(root) if report_ran else None
    if head:
        create_table_artifact(head, key="pcgpt-headline",
                              description="The report's headline: baseline GPT vs PC-GPT, final "
                                          "evaluation (reports/results.csv).")
    link = _mlflow_link(parent)
    if link:
        create_link_artifact(link[0], link_text=link[1], key="pcgpt-mlflow",
                             description="This pipeline execution in MLflow: the parent run, with "
                                         "every stage run as its child.")


def save_experiment(plan: Plan, name: str, log: Callable[[str], None]) -> None:
    """Record the workspace (params, dvc.lock, git-tracked metrics) as a DVC experiment, so
    `dvc exp show` lists the run without a commit on the branch.

    Only this run's stages are named: without targets `exp save` commits every stage as it
    is in the workspace (`dvc commit --force`), which would record a stage that did not run
    as matching params it never saw."""
    include = [p for s in plan.order for p in plan.dag[s].uncached if (plan.root / p).exists()]
    args = ["exp", "save", "--force", "-n", name, *[a for p in include for a in ("-I", p)],
            *plan.order]
    res = run_dvc(plan.root, args, stage_env(), log)
    if res.code != 0:
        raise RuntimeError(f"dvc exp save exited {res.code}: {res.tail[-1] if res.tail else ''}")


@contextlib.contextmanager
def params_applied(root: Path, text: str | None) -> Iterator[None]:
    """params.yaml holds `text` inside the block and its own content again after it."""
    if text is None:
        yield
        return
    path = root / "params.yaml"
    original = path.read_text(encoding="utf-8")
    write_text(path, text)
    try:
        yield
    finally:
        write_text(path, original)


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
                save_experiment(plan, _experiment_name(run_name, run_id), logger.info)
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
    with contextlib.suppress(Exception):  # housekeeping: never stops a run
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
            rows = run_dag(plan, submit, logger.error)
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
    devices = slot_devices(_slot_limit()) if dag[stage].gpu else []
    row = run_stage(stage, dag[stage].gpu, force, devices, str(root), push=True, extra_env=extra)
    return Completed(message=_summary(row))


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


# --------------------------------------------------------------------------- setup

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


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.flows",
                                 description="Prefect orchestration of the pcgpt pipeline.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="work pool, this host's GPU-slot limit, zombie automation")
    s.add_argument("--gpus", type=int, default=None,
                   help="slots of this host (default: the GPUs it sees, 1 on a CPU-only host)")
    s.add_argument("--zombie-after", type=int, default=ZOMBIE_AFTER_S, metavar="SECONDS",
                   help=f"mark runs Crashed after this long without a heartbeat (default {ZOMBIE_AFTER_S})")
    r = sub.add_parser("run", help="run the pipeline flow in this process (no worker)")
    r.add_argument("targets", nargs="*", help="stages or groups (default: all)")
    r.add_argument("-f", "--force", action="store_true")
    r.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="a params.yaml override, as in `dvc exp run -S`")
    r.add_argument("--distribute", action="store_true",
                   help=f"run GPU stages through {STAGE_DEPLOYMENT} on any host")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "setup":
            done = setup(args.gpus, args.zombie_after)
            print(f"work pool {done['work_pool']!r} (process); GPU-slot limit {done['slot_limit']!r} "
                  f"= {done['slots']}; automation {done['automation']!r} ({done['zombie_after_s']} s)")
            return 0
        state = pcgpt(targets=args.targets or None, force=args.force, overrides=args.overrides,
                      distribute=args.distribute, return_state=True)
    except ValueError as e:
        print(f"pipeline.flows: error: {e}", file=sys.stderr)
        return 2
    print(f"flow run {state.name}: {state.message or ''}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
