"""MLflow tracking against real stores: SQLite in tmp_path, a real `mlflow server` on
127.0.0.1, real `dvc repro` in a project copy. Everything is read back through
MlflowClient."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.tracking import TrackingConfig

ROOT = Path(__file__).resolve().parents[2]
CFG = TrackingConfig(experiment="pcgpt-test", registered_model="pcgpt-test",
                     flush_interval_s=0.2)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with its schema and nothing else, made once: creating the
    schema (MLflow's migrations) takes seconds on a busy 2-core box, copying it milliseconds."""
    db = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_store: Path) -> MlflowClient:
    """A fresh SQLite store; the cwd is tmp_path (as the repo root is under DVC)."""
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(empty_store, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for var in ("DVC_STAGE", tracking.ENV_PARENT_RUN_ID, tracking.ENV_PREFECT_FLOW_RUN_ID):
        monkeypatch.delenv(var, raising=False)
    return MlflowClient(tracking.tracking_uri())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Inner:
    width: int = 8
    kernel: str = "gaussian"


@dataclasses.dataclass
class StageCfg:
    lr: float = 3e-4
    layers: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    attn: Inner = dataclasses.field(default_factory=Inner)


def test_stage_run_records_params_stepped_metrics_tags_and_artifacts(store, tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q"], check=True)
    Path("f.txt").write_text("v1\n")
    subprocess.run(["git", "add", "f.txt"], check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "commit",
                    "-q", "-m", "x"], check=True)
    Path("f.txt").write_text("v2\n")  # a tracked change: dirty
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"files": {"a.txt": "00"}}))
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "vocab.txt").write_text("a b c")
    monkeypatch.setenv("PREFECT__FLOW_RUN_ID", "flow-123")

    with tracking.stage_run("demo@x", params=StageCfg(), config=CFG, tags={"extra": 7},
                            manifest=manifest) as tr:
        assert isinstance(tr, tracking.MlflowTracker)
        for step in range(5):
            tr.log_metrics({"train/loss": 5.0 - step, "perf/step_ms": 10.0}, step=step * 10)
        tr.log_metrics({"val/loss": 4.5}, step=40)
        tr.log_artifact(tmp_path / "meta.json")
        tr.log_artifact(tmp_path / "tok", artifact_path="tokenizer")
        tr.log_dict({"k": 1}, "summary.json")
        tr.log_text("hello", "samples/s0.txt")
        tr.set_tags({"late": "yes"})
        tr.log_artifact(tmp_path / "meta.json", "report", to_parent=True)

    run = store.get_run(tr.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "demo@x"
    assert run.data.params == {"lr": "0.0003", "layers": "[1, 2]", "attn.width": "8",
                               "attn.kernel": "gaussian"}
    hist = store.get_metric_history(tr.run_id, "train/loss")
    assert [(m.step, m.value) for m in hist] == [(s * 10, 5.0 - s) for s in range(5)]
    assert [m.step for m in store.get_metric_history(tr.run_id, "val/loss")] == [40]
    tags = run.data.tags
    assert tags["git.commit"] == head == tags["mlflow.source.git.commit"]
    assert tags["git.dirty"] == "true"
    assert tags["data.manifest_sha256"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert tags["host"] == socket.gethostname()
    assert tags["device"] == "cpu"
    assert tags["prefect.flow_run_id"] == "flow-123"
    assert tags["extra"] == "7" and tags["late"] == "yes"
    assert tags["pcgpt.kind"] == "stage"
    assert tags["mlflow.parentRunId"] == tr.parent_run_id
    files = {f.path for f in store.list_artifacts(tr.run_id)}
    assert files == {"meta.json", "tokenizer", "summary.json", "samples"}
    assert [f.path for f in store.list_artifacts(tr.run_id, "tokenizer")] == ["tokenizer/vocab.txt"]
    # Artifacts land in mlartifacts/ beside the SQLite store.
    exp = store.get_experiment_by_name(CFG.experiment)
    assert exp.artifact_location == (tmp_path / "mlartifacts").as_uri()
    assert (tmp_path / "mlartifacts").is_dir()
    # MLflow 3's UI opens it on its training runs, not on the GenAI overview.
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    parent = store.get_run(tr.parent_run_id)
    assert parent.data.tags["pcgpt.kind"] == "pipeline"
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= run.info.end_time
    assert [f.path for f in store.list_artifacts(parent.info.run_id, "report")] == ["report/meta.json"]
    # Outside DVC the stage process itself is the pipeline process.
    assert parent.data.tags[tracking.TAG_PIPELINE_KEY] == tracking.pipeline_key()


def test_failure_and_interrupt_set_the_run_status_and_reraise(store):
    with pytest.raises(ValueError, match="boom"):
        with tracking.stage_run("bad", config=CFG) as tr:
            tr.log_metrics({"train/loss": 1.0}, step=1)
            raise ValueError("boom")
    failed = store.get_run(tr.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["pcgpt.error"] == "ValueError: boom"
    assert [m.step for m in store.get_metric_history(tr.run_id, "train/loss")] == [1]
    assert store.get_run(tr.parent_run_id).info.status == "FAILED"

    with pytest.raises(KeyboardInterrupt):
        with tracking.stage_run("interrupted", config=CFG) as tr2:
            raise KeyboardInterrupt
    assert store.get_run(tr2.run_id).info.status == "KILLED"
    # Same process, same pipeline key: one parent for both runs.
    assert tr2.parent_run_id == tr.parent_run_id

    with pytest.raises(SystemExit):
        with tracking.stage_run("exits", config=CFG) as tr3:
            sys.exit(0)
    assert store.get_run(tr3.run_id).info.status == "FINISHED"
    # A failure earlier in the pipeline is not hidden by a later success.
    assert store.get_run(tr.parent_run_id).info.status == "KILLED"


def test_disabled_tracking_is_the_null_tracker(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with tracking.stage_run("off", config=dataclasses.replace(CFG, enabled=False)) as tr:
        tr.log_metrics({"a": 1.0}, step=0)
        tr.log_params(StageCfg())
        assert tr.run_id is None and tr.parent_run_id is None
        assert tr.log_pyfunc_model(None, {}, "m", "m") is None
    assert not (tmp_path / "mlflow.db").exists()


def test_an_existing_experiment_without_a_kind_gets_one_and_a_chosen_kind_is_kept(store):
    store.create_experiment("old")
    store.create_experiment("genai", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("old", "genai"):
        with tracking.stage_run("s", config=dataclasses.replace(CFG, experiment=name)):
            pass
    assert store.get_experiment_by_name("old").tags["mlflow.experimentKind"] == "custom_model_development"
    assert store.get_experiment_by_name("genai").tags["mlflow.experimentKind"] == "genai_development"


@pytest.mark.slow
def test_disabled_tracking_never_imports_mlflow(tmp_path):
    """A stage run with `tracking.enabled: false` works where MLflow is not even imported."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"enabled": False}}))
    code = textwrap.dedent("""\
        import sys
        from pipeline import tracking
        with tracking.stage_run("s", params={"a": 1}) as tr:
            tr.log_metrics({"m": 1.0}, step=0)
            tr.log_pyfunc_model("model.py", {}, "m", "m", signature=lambda: 1 / 0)
        assert "mlflow" not in sys.modules, sorted(m for m in sys.modules if "mlflow" in m)
        """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_config_is_loaded_from_params_yaml_and_validated(tmp_path, monkeypatch):
    from pipeline.params import ParamsError, load_section

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump({"tracking": {"experiment": "e1"}}))
    assert load_section(TrackingConfig, "tracking").experiment == "e1"
    Path("params.yaml").write_text(yaml.safe_dump({"tracking": {"experimnt": "e1"}}))
    with pytest.raises(ParamsError, match="tracking.experimnt: unknown key"):
        load_section(TrackingConfig, "tracking")
    Path("params.yaml").write_text(yaml.safe_dump({"tracking": {"flush_interval_s": 0}}))
    with pytest.raises(ParamsError, match="flush_interval_s"):
        load_section(TrackingConfig, "tracking")


def test_unreachable_uri_warns_once_and_the_block_completes_fast(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    done = []
    t0 = time.monotonic()
    with tracking.stage_run("offline", params={"a": 1}, config=CFG) as tr:
        for step in range(100):
            tr.log_metrics({"train/loss": 1.0}, step=step)
        tr.log_artifact(tmp_path)
        tr.set_tags({"x": 1})
        done.append(True)
    elapsed = time.monotonic() - t0
    assert done and tr.run_id is None
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert uri in warnings[0].getMessage() and "unavailable" in warnings[0].getMessage()
    assert elapsed < 5.0, f"unreachable store cost {elapsed:.1f} s"


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real MLflow tracking server on 127.0.0.1 (killed by its process group at the end)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                pytest.fail("mlflow server did not start")
            time.sleep(0.3)
    yield url, proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
def test_server_dying_mid_run_is_one_warning_not_a_crash(mlflow_server, tmp_path, monkeypatch,
                                                         caplog):
    url, proc = mlflow_server
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    caplog.set_level(logging.WARNING, logger="pipeline.tracking")
    with tracking.stage_run("remote", params={"a": 1}, config=CFG) as tr:
        assert isinstance(tr, tracking.MlflowTracker)
        tr.log_metrics({"train/loss": 2.0}, step=0)
        tr.flush()
        assert [m.step for m in MlflowClient(url).get_metric_history(tr.run_id, "train/loss")] == [0]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        t0 = time.monotonic()
        for step in range(1, 50):
            tr.log_metrics({"train/loss": 1.0}, step=step)
        tr.log_text("x", "x.txt")
        tr.set_tags({"after": "death"})
    elapsed = time.monotonic() - t0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert url in warnings[0].getMessage()
    assert elapsed < 30, f"a dead server cost {elapsed:.1f} s"


class Shout(mlflow.pyfunc.PythonModel):
    """A tiny model: prefixes each input with the word stored in its artifact."""

    def load_context(self, context):
        self.prefix = Path(context.artifacts["prefix"]).read_text().strip()

    def predict(self, context, model_input, params=None):
        return [f"{self.prefix} {s}".upper() for s in model_input["text"]]


def test_pyfunc_model_is_registered_with_alias_and_loads_back(store, tmp_path):
    prefix = tmp_path / "prefix.txt"
    uris, versions = [], []
    for word in ("hello", "bonjour"):
        prefix.write_text(word)
        with tracking.stage_run("pretrain@tiny", config=CFG) as tr:
            uris.append(tr.log_pyfunc_model(Shout(), {"prefix": str(prefix)}, name="model",
                                            registered_name="pcgpt-tiny", alias=CFG.model_alias))
        versions.append(store.get_model_version_by_alias("pcgpt-tiny", CFG.model_alias))
    assert uris == ["models:/pcgpt-tiny@newest"] * 2
    assert [str(v.version) for v in versions] == ["1", "2"]
    assert versions[-1].run_id == tr.run_id
    import pandas as pd

    for uri in ("models:/pcgpt-tiny@newest", "models:/pcgpt-tiny/latest"):
        model = mlflow.pyfunc.load_model(uri)
        assert list(model.predict(pd.DataFrame({"text": ["to be"]}))) == ["BONJOUR TO BE"]
    first = mlflow.pyfunc.load_model("models:/pcgpt-tiny/1")
    assert list(first.predict(pd.DataFrame({"text": ["to be"]}))) == ["HELLO TO BE"]


def test_pipeline_run_is_the_parent_of_stage_runs_and_keeps_its_status(store):
    with tracking.pipeline_run(name="nightly", config=CFG) as parent:
        assert os.environ[tracking.ENV_PARENT_RUN_ID] == parent.run_id
        with tracking.stage_run("download", config=CFG) as child:
            pass
        # A stage never ends a parent it does not own.
        assert store.get_run(parent.run_id).info.status == "RUNNING"
    assert tracking.ENV_PARENT_RUN_ID not in os.environ
    assert child.parent_run_id == parent.run_id
    assert store.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    assert store.get_run(parent.run_id).info.status == "FINISHED"
    assert store.get_run(parent.run_id).info.run_name == "nightly"


STAGE_SCRIPT = textwrap.dedent("""\
    import json, sys
    from pipeline import tracking
    from pipeline.params import load_section
    cfg = load_section(tracking.TrackingConfig, "tracking")
    with tracking.stage_run(sys.argv[1], params={"name": sys.argv[1]}, config=cfg) as t:
        t.log_metrics({"m": 1.0}, step=3)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump({"run": t.run_id, "parent": t.parent_run_id}, f)
    """)


@pytest.mark.slow
def test_stages_of_one_dvc_repro_share_a_parent(project):
    """Real `dvc repro` (a plain and a foreach stage): one parent per execution."""
    (project.path / "track_probe.py").write_text(STAGE_SCRIPT)
    (project.path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "first": {"cmd": "python track_probe.py first first.json",
                  "deps": ["track_probe.py"], "params": ["tracking.experiment"],
                  "outs": [{"first.json": {"cache": False}}]},
        "second": {"foreach": ["x"], "do": {
            "cmd": "python track_probe.py second@${item} second.json",
            "deps": ["track_probe.py", "first.json"],
            "outs": [{"second.json": {"cache": False}}]}},
    }}))
    project.commit("probe stages")
    project.dvc("repro")
    first = json.loads((project.path / "first.json").read_text())
    second = json.loads((project.path / "second.json").read_text())
    assert first["parent"] == second["parent"]

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(project.params["tracking"]["experiment"])
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {first["run"], second["run"], first["parent"]}
    parent = runs[first["parent"]]
    assert parent.data.tags["pcgpt.kind"] == "pipeline"
    assert parent.info.status == "FINISHED"
    assert "dvc" in parent.data.tags["pcgpt.launcher"]
    child = runs[second["run"]]
    assert child.info.run_name == child.data.tags["dvc.stage"] == "second@x"
    assert child.data.tags["mlflow.parentRunId"] == first["parent"]
    # The deps hashes tagged while the stage ran are the ones dvc.lock records after it.
    lock = yaml.safe_load((project.path / "dvc.lock").read_text())["stages"]["second@x"]
    assert child.data.tags["dvc.hashes_from"] == "workspace"
    for dep in lock["deps"]:
        assert child.data.tags[f"dvc.dep.{dep['path']}"] == dep["md5"]
    assert "dvc.params.params.yaml" in runs[first["run"]].data.tags

    # A second execution gets a parent of its own.
    project.dvc("repro", "--force")
    again = json.loads((project.path / "second.json").read_text())
    assert again["parent"] != first["parent"]
    parents = client.search_runs([exp.experiment_id], "tags.`pcgpt.kind` = 'pipeline'")
    assert len(parents) == 2


@pytest.mark.slow
def test_stages_started_at_once_under_one_pipeline_process_share_one_parent(tmp_path):
    """Three stage processes start together under one `dvc`-named launcher process, on
    a store that does not exist yet: one parent, created once (no race)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"tracking": {"experiment": "race"}}))
    (tmp_path / "stage.py").write_text(STAGE_SCRIPT)
    launcher = tmp_path / "bin" / "dvc"  # its command line is `python .../bin/dvc`
    launcher.parent.mkdir()
    launcher.write_text(f"#!{sys.executable}\n" + textwrap.dedent("""\
        import subprocess, sys
        procs = [subprocess.Popen([sys.executable, "stage.py", f"s{i}", f"s{i}.json"])
                 for i in range(3)]
        sys.exit(max(p.wait() for p in procs))
        """))
    launcher.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for var in ("DVC_STAGE", tracking.ENV_PARENT_RUN_ID):
        env.pop(var, None)
    proc = subprocess.run([str(launcher)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"s{i}.json").read_text()) for i in range(3)]
    assert len({r["parent"] for r in results}) == 1
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("race")
    parents = client.search_runs([exp.experiment_id], "tags.`pcgpt.kind` = 'pipeline'")
    assert [p.info.run_id for p in parents] == [results[0]["parent"]]
    children = client.search_runs([exp.experiment_id], "tags.`pcgpt.kind` = 'stage'")
    assert sorted(c.info.run_name for c in children) == ["s0", "s1", "s2"]


def test_every_queued_step_reaches_the_store(store):
    """log_metrics only queues; the background thread sends every step, none lost or merged.
    (Its cost in the training loop is a benchmark number: tests/bench/bench_pretrain.py.)"""
    with tracking.stage_run("many", config=CFG) as tr:
        n = 2000
        for step in range(n):
            tr.log_metrics({"train/loss": 1.0, "perf/step_ms": 2.0, "perf/tok_per_s": float(step)},
                           step=step)
    history = store.get_metric_history(tr.run_id, "perf/tok_per_s")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(n)]


def test_tensor_metrics_are_read_back_exactly_with_their_steps(store):
    """The training loop hands over detached 0-d tensors (any float dtype) mixed with Python
    numbers; the background thread converts them in one copy per device."""
    import torch

    values = {"a": torch.tensor(1.25), "b": torch.tensor(2.5, dtype=torch.bfloat16),
              "c": torch.tensor(0.1, dtype=torch.float64), "d": 7, "e": torch.tensor([3.0])}
    assert tracking._floats(list(values.values())) == [1.25, 2.5, 0.1, 7.0, 3.0]
    with tracking.stage_run("probe", config=CFG) as tracker:
        for step in (1, 2):
            tracker.log_metrics({k: v * step for k, v in values.items()}, step=step)
        run_id = tracker.run_id
    for name, v in values.items():
        history = sorted((m.step, m.value) for m in store.get_metric_history(run_id, name))
        assert history == [(1, float(v)), (2, float(v * 2))], name
