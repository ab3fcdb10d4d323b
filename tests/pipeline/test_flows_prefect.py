"""Scheduled pipeline runs through a real Prefect server and real workers.

One server per module (a free loopback port, a temp PREFECT_HOME); each test makes its own
tiny pcgpt workspace (synthetic source, char tokenizer, 2-layer models, a 2x1 ablation
grid), deploys prefect.yaml from it, starts its workers with `subprocess.Popen(...,
start_new_session=True)`, stops them, and fails if a process it started outlives it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline import flows
from tests.pipeline.prefect_helpers import (ARTIFACTS, TINY_STAGES, PrefectServer, Proc, Workspace,
                                            artifacts, flow_run, free_port, kill_all, leftovers,
                                            log_text, logs, quiet_nightly, run_deployment, table,
                                            wait_final, wait_for)

pytestmark = pytest.mark.slow

TRAINING = {n for n in TINY_STAGES if n.startswith(("pretrain@", "ablate@"))}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = PrefectServer(tmp_path_factory.mktemp("prefect") / "home")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def clean_exit(tmp_path):
    """Fails the test if a process it started (a worker, a flow run, DVC, a stage) is still
    running in its directory after it ended; kills those."""
    yield tmp_path
    left = wait_for_none(tmp_path)
    if left:
        desc = [" ".join(p.cmdline()[:6]) for p in left if p.is_running()]
        kill_all(left)
        pytest.fail(f"processes left running: {desc}")


def wait_for_none(root: Path, timeout: float = 20, keep: list[Proc] = ()) -> list[psutil.Process]:
    """Waits until no process but `keep` runs in `root`; returns the ones still there."""
    skip = {k.pid for k in keep}
    deadline = time.monotonic() + timeout
    while (left := [p for p in leftovers(root) if p.pid not in skip]) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def mlflow_runs(ws: Workspace, uri: str | None = None) -> list:
    client = MlflowClient(uri or ws.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name("pcgpt")
    return client.search_runs([exp.experiment_id]) if exp else []


def lineage(runs: list, flow_run_id: str) -> tuple[object, dict[str, object]]:
    """The one parent run of a flow run and its children by name."""
    parents = [r for r in runs if r.data.tags.get("pcgpt.kind") == "pipeline"
               and r.data.tags.get("prefect.flow_run_id") == flow_run_id]
    assert len(parents) == 1, [p.info.run_name for p in parents]
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    by_name = {r.info.run_name: r for r in kids}
    assert len(by_name) == len(kids), sorted(r.info.run_name for r in kids)  # each stage once
    return parents[0], by_name


def setup_host(ws: Workspace, *args: str) -> str:
    proc = ws.run(sys.executable, "-m", "pipeline.flows", "setup", *args, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def deploy(ws: Workspace) -> None:
    ws.deploy()
    quiet_nightly(ws.server)


def flow_process(run_id) -> psutil.Process | None:
    """The flow run's own process: the leader of the process group the worker started it in."""
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == p.pid and p.environ().get("PREFECT__FLOW_RUN_ID") == str(run_id):
                return p
        except (psutil.Error, ProcessLookupError):
            continue
    return None


# --------------------------------------------------------------------------- setup, schedules

def test_setup_is_idempotent_and_sized_from_this_host(server, tmp_path, clean_exit):
    ws = Workspace.create(tmp_path / "ws", server)
    out = setup_host(ws)
    assert "work pool 'gpu' (process)" in out
    setup_host(ws)
    with server.settings(), server.client() as c:
        assert c.read_work_pool("gpu").type == "process"
        limit = c.read_global_concurrency_limit_by_name(flows.slot_limit_name())
        assert limit.limit == max(1, len(flows.visible_gpus()))  # 1 on a CPU-only host
        autos = c.read_automations_by_name(flows.ZOMBIE_AUTOMATION)
        assert len(autos) == 1 and autos[0].trigger.within.total_seconds() == flows.ZOMBIE_AFTER_S
        first = autos[0].id
    setup_host(ws, "--zombie-after", "90", "--gpus", "2")
    with server.settings(), server.client() as c:
        autos = c.read_automations_by_name(flows.ZOMBIE_AUTOMATION)
        assert len(autos) == 1 and autos[0].id != first
        assert autos[0].trigger.within.total_seconds() == 90
        assert c.read_global_concurrency_limit_by_name(flows.slot_limit_name()).limit == 2
    setup_host(ws)  # back to this host's size
    bad = ws.run(sys.executable, "-m", "pipeline.flows", "setup", "--gpus", "0", check=False)
    assert bad.returncode == 2 and "--gpus 0: must be >= 1" in bad.stderr
    env = dict(ws.env)
    del env["PREFECT_API_URL"]
    nourl = subprocess.run([sys.executable, "-m", "pipeline.flows", "setup"], cwd=ws.path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert nourl.returncode == 2 and "PREFECT_API_URL is not set" in nourl.stderr


def test_cron_deployment_gets_scheduled_runs(server, tmp_path, clean_exit):
    from prefect.client.schemas.filters import DeploymentFilter, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    ws = Workspace.create(tmp_path / "ws", server)
    setup_host(ws)
    ws.deploy()
    with server.settings(), server.client() as c:
        dep = c.read_deployment_by_name("pcgpt/nightly")
        assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]

        def scheduled():
            return c.read_flow_runs(
                deployment_filter=DeploymentFilter(id={"any_": [dep.id]}),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
        runs = wait_for("scheduled runs of pcgpt/nightly", scheduled, 90, every=1)
        times = sorted(r.expected_start_time for r in runs)
        assert all(t.hour == 2 and t.minute == 0 for t in times)
        assert len({t.date() for t in times}) == len(times) >= 2  # one a night
        assert c.read_deployment_by_name("pcgpt/adhoc").schedules == []
    quiet_nightly(server)


# --------------------------------------------------------------------------- one adhoc run

@pytest.fixture(scope="module")
def adhoc(server, tmp_path_factory):
    """A worker runs pcgpt/adhoc on the tiny workspace; a second run is triggered meanwhile;
    then a third, no-op run."""
    root = tmp_path_factory.mktemp("adhoc")
    ws = Workspace.create(root / "ws", server)
    setup_host(ws)
    deploy(ws)
    worker = ws.start_worker()
    try:
        t0 = time.monotonic()
        first = run_deployment(server, "pcgpt/adhoc")
        wait_for("the first run to start", lambda: flow_run(server, first.id).state.is_running(), 120)
        second = run_deployment(server, "pcgpt/adhoc")
        second = wait_final(server, second.id, 120, [worker])
        first = wait_final(server, first.id, 600, [worker])
        wall_first = time.monotonic() - t0
        t1 = time.monotonic()
        noop = wait_final(server, run_deployment(server, "pcgpt/adhoc").id, 300, [worker])
        wall_noop = time.monotonic() - t1
    finally:
        ws.stop_workers()
    left = wait_for_none(root)
    kill_all(left)
    assert not left, [p.cmdline() for p in left]
    print(f"\nadhoc run: {wall_first:.1f} s trigger to Completed; no-op re-run {wall_noop:.1f} s")
    return {"ws": ws, "first": first, "second": second, "noop": noop, "worker": worker}


def test_adhoc_run_completes_with_lineage_and_artifacts(adhoc, server):
    ws, run = adhoc["ws"], adhoc["first"]
    assert run.state.is_completed(), (run.state, log_text(server, run.id)[-3000:])
    assert "Data and pipelines are up to date" in ws.dvc("status").stdout
    # MLflow: the flow's parent run, every stage its child, tagged with the flow run
    parent, kids = lineage(mlflow_runs(ws), str(run.id))
    assert parent.info.status == "FINISHED"
    assert set(kids) == TINY_STAGES
    url = parent.data.tags["prefect.flow_run_url"]
    assert url.startswith(server.ui) and str(run.id) in url
    for name, kid in kids.items():
        assert kid.info.status == "FINISHED", name
        assert kid.data.tags["prefect.flow_run_id"] == str(run.id), name
        assert kid.data.tags["prefect.flow_run_url"] == url, name
        assert kid.data.tags["dvc.stage"] == name
    # artifacts, read back through Prefect's client
    arts = artifacts(server, run.id)
    assert set(arts) == {"pcgpt-stages", "pcgpt-headline", "pcgpt-mlflow"}
    rows = {r["stage"]: r for r in table(arts["pcgpt-stages"])}
    assert set(rows) == TINY_STAGES
    assert all(r["status"] == "ran" and float(r["wall_s"]) > 0 for r in rows.values()), rows
    assert {n for n, r in rows.items() if r["gpu"] == "cpu0"} == TRAINING
    assert {n for n, r in rows.items() if r["gpu"] == "-"} == TINY_STAGES - TRAINING
    head = {r["metric"]: r for r in table(arts["pcgpt-headline"])}
    params = yaml.safe_load((ws.path / "params.yaml").read_text())
    assert list(head) == params["report"]["headline_metrics"]
    metrics = json.loads((ws.path / "metrics/pretrain/pcgpt.json").read_text())
    assert float(head["val/loss"]["pcgpt"]) == pytest.approx(metrics["val/loss"])
    assert parent.info.run_id in arts["pcgpt-mlflow"].data
    # the run's results are a DVC experiment, without a commit on the branch
    exps = ws.dvc("exp", "show", "--json").stdout
    assert f"prefect-{run.name}" in exps
    assert ws.run("git", "log", "--oneline").stdout.count("\n") == 1


def test_a_second_run_while_one_runs_is_refused(adhoc):
    second = adhoc["second"]
    assert second.state.is_cancelled()
    assert "Deployment concurrency limit reached" in (second.state.message or "")


def test_training_stages_take_turns_on_one_slot_and_start_after_the_tokenizer(adhoc, server):
    run = adhoc["first"]
    with server.settings(), server.client() as c:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        tasks = {t.id: t for t in c.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[run.id])))}
    held: dict[str, list] = {}
    for rec in logs(server, run.id):
        if rec.message.startswith(("GPU slot taken", "GPU slot released")):
            held.setdefault(tasks[rec.task_run_id].name, []).append(rec.timestamp)
    assert set(held) == TRAINING  # CPU stages never take a slot
    spans = sorted((ts[0], ts[1], name) for name, ts in held.items())
    assert all(len(ts) == 2 for ts in held.values())
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        assert end <= start, f"{a} and {b} overlap on a slot limit of 1"
    # every training stage was submitted once the tokenizer finished, before the first
    # training ended: the slot, not the flow, made them wait
    by_name = {t.name: t for t in tasks.values()}
    tok_end = by_name["tokenizer"].end_time
    for name in TRAINING:
        assert tok_end <= by_name[name].created <= spans[0][1], name


def test_a_no_op_rerun_skips_every_stage(adhoc, server):
    noop = adhoc["noop"]
    assert noop.state.is_completed()
    rows = table(artifacts(server, noop.id)["pcgpt-stages"])
    assert {r["status"] for r in rows} == {"unchanged"}
    assert f"prefect-{noop.name}" not in adhoc["ws"].dvc("exp", "show", "--json").stdout


def test_prefect_ui_shows_the_deployments_and_a_finished_run(adhoc, server, tmp_path, monkeypatch):
    from tests.stages.test_report import CHROME_FLAGS, CHROMEDRIVER, CHROMIUM

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("Debian chromium + chromium-driver not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")
    run = adhoc["first"]
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        driver.set_page_load_timeout(120)

        def page_has(*texts):
            return lambda: all(t in driver.execute_script("return document.body.innerText") for t in texts)

        driver.get(f"{server.ui}/deployments")
        wait_for("the deployments page", page_has("adhoc", "nightly", "any-host"), 120)
        time.sleep(2)  # the activity column fills in after the names
        driver.save_screenshot(str(ARTIFACTS / "ui-deployments.png"))
        driver.get(f"{server.ui}/runs/flow-run/{run.id}")
        wait_for("the flow run page", page_has(run.name, "Completed"), 120)
        time.sleep(2)  # the run graph draws after the text
        driver.save_screenshot(str(ARTIFACTS / "ui-flow-run.png"))
        stages = artifacts(server, run.id)["pcgpt-stages"]
        driver.get(f"{server.ui}/artifacts/artifact/{stages.id}")
        wait_for("the stage table", page_has("pcgpt-stages", "pretrain@pcgpt", "ablate@bp-0", "cpu0"), 60)
        driver.save_screenshot(str(ARTIFACTS / "ui-stage-table.png"))
    finally:
        driver.quit()
    for name in ("ui-deployments.png", "ui-flow-run.png", "ui-stage-table.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000
        shutil.copy2(ARTIFACTS / name, tmp_path / name)


# --------------------------------------------------------------------------- in-process runs

def test_overrides_are_a_dvc_experiment_and_bad_ones_stop_before_work(server, tmp_path, clean_exit):
    ws = Workspace.create(tmp_path / "ws", server)
    setup_host(ws)
    before = (ws.path / "params.yaml").read_text()
    bad = ws.flows("run", "pretrain@baseline", "-S", "train.stepz=3", check=False)
    assert bad.returncode == 1
    assert "Could not override 'train.stepz'" in bad.stdout + bad.stderr
    assert not (ws.path / "dvc.lock").exists() and not (ws.path / "data").exists()

    ok = ws.flows("run", "pretrain@baseline", "-S", "train.steps=4")
    assert "Completed" in ok.stdout
    assert (ws.path / "params.yaml").read_text() == before  # restored for the next run
    assert json.loads((ws.path / "metrics/pretrain/baseline.json").read_text())["step"] == 4
    exps = json.loads(ws.dvc("exp", "show", "--json").stdout)
    found = [e for base in exps for e in (base.get("experiments") or [])
             if (e.get("name") or "").startswith("prefect-")]
    assert len(found) == 1
    rev = found[0]["revs"][0]["data"]
    assert rev["params"]["params.yaml"]["data"]["train"]["steps"] == 4
    assert rev["metrics"]["metrics/pretrain/baseline.json"]["data"]["step"] == 4
    assert ws.run("git", "status", "--porcelain", "--", "params.yaml").stdout == ""


def test_a_failing_stage_fails_the_flow_and_skips_its_downstream(server, tmp_path, clean_exit):
    ws = Workspace.create(tmp_path / "ws", server)
    setup_host(ws)
    out = ws.flows("run", "pretrain@baseline", "-S", "tokenizer.kind=nope", check=False)
    assert out.returncode == 1, out.stdout[-2000:]
    text = out.stdout + out.stderr
    assert "last output: tokenizer: error: tokenizer.kind: 'nope' is not allowed" in text
    assert "2 of 3 stages failed or were not run: tokenizer, pretrain@baseline" in text
    assert not (ws.path / "metrics/pretrain/baseline.json").exists()
    runs = mlflow_runs(ws)
    parent = [r for r in runs if r.data.tags.get("pcgpt.kind") == "pipeline"]
    assert len(parent) == 1 and parent[0].info.status == "FAILED"
    assert {r.info.run_name for r in runs if r.data.tags.get("pcgpt.kind") == "stage"} <= {
        "download", "tokenizer"}


def test_a_dvc_lock_held_elsewhere_is_retried(server, tmp_path, clean_exit):
    from dvc.fs import localfs
    from dvc.rwlock import rwlock

    ws = Workspace.create(tmp_path / "ws", server)
    setup_host(ws)
    ws.dvc("repro", "download")
    busy = threading.Event()
    out_lines: list[str] = []
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.flows", "run", "tokenizer"], cwd=ws.path,
                            env=ws.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read():
        for line in proc.stdout:
            out_lines.append(line)
            if "is busy, it is being blocked by" in line:
                busy.set()
    reader = threading.Thread(target=read, daemon=True)
    # A hand-run DVC command holding the tokenizer's output (as `dvc repro` in a terminal would)
    with rwlock(str(ws.path / ".dvc" / "tmp"), localfs, "dvc repro (by hand)", [],
                [str(ws.path / "data" / "tokenizer")], False):
        reader.start()
        assert busy.wait(180), "".join(out_lines)[-3000:]
    assert proc.wait(300) == 0, "".join(out_lines)[-3000:]
    reader.join(10)
    text = "".join(out_lines)
    assert "could not take a DVC lock held by another process" in text
    assert "Running stage 'tokenizer'" in text and "Completed" in text


# --------------------------------------------------------------------------- crashes

LONG = {"train": {"steps": 600, "eval_every": 300, "save_every": 20, "log_every": 20}}


def test_cancel_mid_pretrain_then_rerun_resumes_to_the_same_metrics(server, tmp_path, clean_exit):
    from prefect.states import Cancelling

    ws = Workspace.create(tmp_path / "ws", server, params=LONG)
    setup_host(ws)
    deploy(ws)
    ws.start_worker()
    ckpt = ws.path / "checkpoints" / "pcgpt"
    try:
        run = run_deployment(server, "pcgpt/adhoc", {"targets": ["pretrain@pcgpt"]})
        wait_for("a pretrain checkpoint", lambda: ckpt.is_dir() and any(ckpt.iterdir()), 300)
        t0 = time.monotonic()
        with server.settings(), server.client() as c:
            c.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"))
        run = wait_final(server, run.id, 120, ws.workers)
        print(f"\ncancel -> {run.state.name} in {time.monotonic() - t0:.1f} s")
        assert run.state.is_cancelled(), run.state
        left = wait_for_none(ws.path, 30, keep=ws.workers)
        assert not left, [p.cmdline() for p in left]  # the stage checkpointed and exited
        text = log_text(server, run.id)
        assert "Running stage 'pretrain@pcgpt'" in text
        assert "pretrain: stopped by SIGTERM; checkpoint:" in text  # streamed to the end
        parent, kids = lineage(mlflow_runs(ws), str(run.id))
        assert parent.info.status == "KILLED"
        assert not (ws.path / "metrics/pretrain/pcgpt.json").exists()

        t0 = time.monotonic()
        again = run_deployment(server, "pcgpt/adhoc", {"targets": ["pretrain@pcgpt"]})
        again = wait_final(server, again.id, 600, ws.workers)
        print(f"re-run {time.monotonic() - t0:.1f} s")
        assert again.state.is_completed(), log_text(server, again.id)[-3000:]
        assert "pretrain@pcgpt: resumed from" in log_text(server, again.id)
    finally:
        ws.stop_workers()
    resumed = json.loads((ws.path / "metrics/pretrain/pcgpt.json").read_text())
    # the same stage uninterrupted, from scratch
    shutil.rmtree(ckpt)
    ws.dvc("repro", "--force", "--single-item", "pretrain@pcgpt")
    plain = json.loads((ws.path / "metrics/pretrain/pcgpt.json").read_text())
    assert resumed["step"] == plain["step"] == LONG["train"]["steps"]
    for key in ("train/loss", "val/loss", "val/bpb", "val/acc"):
        assert resumed[key] == plain[key], key


def test_worker_sigkill_mid_run_never_leaves_it_running(server, tmp_path, clean_exit):
    ws = Workspace.create(tmp_path / "ws", server, params={"train": {"steps": 400, "save_every": 20}})
    setup_host(ws)
    deploy(ws)
    worker = ws.start_worker()
    ckpt = ws.path / "checkpoints" / "pcgpt"
    target = {"targets": ["pretrain@pcgpt"]}
    try:
        run = run_deployment(server, "pcgpt/adhoc", target)
        wait_for("a pretrain checkpoint", lambda: ckpt.is_dir() and any(ckpt.iterdir()), 300)
        worker.kill()
        run = wait_final(server, run.id, 300)
        # with stream_output off the flow outlives its worker and finishes
        assert run.state.type.value in ("COMPLETED", "CRASHED"), run.state
        ws.start_worker(name="worker2")
        again = wait_final(server, run_deployment(server, "pcgpt/adhoc", target).id, 600, ws.workers)
        assert again.state.is_completed(), log_text(server, again.id)[-3000:]
    finally:
        ws.stop_workers()
    stages = ("download", "tokenizer", "pretrain@pcgpt")
    assert "Data and pipelines are up to date" in ws.dvc("status", *stages).stdout
    lock = yaml.safe_load((ws.path / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(stages)
    for entry in lock["stages"].values():
        for out in entry.get("outs", []):
            assert (ws.path / out["path"]).exists(), out["path"]
    assert json.loads((ws.path / "metrics/pretrain/pcgpt.json").read_text())["step"] == 400


def test_a_dead_host_leaves_the_run_crashed_and_a_rerun_resumes(server, tmp_path, clean_exit):
    ws = Workspace.create(tmp_path / "ws", server, params=LONG)
    setup_host(ws, "--zombie-after", "60")
    try:
        deploy(ws)
        worker = ws.start_worker()
        # the shortest heartbeat Prefect allows (30 s) instead of the deployment's 60 s
        env = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
        run = run_deployment(server, "pcgpt/adhoc", {"targets": ["pretrain@pcgpt"]},
                             job_variables={"env": env})
        ckpt = ws.path / "checkpoints" / "pcgpt"
        wait_for("a pretrain checkpoint", lambda: ckpt.is_dir() and any(ckpt.iterdir()), 300)
        flow_proc = flow_process(run.id)
        assert flow_proc is not None
        # the host dies: worker, flow process and its stages, all at once
        worker.kill()
        os.killpg(flow_proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        assert flow_run(server, run.id).state.is_running()
        run = wait_final(server, run.id, 240)
        waited = time.monotonic() - t0
        assert run.state.is_crashed(), run.state
        assert "No heartbeat" in (run.state.message or "")
        print(f"\nhost death -> Crashed after {waited:.0f} s (heartbeat 30 s, automation 60 s)")
    finally:
        ws.stop_workers()
        setup_host(ws)  # the automation back to its default
    assert not (ws.path / "metrics/pretrain/pcgpt.json").exists()
    # the next run (here without a worker) resumes the training and closes the dead run's
    # parent; it waits for the dead run's GPU slot until that slot's lease runs out
    t0 = time.monotonic()
    out = ws.flows("run", "pretrain@pcgpt")
    print(f"re-run after the host's death: {time.monotonic() - t0:.0f} s")
    assert "pretrain@pcgpt: resumed from" in out.stdout + out.stderr
    assert json.loads((ws.path / "metrics/pretrain/pcgpt.json").read_text())["step"] == LONG["train"]["steps"]
    assert "Data and pipelines are up to date" in ws.dvc("status", "pretrain@pcgpt").stdout
    parent, _ = lineage(mlflow_runs(ws), str(run.id))
    assert parent.info.status == "KILLED"


# --------------------------------------------------------------------------- two hosts

def test_two_hosts_run_items_through_the_stage_deployment_and_the_dvc_remote(server, tmp_path, clean_exit):
    remote = tmp_path / "dvc-remote"
    a = Workspace.create(tmp_path / "host-a", server, host="host-a")
    a.dvc("remote", "add", "-d", "shared", str(remote))
    a.commit("shared DVC remote")
    b_path = tmp_path / "host-b"
    a.run("git", "clone", "-q", str(a.path), str(b_path))
    b = Workspace(b_path, server, host="host-b")
    b.env["PCGPT_WORKSPACE"] = str(b_path)
    b.env["PYTHONPATH"] = str(b_path)
    port = free_port()
    mlflow_uri = f"http://127.0.0.1:{port}"
    mlflow = Proc([str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
                   "--port", str(port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                   "--default-artifact-root", str(tmp_path / "mlartifacts")],
                  tmp_path, a.env, tmp_path / "mlflow.log")
    try:
        import urllib.request

        def up():
            try:
                with urllib.request.urlopen(f"{mlflow_uri}/health", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        wait_for("the MLflow server", up, 120)
        for ws in (a, b):
            ws.env["MLFLOW_TRACKING_URI"] = mlflow_uri
            setup_host(ws)
        deploy(a)
        a.start_worker(limit=1, name="worker-a")  # busy with the coordinator: items go to B
        run = run_deployment(server, "pcgpt/adhoc", {"targets": ["ablate"], "distribute": True})
        wait_for("the coordinator to start", lambda: flow_run(server, run.id).state.is_running(), 120)
        b.start_worker(limit=2, name="worker-b")
        run = wait_final(server, run.id, 600, a.workers + b.workers)
        assert run.state.is_completed(), log_text(server, run.id)[-4000:]
        runs = mlflow_runs(a, mlflow_uri)
    finally:
        a.stop_workers()
        b.stop_workers()
        mlflow.stop()
    items = sorted(n for n in TINY_STAGES if n.startswith("ablate@"))
    rows = {r["stage"]: r for r in table(artifacts(server, run.id)["pcgpt-stages"])}
    assert {n: rows[n]["status"] for n in items} == {n: "ran on host-b, restored here" for n in items}
    assert {rows[n]["status"] for n in ("download", "tokenizer")} == {"ran"}
    assert "Data and pipelines are up to date" in a.dvc("status", *items).stdout
    for n in items:
        f = f"metrics/ablate/{n.split('@')[1]}.json"
        assert (a.path / f).read_bytes() == (b.path / f).read_bytes()
    assert not (a.path / "checkpoints" / "ablate").exists()  # no item trained on the coordinator
    # one MLflow parent on the shared server; CPU stages from A, items from B, each once
    parent, kids = lineage(runs, str(run.id))
    assert set(kids) == {"download", "tokenizer", *items}
    assert all(kids[n].data.tags["prefect.flow_run_id"] == str(run.id) for n in kids)

