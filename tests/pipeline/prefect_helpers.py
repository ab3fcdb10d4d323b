"""A real Prefect server, workers and tiny pcgpt workspaces for the orchestration tests.

Everything runs as separate processes started with `start_new_session=True` (a process
group of its own, so SIGTERM stops it: background jobs of a non-interactive shell would
ignore it) and is stopped by the tests themselves; `leftovers` finds anything that
outlived a test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import psutil

from pipeline.params import deep_merge
from tests.conftest import PROJECT_FILES, ROOT, Project

# The tiny profile: synthetic source, char tokenizer, 2-layer models, one seed, a 2x1
# ablation grid; the runs are the repository's (the headline's four).
TINY = {
    "seeds": [0],
    "data": {"source": "synthetic", "catalog": {"synthetic": {"n_docs": 200, "min_len": 4, "max_len": 16}}},
    "tokenizer": {"kind": "char"},
    "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "train": {"steps": 12, "micro_batch": 4, "warmup_steps": 2, "eval_every": 6, "eval_batches": 2,
              "log_every": 6, "save_every": 6, "sample_tokens": 8, "threads": 1},
    "runs": {"pcgpt": {"pc": {"settle_steps": 2}}, "pc_dot": {"pc": {"settle_steps": 2}}},
}
TINY_GRID = {
    "variants": {
        "settle_T1": {"question": "settling", "override": {"pc": {"settle_steps": 1}}},
        "bp": {"question": "algorithm", "override": {"pc": {"algorithm": "bp"}}},
    },
}
TINY_STAGES = {"download", "tokenizer", "pretrain@baseline", "pretrain@bp_gaussian", "pretrain@pc_dot",
               "pretrain@pcgpt", "ablate@settle_T1-0", "ablate@bp-0", "report"}
ARTIFACTS = ROOT / "test-artifacts" / "prefect"


def tiny_params(base: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The repository's params `base` on the tiny profile (its ablation grid replaced by
    TINY_GRID), then `extra` merged in."""
    tiny = deep_merge({k: v for k, v in base.items() if k != "ablation"},
                      {**TINY, "ablation": {**base["ablation"], **TINY_GRID}})
    return deep_merge(tiny, extra or {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Proc:
    """A process in a session of its own, with its output in a log file."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str], log: Path):
        self.args, self.log = args, log
        self._out = open(log, "ab")
        self.popen = subprocess.Popen(args, cwd=cwd, env=env, stdout=self._out,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM to its process group, SIGKILL if it is still there after `timeout`."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._out.close()

    def kill(self) -> None:
        """SIGKILL the process alone (its children, e.g. flow runs, keep running)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


class PrefectServer:
    """`prefect server start` on a free loopback port with its own PREFECT_HOME."""

    def __init__(self, home: Path):
        self.home = home
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.ui = f"http://127.0.0.1:{self.port}"
        self.env = {
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "1",      # 10 s by default: trigger -> start latency
            "PREFECT_WORKER_PREFETCH_SECONDS": "1",
            "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.5",
            "PREFECT_CLI_COLORS": "false",
            "PREFECT_CLI_WRAP_LINES": "false",
        }
        home.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env, "PREFECT_UI_API_URL": self.url}
        self.proc = Proc([str(Path(sys.executable).parent / "prefect"), "server", "start",
                          "--host", "127.0.0.1", "--port", str(self.port)],
                         home, env, home / "server.log")
        wait_for("the Prefect server", self._healthy, 120, every=0.5)

    def _healthy(self) -> bool:
        import urllib.request

        if self.proc.popen.poll() is not None:
            raise AssertionError(f"prefect server exited {self.proc.popen.returncode}:\n{self.proc.tail()}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def settings(self):
        """This test process talks to the server (Prefect reads its settings at import)."""
        from prefect.settings import (PREFECT_API_URL, PREFECT_HOME,
                                      PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings)

        return temporary_settings({PREFECT_API_URL: self.url, PREFECT_HOME: str(self.home),
                                   PREFECT_SERVER_ANALYTICS_ENABLED: False})

    def client(self):
        from prefect.client.orchestration import get_client

        return get_client(sync_client=True)

    def stop(self) -> None:
        self.proc.stop()


class Workspace(Project):
    """A tiny pcgpt workspace: the repository's code, dvc.yaml, prefect.yaml and the tiny
    params profile, in its own git + DVC repo, with Prefect settings for `server`."""

    def __init__(self, path: Path, server: PrefectServer, host: str | None = None):
        super().__init__(path)
        self.server = server
        self.env.update(server.env)
        self.env.pop("CUDA_VISIBLE_DEVICES", None)
        if host:
            self.env["PCGPT_HOST"] = host
        self.workers: list[Proc] = []

    @classmethod
    def create(cls, path: Path, server: PrefectServer, params: dict[str, Any] | None = None,
               host: str | None = None, tiny: bool = True) -> "Workspace":
        """A workspace on the tiny profile (`tiny=False`: the repository's own params)."""
        path.mkdir(parents=True)
        for name in [*PROJECT_FILES, "prefect.yaml", ".gitignore"]:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, path / name)
        ws = cls(path, server, host=host)
        if tiny:
            ws.set_params(tiny_params(ws.params, params), replace=("ablation",))
        elif params:
            ws.set_params(params)
        ws.run("git", "init", "-q")
        ws.dvc("init", "-q")
        ws.dvc("config", "core.analytics", "false")
        ws.commit("tiny pcgpt workspace")
        return ws

    def flows(self, *args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "pipeline.flows", *args, check=check, timeout=timeout)

    def deploy(self) -> None:
        self.run(str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all",
                 timeout=300)

    def start_worker(self, limit: int | None = None, env: dict[str, str] | None = None,
                     name: str = "worker") -> Proc:
        args = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "gpu",
                "--name", f"{name}-{self.path.name}"]
        if limit:
            args += ["--limit", str(limit)]
        w = Proc(args, self.path, {**self.env, **(env or {})}, self.path.parent / f"{name}.log")
        self.workers.append(w)
        return w

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers.clear()


def run_deployment(server: PrefectServer, name: str, parameters: dict[str, Any] | None = None,
                   job_variables: dict[str, Any] | None = None):
    """Create a run of deployment `name` (the worker picks it up); returns the flow run."""
    from prefect.deployments import run_deployment as run

    with server.settings():
        return run(name, parameters=parameters or {}, job_variables=job_variables, timeout=0,
                   as_subflow=False)


def flow_run(server: PrefectServer, run_id):
    with server.settings(), server.client() as c:
        return c.read_flow_run(run_id)


def wait_final(server: PrefectServer, run_id, timeout: float, workers: list[Proc] = ()):
    """Wait until the flow run is in a final state; returns it."""
    def check():
        for w in workers:
            if w.popen.poll() is not None and w.popen.returncode not in (0, -9):
                raise AssertionError(f"worker exited {w.popen.returncode}:\n{w.tail()}")
        fr = flow_run(server, run_id)
        return fr if fr.state and fr.state.is_final() else None
    return wait_for(f"flow run {run_id} to finish", check, timeout, every=1.0)


def logs(server: PrefectServer, run_id) -> list[Any]:
    """Every log record of a flow run and its task runs, oldest first."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    out, offset = [], 0
    with server.settings(), server.client() as c:
        while True:
            page = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])),
                               sort=LogSort.TIMESTAMP_ASC, limit=200, offset=offset)
            out += page
            offset += len(page)
            if len(page) < 200:
                return out


def log_text(server: PrefectServer, run_id) -> str:
    return "\n".join(r.message for r in logs(server, run_id))


def artifacts(server: PrefectServer, run_id) -> dict[str, Any]:
    """The flow run's artifacts by key."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with server.settings(), server.client() as c:
        arts = c.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a for a in arts}


def table(artifact) -> list[dict[str, Any]]:
    """The rows of a table artifact."""
    import json

    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def quiet_nightly(server: PrefectServer) -> None:
    """Pause `pcgpt/nightly` and delete its scheduled runs, so no cron run starts mid-test."""
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    with server.settings(), server.client() as c:
        dep = c.read_deployment_by_name("pcgpt/nightly")
        c.pause_deployment(dep.id)
        for fr in c.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": [dep.id]}),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))):
            c.delete_flow_run(fr.id)


def leftovers(root: Path) -> list[psutil.Process]:
    """Processes (not this one) whose working directory is inside `root`."""
    found = []
    for p in psutil.process_iter(["pid", "cwd"]):
        try:
            cwd = p.info["cwd"]
        except psutil.Error:
            continue
        if p.pid != os.getpid() and cwd and Path(cwd).is_relative_to(root):
            found.append(p)
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=10)
