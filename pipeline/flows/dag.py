"""The pipeline as DVC sees it, and running its stages: everything that needs no Prefect.

Both runners build on this module: the Prefect flow (`pipeline.flows.flow`) and the local
runner (`pipeline.flows.local`), which must work on a GPU host that carries DVC and
nothing of Prefect or MLflow. So it imports neither (tests/pipeline/test_flows_local.py
checks it): only the standard library, `pipeline.io` and, inside the functions, DVC.

    read_dag / select     the DAG from DVC's index; targets and their upstream stages
    run_dag               submit each stage once its upstream stages finished
    run_dvc / raise_for   `python -m dvc --wait-for-lock <args>`; failures, lock errors apart
    first_free_device     a GPU slot: the first free per-device lock file of this host
    params_with           DVC `-S key=value` overrides, applied by DVC's own parser

GPU slots. A stage that depends on the model package (`model` in its DVC deps: it trains
or evaluates a model) runs on one device of its host, chosen by taking the first free
lock file (`fcntl.flock` in the temp dir, one per device and per slot of a device); the
kernel frees it when the holder dies, and a runner polls every SLOT_POLL_S, so a freed
GPU is taken within a quarter of a second. Runners of one host (a Prefect worker's flow
runs, a local run) share the files, so they never put two stages on one slot.
"""

from __future__ import annotations

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
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.io import write_text

GPU_DEP = "model"  # a stage depending on the model package trains or evaluates a model
ENV_WORKSPACE = "PCGPT_WORKSPACE"  # a host's clone, when it is not the deployment's directory
ENV_HOST = "PCGPT_HOST"  # the host name of GPU slots (tests run two "hosts" on one machine)
SLOT_POLL_S = 0.25
# A stage that failed on a DVC lock is run again after these pauses (then it fails).
LOCK_RETRY_DELAYS_S = (2, 5, 10)
# DVC exits 255 on every failure; these texts mark the ones another process's lock caused.
_LOCK_ERROR = re.compile(r"Unable to acquire lock|is busy, it is being blocked by|LockError")
# How DVC says what it did with a stage (dvc/stage/__init__.py, dvc/stage/run.py).
_STATUS_LINES = (("Running stage '", "ran"), ("is cached - skipping run", "restored"),
                 ("didn't change, skipping", "unchanged"))
_NOT_RUN = ("failed", "not run")  # row statuses whose downstream stages do not run


class StageFailed(RuntimeError):
    """`dvc repro` of a stage failed."""


class StageLockError(StageFailed):
    """DVC could not take a lock that another process holds: the stage is run again."""


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
    holder that has it (flow runs of both deployments, local and hand runs share it)."""
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
        # ties in dvc.yaml's order: every pretrain run (all its seeds, the longest stages)
        # is submitted, and takes a GPU slot, before the grid items that are ready with it
        pos = {s: i for i, s in enumerate(repo.index.stages)}
        order = [s for s in nx.lexicographical_topological_sort(graph.reverse(copy=False),
                                                                 key=lambda s: pos.get(s, -1))
                 if isinstance(s, PipelineStage)]
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


def run_dag(dag: dict[str, Stage], order: list[str], submit: Callable[[str, list], Any],
            next_done: Callable[[list], Any], log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Submit each stage of `order` once its upstream stages have completed; a failed
    stage's downstream stages are not run. Returns one row per stage, in DAG order.

    `submit(name, upstream futures)` starts the stage and returns a future whose result is
    its row (a dict with `stage` and `status`); `next_done(futures)` returns the next of
    them to finish. The Prefect flow passes task futures (the upstream ones become
    `wait_for`, drawing DVC's edges in the UI), the local runner thread-pool futures."""
    rows: dict[str, dict[str, Any]] = {}
    waiting, running, futures = list(order), {}, {}
    while waiting or running:
        for name in list(waiting):
            ups = dag[name].upstream
            if any(rows.get(u, {}).get("status", "").startswith(_NOT_RUN) for u in ups):
                rows[name] = {"stage": name, "status": "not run (upstream failed)"}
                waiting.remove(name)
            elif all(u in rows for u in ups):
                futures[name] = submit(name, [futures[u] for u in ups])
                running[futures[name]] = name
                waiting.remove(name)
        if not running:
            continue
        done = next_done(list(running))
        name = running.pop(done)
        try:
            rows[name] = done.result()
        except Exception as e:  # noqa: BLE001 - the stage's own error, reported as its row
            rows[name] = {"stage": name, "status": "failed", "error": f"{type(e).__name__}: {e}"}
            log(f"{name} failed: {e}")
    return {n: rows[n] for n in order}


# --------------------------------------------------------------------------- params

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


# --------------------------------------------------------------------------- dvc

@dataclasses.dataclass
class DvcResult:
    code: int
    status: str  # ran | restored | unchanged | failed
    tail: list[str]


def run_dvc(root: Path, args: list[str], env: dict[str, str], log: Callable[[str], None]) -> DvcResult:
    """`python -m dvc --wait-for-lock <args>` in `root`, each output line passed to `log`.

    Started in this process's group (no new session): a SIGTERM or Ctrl-C to the runner's
    group (a Prefect cancellation, a terminal) reaches DVC and the stage, which checkpoints."""
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


def repro_args(stage: str, force: bool = False, pull: bool = False) -> list[str]:
    """`dvc repro` of this one stage: `--single-item`, since a plain `dvc repro STAGE` also
    re-checks its upstream stages and two of those at once collide on their outputs."""
    return ["repro", "--single-item", *(["--pull"] if pull else []), *(["--force"] if force else []),
            stage]


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
    env["PYTHONUNBUFFERED"] = "1"  # stage output reaches the runner's log line by line
    env.update({k: v for k, v in (extra or {}).items() if v})
    return env


def save_experiment(root: Path, dag: dict[str, Stage], order: list[str], name: str,
                    log: Callable[[str], None]) -> None:
    """Record the workspace (params, dvc.lock, git-tracked metrics) as a DVC experiment, so
    `dvc exp show` lists the run without a commit on the branch.

    Only the run's stages are named: without targets `exp save` commits every stage as it
    is in the workspace (`dvc commit --force`), which would record a stage that did not run
    as matching params it never saw."""
    include = [p for s in order for p in dag[s].uncached if (root / p).exists()]
    args = ["exp", "save", "--force", "-n", name, *[a for p in include for a in ("-I", p)], *order]
    res = run_dvc(root, args, stage_env(), log)
    if res.code != 0:
        raise RuntimeError(f"dvc exp save exited {res.code}: {res.tail[-1] if res.tail else ''}")


# --------------------------------------------------------------------------- GPU slots

def host() -> str:
    return os.environ.get(ENV_HOST) or socket.gethostname()


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


class SlotWaitCancelled(RuntimeError):
    """The runner stopped while a stage waited for a GPU slot."""


@contextlib.contextmanager
def first_free_device(devices: list[str], per_device: int = 1,
                      stop: threading.Event | None = None) -> Iterator[str]:
    """Hold one of `per_device` slots of one of `devices` on this host; yield the device.

    A slot is an exclusive `fcntl.flock` on `<tmp>/pcgpt-gpu-slots/<host>-<device>.lock`
    (`...-<device>-<k>.lock` for the k-th extra slot of a device); the first slot of every
    device is tried before any second one, so stages spread over the devices. Polls until
    one is free, or raises SlotWaitCancelled once `stop` is set."""
    lock_dir = Path(tempfile.gettempdir()) / "pcgpt-gpu-slots"
    lock_dir.mkdir(exist_ok=True)
    slots = [(d, lock_dir / f"{host()}-{d}{f'-{k}' if k else ''}.lock")
             for k in range(max(1, per_device)) for d in devices]
    files = [open(path, "a") for _, path in slots]
    try:
        while True:
            for (dev, _), f in zip(slots, files):
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                try:
                    yield dev
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
                return
            if stop is None:
                time.sleep(SLOT_POLL_S)
            elif stop.wait(SLOT_POLL_S):
                raise SlotWaitCancelled("stopped while waiting for a GPU slot")
    finally:
        for f in files:
            f.close()
