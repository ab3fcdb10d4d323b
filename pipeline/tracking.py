"""MLflow tracking for stage runs: one interface, an MLflow tracker and a null one.

A stage wraps its work in one block and never asks whether tracking is on:

    cfg = load_section(TrackingConfig, "tracking")
    with tracking.stage_run("pretrain@baseline", params=train_cfg, config=cfg,
                            manifest="data/raw/shakespeare/manifest.json") as tracker:
        tracker.log_metrics({"train/loss": 3.1, "perf/step_ms": 41.0}, step=10)
        tracker.log_artifact("models/baseline/meta.json")

`stage_run` returns the MLflow tracker when tracking is enabled and the store
answers, and the null tracker otherwise (`tracking.enabled: false`, or an
unreachable tracking URI: one warning naming the URI and the error). Either
way the block runs; the stage's own JSON metrics never depend on tracking.

Where runs go
-------------
Tracking URI: `MLFLOW_TRACKING_URI` if set, else `sqlite:///mlflow.db` in the
current directory (the repo root under DVC), made absolute. For a SQLite
store the experiment is created with artifacts in `mlartifacts/` beside the
database; for a server, the server chooses. All stage runs go to the one
experiment named by `tracking.experiment`. Browse with
`mlflow ui --backend-store-uri sqlite:///mlflow.db`.

Every stage run is an MLflow run named after `DVC_STAGE` (the address DVC
exports to the stage's command, e.g. `pretrain@baseline`), or after the
`stage` argument when the stage runs outside DVC. Tags on every run:
`git.commit`, `git.dirty` (and MLflow's `mlflow.source.git.commit`),
`dvc.stage`, `dvc.dep.<path>` / `dvc.params.<file>` / `dvc.hashes_from`
(see `pipeline.provenance`), `data.manifest_sha256` (when a manifest is
given), `host`, `device`, `prefect.flow_run_id` (when `PREFECT__FLOW_RUN_ID`
is set), `prefect.flow_run_url` (when `PCGPT_FLOW_RUN_URL` is set: the Prefect flow
exports both) and `pcgpt.kind` (`stage` or `pipeline`).

How the runs of one pipeline execution find their parent
--------------------------------------------------------
Each stage run is a child of one parent run per pipeline execution, linked
by the `mlflow.parentRunId` tag (never by `MLFLOW_RUN_ID`, which would make
every stage log into the same run). The parent is chosen in this order:

1. `PCGPT_PARENT_RUN_ID` (an existing run id) wins. Whoever sets it owns
   that run: a Prefect flow opens it with `pipeline_run(...)`, which exports
   the variable to the `dvc repro` subprocesses it starts and ends the run
   itself; stage runs never change its status.
2. Otherwise the stage derives a *pipeline-execution key* from the nearest
   ancestor process whose command line is `dvc ...` or `python -m dvc ...`:
   `<host>:<pid>:<create_time>`. Every stage started by one `dvc repro` (or
   one `dvc exp run`) has that same ancestor, and no other process on any
   host has that key. Outside DVC the stage's own process is the key, so a
   stage run directly gets a parent of its own.
   The stage looks for a run tagged `pcgpt.pipeline_key = <key>` in the
   experiment and creates it (named `pipeline <start time of the dvc
   process>`) if there is none. The look-up-or-create happens under a host
   lock file (keyed by the tracking URI, in the temp dir); the key contains
   the host, so this lock suffices even when several stages of one
   execution start at once (`dvc exp run --jobs`, a queue). The same lock
   also serialises creating the SQLite schema and the experiment.
   Status of a derived parent: each stage start sets it RUNNING (unless an
   earlier stage failed); each stage end sets it FINISHED with a new end
   time, or to the stage's FAILED/KILLED status. So after `dvc repro` the
   parent is FINISHED if every stage succeeded, FAILED/KILLED otherwise,
   and its end time is the end of the last stage.

Failure
-------
The run's status is FINISHED, FAILED on an exception (the error is tagged as
`pcgpt.error` and re-raised), KILLED on KeyboardInterrupt; `SystemExit(0)`
counts as FINISHED. If the tracking store cannot be reached at the start
(probed with MLflow's HTTP retries off and a 3 s timeout) the block runs with
the null tracker. If it fails later (a server that dies mid-run, a full
disk), the first error becomes one warning and the tracker goes quiet for the
rest of the run. For HTTP stores `MLFLOW_HTTP_REQUEST_MAX_RETRIES` and
`MLFLOW_HTTP_REQUEST_TIMEOUT` default to 2 and 10 s in stage processes
(MLflow's own defaults retry for minutes), unless you set them.

Overhead
--------
`log_metrics` only appends (name, value, timestamp, step) tuples to an
in-memory deque (about a microsecond per metric); a background thread sends
them with `log_batch` once per `flush_interval_s`, up to 1000 per request,
and the run's end waits for the rest. We use our own thread rather than
MLflow's `synchronous=False` queue because that one submits a future and a
store call per `log_batch` call (one SQLite transaction per training step)
and logs an error for every failed batch; ours batches across steps and
turns the first failure into the single warning above. Pass Python numbers or
detached 0-d tensors; the thread converts the tensors of one batch with one
copy per device (not one synchronising `.item()` each), but that copy still
waits for the device's queued work, so a training loop should hand over numbers
it has already read back (stages/pretrain/progress.py copies its losses asynchronously
and logs them a log step later). The store's own cost is paid by that thread,
off the training step but not off the GIL: on a 2-core CPU box MLflow's SQLite
store spends about 5 ms per request plus 55-100 us per metric (SQLAlchemy).
A loop that keeps the GPU's queue a few steps ahead of it hides those bursts;
one that waits for the GPU at every log step pays them (measured: +4.4% of an
H200 step, BENCHMARKS.md). Log per-step metrics every few steps when steps are
short.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import psutil

from pipeline import provenance
from pipeline.params import flatten, load_section, to_dict

log = logging.getLogger(__name__)

ENV_PARENT_RUN_ID = "PCGPT_PARENT_RUN_ID"
ENV_PREFECT_FLOW_RUN_ID = "PREFECT__FLOW_RUN_ID"
ENV_FLOW_RUN_URL = "PCGPT_FLOW_RUN_URL"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACT_DIR = "mlartifacts"
TAG_PIPELINE_KEY = "pcgpt.pipeline_key"
TAG_KIND = "pcgpt.kind"
# MLflow 3's UI opens an experiment on the view its kind names (the GenAI overview when it
# has none and infers nothing); ours holds training runs. Values: mlflow/server/js ExperimentKind.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PROBE_TIMEOUT_S = 3
# HTTP limits for stage processes (MLflow's defaults: 7 retries, 120 s timeout).
RUNTIME_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# The longest the end of a run waits for queued metrics before giving up on them.
FLUSH_TIMEOUT_S = 60.0
_MAX_BATCH = 1000  # MLflow's limit on metrics per log_batch request
_MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value


@dataclasses.dataclass
class TrackingConfig:
    """`tracking` section of params.yaml. No stage lists it as a DVC param:
    tracking records results, it never changes them."""

    enabled: bool = True
    """false: every stage gets the null tracker (nothing is recorded)."""
    experiment: str = "pcgpt"
    """The MLflow experiment holding every stage run and parent run."""
    registered_model: str = "pcgpt"
    """Model registry name; a stage registering several models appends the run
    name (`pcgpt-baseline`, `pcgpt-pcgpt`)."""
    model_alias: str = "newest"
    """Alias moved to each newly registered model version."""
    flush_interval_s: float = 1.0
    """How often the background thread sends queued metrics."""

    def __post_init__(self) -> None:
        for name in ("experiment", "registered_model", "model_alias"):
            if not getattr(self, name).strip():
                raise ValueError(f"{name}: must not be empty")
        if not self.flush_interval_s > 0:
            raise ValueError(f"flush_interval_s: must be > 0, got {self.flush_interval_s}")


SECTIONS = ("tracking",)


def check_params(params: dict[str, Any]) -> None:
    """The `tracking` section (pipeline.params.check_file, and every stage at start-up)."""
    load_section(TrackingConfig, "tracking", params=params)


# --------------------------------------------------------------------------- interface

class Tracker:
    """What a stage may record. This base class is the null tracker: it records nothing."""

    run_id: str | None = None
    parent_run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue metrics at `step` (never blocks on I/O)."""

    def log_params(self, params: Any) -> None:
        """Log a dataclass or (nested) dict, flattened to `a.b.c` keys."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values become strings; None values are skipped)."""

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *,
                     to_parent: bool = False) -> None:
        """Upload a file or a whole folder under `artifact_path` (into the parent run
        with `to_parent=True`, e.g. the pipeline's report)."""

    def log_dict(self, obj: Mapping[str, Any], artifact_file: str) -> None:
        """Store a dict as JSON/YAML (by the suffix of `artifact_file`)."""

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store text as an artifact file."""

    def log_pyfunc_model(self, python_model: Any, artifacts: Mapping[str, str], name: str,
                         registered_name: str, alias: str = "newest",
                         code_paths: list[str] | None = None,
                         pip_requirements: list[str] | None = None,
                         signature: Any = None, input_example: Any = None) -> str | None:
        """Log an `mlflow.pyfunc.PythonModel` (or the path of a models-from-code file, which
        MLflow runs to load the model), register a new version of `registered_name` and point
        `alias` at it. `signature` may be a function that builds it: called only here, by a
        tracker that logs. Returns `models:/<registered_name>@<alias>` (None here)."""
        return None

    def flush(self) -> None:
        """Wait until queued metrics are stored."""

    def end(self, status: str = "FINISHED") -> None:
        """Flush and end the run (FINISHED, FAILED or KILLED). `stage_run` calls it."""


NullTracker = Tracker


class _MetricPump:
    """Background thread that sends queued metrics in batches (see module docstring)."""

    def __init__(self, send, interval_s: float, on_error) -> None:
        self._send, self._interval, self._on_error = send, interval_s, on_error
        self._queue: collections.deque = collections.deque()
        self._queued = 0  # metrics put (single producer: the stage's thread)
        self._done = 0  # metrics sent or dropped
        self._cond = threading.Condition()
        self._wake = threading.Event()
        self._stopping = False
        self.failed = False
        self._thread = threading.Thread(target=self._loop, name="pcgpt-mlflow-metrics",
                                        daemon=True)
        self._thread.start()

    def put(self, metrics: Mapping[str, Any], step: int) -> None:
        ts = int(time.time() * 1000)
        append = self._queue.append
        for key, value in metrics.items():
            append((key, value, ts, step))
        self._queued += len(metrics)

    def _loop(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            stopping = self._stopping
            self._drain()
            if stopping:
                return

    def _drain(self) -> None:
        from mlflow.entities import Metric

        # Only what is queued now: a producer that keeps appending must not turn
        # this into a busy loop of tiny requests.
        left = len(self._queue)
        while left:
            batch = [self._queue.popleft() for _ in range(min(left, _MAX_BATCH))]
            left -= len(batch)
            if not self.failed:
                try:
                    values = _floats([v for _, v, _, _ in batch])
                    self._send([Metric(k, v, ts, int(s)) for (k, _, ts, s), v in zip(batch, values)])
                except Exception as e:  # noqa: BLE001 - any store error: warn once, go quiet
                    self.failed = True
                    self._on_error("logging metrics", e)
            with self._cond:
                self._done += len(batch)
                self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is sent or dropped; False on timeout."""
        target = self._queued
        self._wake.set()
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float) -> bool:
        ok = self.flush(timeout)
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=1.0 if ok else 0.0)
        return ok


def _floats(values: list[Any]) -> list[float]:
    """`float(v)` of every value, with the torch tensors among them read back in one copy
    per device (a `float()` of a CUDA tensor synchronises the stream, once per metric)."""
    torch = sys.modules.get("torch")  # only a stage that imported torch can pass tensors
    if torch is None:
        return [float(v) for v in values]
    out: list[Any] = list(values)
    by_device: dict[Any, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_device.setdefault(v.device, []).append(i)
        else:
            out[i] = float(v)
    for idx in by_device.values():
        host = torch.stack([values[i].detach().reshape(()).double() for i in idx]).cpu().tolist()
        for i, x in zip(idx, host):
            out[i] = x
    return out


class MlflowTracker(Tracker):
    """Records into one MLflow run; every store error turns it into the null tracker."""

    def __init__(self, client: Any, tracking_uri: str, experiment_id: str, run_id: str,
                 parent_run_id: str | None, manage_parent: bool, flush_interval_s: float) -> None:
        self.client, self.tracking_uri, self.experiment_id = client, tracking_uri, experiment_id
        self.run_id, self.parent_run_id = run_id, parent_run_id
        self._manage_parent = manage_parent
        self._dead = False
        self._ended = False
        self._warn_lock = threading.Lock()
        self._pump = _MetricPump(lambda ms: client.log_batch(run_id, metrics=ms, synchronous=True),
                                 flush_interval_s, self._disable)

    def _disable(self, what: str, err: BaseException) -> None:
        with self._warn_lock:
            if self._dead:
                return
            self._dead = True
        log.warning("MLflow tracking at %s failed while %s: %s: %s. Tracking is off for the "
                    "rest of run %s; the stage continues and its own metrics files are complete.",
                    self.tracking_uri, what, type(err).__name__, err, self.run_id)

    def _guard(self, what: str, fn, *args: Any, **kwargs: Any) -> Any:
        if self._dead:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - tracking must never stop a stage
            self._disable(what, e)
            return None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        if not self._dead:
            self._pump.put(metrics, step)

    def log_params(self, params: Any) -> None:
        from mlflow.entities import Param

        flat = _flatten_params(params)
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow's limit on params per request
            self._guard("logging params", self.client.log_batch, self.run_id,
                        params=items[i:i + 100], synchronous=True)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items() if v is not None]
        for i in range(0, len(items), 100):
            self._guard("setting tags", self.client.log_batch, self.run_id,
                        tags=items[i:i + 100], synchronous=True)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, *,
                     to_parent: bool = False) -> None:
        run_id = self.parent_run_id if to_parent else self.run_id
        if run_id is None:
            return
        fn = self.client.log_artifacts if Path(path).is_dir() else self.client.log_artifact
        self._guard(f"uploading {path}", fn, run_id, str(path), artifact_path)

    def log_dict(self, obj: Mapping[str, Any], artifact_file: str) -> None:
        self._guard(f"uploading {artifact_file}", self.client.log_dict, self.run_id,
                    dict(obj), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._guard(f"uploading {artifact_file}", self.client.log_text, self.run_id, text,
                    artifact_file)

    def log_pyfunc_model(self, python_model: Any, artifacts: Mapping[str, str], name: str,
                         registered_name: str, alias: str = "newest",
                         code_paths: list[str] | None = None,
                         pip_requirements: list[str] | None = None,
                         signature: Any = None, input_example: Any = None) -> str | None:
        return self._guard(f"logging model {registered_name}", self._log_pyfunc_model,
                           python_model, dict(artifacts), name, registered_name, alias,
                           code_paths, pip_requirements, signature, input_example)

    def _log_pyfunc_model(self, python_model, artifacts, name, registered_name, alias,
                          code_paths, pip_requirements, signature, input_example) -> str:
        import mlflow
        import mlflow.pyfunc
        from mlflow.models import Model

        # Model.log takes the run explicitly, but takes the tracking URI and the
        # experiment of the logged-model entity from MLflow's process-wide state.
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(experiment_id=self.experiment_id)
        if callable(signature):
            signature = signature()
        info = Model.log(
            artifact_path=None, name=name, flavor=mlflow.pyfunc, python_model=python_model, artifacts=artifacts,
            code_paths=code_paths, registered_model_name=registered_name, run_id=self.run_id,
            pip_requirements=pip_requirements or default_pip_requirements(),
            signature=signature, input_example=input_example,
            flavor_name=mlflow.pyfunc._get_pyfunc_model_flavor_name(python_model))
        version = str(info.registered_model_version)
        self.client.set_registered_model_alias(registered_name, alias, version)
        self.client.set_model_version_tag(registered_name, version, "mlflow.source.run_id",
                                          self.run_id)
        return f"models:/{registered_name}@{alias}"

    def flush(self) -> None:
        if not self._dead and not self._pump.flush(FLUSH_TIMEOUT_S):
            self._disable("flushing metrics",
                          TimeoutError(f"metrics still queued after {FLUSH_TIMEOUT_S:.0f} s"))

    def end(self, status: str = "FINISHED") -> None:
        if self._ended:
            return
        self._ended = True
        if not self._pump.close(FLUSH_TIMEOUT_S):
            self._disable("flushing metrics",
                          TimeoutError(f"metrics still queued after {FLUSH_TIMEOUT_S:.0f} s"))
        self._guard("ending the run", self.client.set_terminated, self.run_id, status)
        if self._manage_parent and self.parent_run_id:
            self._guard("updating the parent run", _parent_after_child, self.client,
                        self.parent_run_id, status)


def _flatten_params(params: Any) -> dict[str, str]:
    if params is None:
        return {}
    d = to_dict(params) if dataclasses.is_dataclass(params) else to_dict(dict(params))
    return {k: str(v)[:_MAX_PARAM_CHARS] for k, v in flatten(d).items()}


def default_pip_requirements() -> list[str]:
    """Pinned requirements of a logged model: mlflow plus the libraries already imported
    that a model of this project needs (skips MLflow's slow requirement inference)."""
    from importlib import metadata

    reqs = []
    for dist, module in (("mlflow", "mlflow"), ("torch", "torch"), ("numpy", "numpy"),
                         ("tiktoken", "tiktoken"), ("safetensors", "safetensors"),
                         ("cloudpickle", "cloudpickle")):
        if module in sys.modules or dist in ("mlflow", "cloudpickle"):
            try:
                reqs.append(f"{dist}=={metadata.version(dist)}")
            except metadata.PackageNotFoundError:
                pass
    return reqs


# --------------------------------------------------------------------------- environment

def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the cwd; relative SQLite paths
    made absolute (so a later chdir cannot move the store)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def artifact_location(uri: str) -> str | None:
    """`mlartifacts/` beside a SQLite database; None (the server's choice) otherwise."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        return (Path(uri[len(prefix):]).resolve().parent / ARTIFACT_DIR).as_uri()
    return None


def _is_dvc_cmdline(cmd: list[str]) -> bool:
    if not cmd:
        return False
    exe = os.path.basename(cmd[0])
    if exe == "dvc":
        return True
    if exe.startswith("python"):
        args = [a for a in cmd[1:] if a not in ("-u", "-B", "-E", "-s", "-I")]
        return args[:2] == ["-m", "dvc"] or (bool(args) and os.path.basename(args[0]) == "dvc")
    return False


def pipeline_process() -> psutil.Process:
    """The nearest ancestor `dvc` process, or this process when not run by DVC."""
    proc = psutil.Process()
    try:
        for ancestor in proc.parents():
            try:
                if _is_dvc_cmdline(ancestor.cmdline()):
                    return ancestor
            except (psutil.AccessDenied, psutil.ZombieProcess):
                continue
    except psutil.Error:
        pass
    return proc


def pipeline_key(proc: psutil.Process | None = None) -> str:
    """`<host>:<pid>:<create_time>` of the pipeline process (see module docstring)."""
    proc = proc or pipeline_process()
    return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.3f}"


def device_name() -> str:
    """The CUDA device name if this process uses torch with CUDA, else 'cpu'.

    Only looks at torch if the stage already imported it: a stage that never
    imported torch (download) ran on the CPU, and importing it costs seconds.
    """
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # noqa: BLE001 - a broken driver is still "not a GPU run"
        pass
    return "cpu"


def _common_tags(root: Path) -> dict[str, str]:
    git = provenance.git_state(root)
    tags = {"host": socket.gethostname(),
            "prefect.flow_run_id": os.environ.get(ENV_PREFECT_FLOW_RUN_ID),
            "prefect.flow_run_url": os.environ.get(ENV_FLOW_RUN_URL)}
    if git["commit"]:
        tags.update({"git.commit": git["commit"], "mlflow.source.git.commit": git["commit"],
                     "git.dirty": str(git["dirty"]).lower()})
    return {k: v for k, v in tags.items() if v is not None}


@contextlib.contextmanager
def _host_lock(name: str) -> Iterator[None]:
    """An exclusive lock shared by every process on this host that uses `name`."""
    import fcntl

    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"pcgpt-tracking-{digest}.lock"
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _QuietMlflowRetries(logging.Filter):
    """Drops urllib3's per-retry warnings for MLflow API calls: a failing store is
    reported once, by the tracker, with the final error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Retrying")
                    and "/api/2.0/mlflow" in record.getMessage())


_QUIET_RETRIES = _QuietMlflowRetries()


def _runtime_http_setup() -> None:
    """Bounded HTTP retries for the rest of the process (unless set) and quiet retries."""
    for k, v in RUNTIME_HTTP_LIMITS.items():
        os.environ.setdefault(k, v)
    logging.getLogger("urllib3.connectionpool").addFilter(_QUIET_RETRIES)  # idempotent


@contextlib.contextmanager
def _http_limits(limits: Mapping[str, str], override: bool) -> Iterator[None]:
    """Set MLflow's HTTP retry/timeout env vars (read per request); restore afterwards."""
    saved = {k: os.environ.get(k) for k in limits}
    for k, v in limits.items():
        if override or k not in os.environ:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --------------------------------------------------------------------------- runs

def _experiment_id(client: Any, name: str, uri: str) -> str:
    """The experiment `name`, created (or restored) if needed, tagged as a training experiment
    where it carries no kind yet."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location(uri),
                                            tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND})
        except MlflowException:  # created meanwhile by another host
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    if TAG_EXPERIMENT_KIND not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return exp.experiment_id


def _find_or_create_parent(client: Any, experiment_id: str, common: dict[str, str]) -> str:
    proc = pipeline_process()
    key = pipeline_key(proc)
    runs = client.search_runs([experiment_id], f"tags.`{TAG_PIPELINE_KEY}` = '{key}'",
                              max_results=1, order_by=["attributes.start_time ASC"])
    if runs:
        return runs[0].info.run_id
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(proc.create_time()))
    try:
        launcher = " ".join(proc.cmdline())[:500]
    except psutil.Error:
        launcher = ""
    tags = {**common, TAG_PIPELINE_KEY: key, TAG_KIND: "pipeline", "pcgpt.launcher": launcher}
    return client.create_run(experiment_id, run_name=f"pipeline {started}", tags=tags).info.run_id


def _parent_before_child(client: Any, parent_id: str) -> None:
    if client.get_run(parent_id).info.status == "FINISHED":
        client.update_run(parent_id, status="RUNNING")


def _parent_after_child(client: Any, parent_id: str, child_status: str) -> None:
    parent = client.get_run(parent_id).info.status
    if child_status != "FINISHED":
        status = child_status
    else:
        status = parent if parent in ("FAILED", "KILLED") else "FINISHED"
    client.set_terminated(parent_id, status)


def _open_mlflow(stage: str, run_name: str, config: TrackingConfig, uri: str,
                 tags: dict[str, str]) -> MlflowTracker:
    """Connect, find the experiment and parent, create the child run. Raises on any error."""
    from mlflow.tracking import MlflowClient

    root = Path.cwd()
    common = _common_tags(root)
    with _host_lock(uri):
        client = MlflowClient(tracking_uri=uri)  # creates a missing SQLite schema: under the lock
        experiment_id = _experiment_id(client, config.experiment, uri)
        parent_id, manage_parent = os.environ.get(ENV_PARENT_RUN_ID) or None, False
        if parent_id:
            try:
                client.get_run(parent_id)
            except Exception as e:  # noqa: BLE001
                log.warning("%s=%s is not a run in %s (%s); using this pipeline's own parent",
                            ENV_PARENT_RUN_ID, parent_id, uri, e)
                parent_id = None
        if not parent_id:
            parent_id, manage_parent = _find_or_create_parent(client, experiment_id, common), True
    if manage_parent:
        _parent_before_child(client, parent_id)
    all_tags = {**common, **provenance.stage_hashes(stage, root), **tags,
                "mlflow.parentRunId": parent_id, TAG_KIND: "stage"}
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={k: str(v) for k, v in all_tags.items() if v is not None})
    return MlflowTracker(client, uri, experiment_id, run.info.run_id, parent_id, manage_parent,
                         config.flush_interval_s)


def open_stage_run(stage: str, params: Any = None, config: TrackingConfig | None = None,
                   tags: Mapping[str, Any] | None = None,
                   manifest: str | Path | None = None, device: str | None = None) -> Tracker:
    """Start the tracked run of `stage`; end it with `tracker.end(status)`.

    Prefer `stage_run`, which also sets the status from the block's outcome.
    Returns the null tracker if tracking is disabled or the store cannot be
    reached (one warning). `config` defaults to the `tracking` section of
    ./params.yaml.
    """
    config = config or load_section(TrackingConfig, "tracking")
    if not config.enabled:
        return NullTracker()
    dvc_stage = os.environ.get("DVC_STAGE")
    run_tags = {"dvc.stage": dvc_stage, "device": device or device_name(),
                "data.manifest_sha256": provenance.manifest_sha256(manifest),
                **(tags or {})}
    uri = tracking_uri()
    probe = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}
    try:
        with _http_limits(probe, override=True):
            tracker = _open_mlflow(dvc_stage or stage, dvc_stage or stage, config, uri,
                                   run_tags)
    except Exception as e:  # noqa: BLE001 - an unreachable store never stops a stage
        log.warning("MLflow tracking at %s is unavailable (%s: %s); %s runs without "
                    "tracking, its own metrics files are complete.",
                    uri, type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                    dvc_stage or stage)
        return NullTracker()
    _runtime_http_setup()
    tracker.log_params(params)
    return tracker


@contextlib.contextmanager
def _ending(tracker: Tracker) -> Iterator[Tracker]:
    status = "FINISHED"
    try:
        yield tracker
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except SystemExit as e:
        status = "FINISHED" if e.code in (None, 0) else "FAILED"
        raise
    except BaseException as e:
        status = "FAILED"
        tracker.set_tags({"pcgpt.error": f"{type(e).__name__}: {e}"[:5000]})
        raise
    finally:
        tracker.end(status)


@contextlib.contextmanager
def stage_run(stage: str, params: Any = None, config: TrackingConfig | None = None,
              tags: Mapping[str, Any] | None = None, manifest: str | Path | None = None,
              device: str | None = None) -> Iterator[Tracker]:
    """Track the block as one stage run (see the module docstring).

    stage: the stage's DVC address (`pretrain@baseline`); `DVC_STAGE` takes
        precedence when set. Names the run and finds the `dvc.lock` entry.
    params: the stage's config dataclass (or a dict), logged flattened.
    config: the `tracking` section; default: loaded from ./params.yaml.
    tags: extra tags. manifest: path of the data manifest whose sha256 is
        tagged. device: overrides the detected device name.
    """
    with _ending(open_stage_run(stage, params, config, tags, manifest, device)) as tracker:
        yield tracker


@contextlib.contextmanager
def pipeline_run(name: str | None = None, config: TrackingConfig | None = None,
                 tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
    """Open a parent run for a whole pipeline execution driven from Python (a Prefect flow).

    Exports `PCGPT_PARENT_RUN_ID` to this process's environment (so `dvc repro`
    subprocesses started inside the block attach their stage runs to it),
    restores it afterwards, and ends the parent with the block's outcome.
    """
    config = config or load_section(TrackingConfig, "tracking")
    tracker: Tracker = NullTracker()
    if config.enabled:
        uri = tracking_uri()
        try:
            from mlflow.tracking import MlflowClient

            with _http_limits({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                               "MLFLOW_HTTP_REQUEST_TIMEOUT": str(PROBE_TIMEOUT_S)}, True):
                with _host_lock(uri):
                    client = MlflowClient(tracking_uri=uri)
                    experiment_id = _experiment_id(client, config.experiment, uri)
                run_tags = {**_common_tags(Path.cwd()), **(tags or {}), TAG_KIND: "pipeline"}
                run = client.create_run(
                    experiment_id, run_name=name or time.strftime("pipeline %Y-%m-%d %H:%M:%S"),
                    tags={k: str(v) for k, v in run_tags.items() if v is not None})
            tracker = MlflowTracker(client, uri, experiment_id, run.info.run_id, None, False,
                                    config.flush_interval_s)
            _runtime_http_setup()
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow tracking at %s is unavailable (%s: %s); the pipeline runs "
                        "without tracking.", uri, type(e).__name__, e)
    saved = os.environ.get(ENV_PARENT_RUN_ID)
    if tracker.run_id:
        os.environ[ENV_PARENT_RUN_ID] = tracker.run_id
    try:
        with _ending(tracker):
            yield tracker
    finally:
        if saved is None:
            os.environ.pop(ENV_PARENT_RUN_ID, None)
        else:
            os.environ[ENV_PARENT_RUN_ID] = saved


__all__ = ["TrackingConfig", "Tracker", "NullTracker", "MlflowTracker", "stage_run",
           "open_stage_run", "pipeline_run", "tracking_uri", "artifact_location",
           "pipeline_process", "pipeline_key", "device_name", "default_pip_requirements",
           "ENV_PARENT_RUN_ID", "ENV_PREFECT_FLOW_RUN_ID", "ENV_FLOW_RUN_URL", "TAG_PIPELINE_KEY",
           "TAG_KIND"]
