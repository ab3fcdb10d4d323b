"""The local runner (`python -m pipeline.flows local`): the DAG from DVC, stages in a thread
pool, GPU slots from per-device lock files, no Prefect and no MLflow in the runner.

The slow tests run it as a subprocess in which importing Prefect or MLflow fails (as on a
GPU host that carries only DVC), on a tiny copy of the project (`project` fixture) and on
stand-in GPU stages (`probe@<i>`: they depend on `model/`, sleep, and record when they ran
and their `CUDA_VISIBLE_DEVICES`). Device names such as `a,b` only go into
`CUDA_VISIBLE_DEVICES`; on a CPU-only box the stages ignore them.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import pytest
import yaml

from pipeline.flows import dag as flows_dag
from pipeline.flows.dag import Stage, first_free_device, run_dag
from pipeline.flows.local import Slots
from tests.conftest import Project
from tests.pipeline.prefect_helpers import TINY_STAGES, tiny_params

TRAINING = {n for n in TINY_STAGES if n.startswith(("pretrain@", "ablate@"))}
PROBES = [f"probe@{i}" for i in range(4)]

# `python -m pipeline.flows local ...` as on a host without Prefect and MLflow; reports what
# of them got imported anyway.
WITHOUT_PREFECT = r'''
import importlib.abc, runpy, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("prefect", "mlflow"):
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on this host)")

sys.meta_path.insert(0, Absent())
sys.argv = ["pipeline.flows", *sys.argv[1:]]
try:
    runpy.run_module("pipeline.flows", run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("prefect", "mlflow"))
print("prefect/mlflow modules loaded:", loaded)
sys.exit(code)
'''

PROBE = '''"""A stand-in GPU stage: sleeps, records when it ran and on which device; fails if asked."""
import json, os, sys, time
import yaml
item = sys.argv[1]
p = yaml.safe_load(open("params.yaml"))["probe"]
if int(item) in p["fail"]:
    sys.exit(f"probe {item}: failing as asked")
start = time.time()
time.sleep(p["sleep_s"])
rec = {"start": start, "end": time.time(), "device": os.environ.get("CUDA_VISIBLE_DEVICES")}
os.makedirs("probe", exist_ok=True)
with open(f"probe/{item}.json", "w") as f:
    json.dump(rec, f)
'''


def local(proj: Project, *args: str) -> tuple[int, str, str]:
    out = proj.run(sys.executable, "-c", WITHOUT_PREFECT, "local", *args, check=False, timeout=900)
    assert "prefect/mlflow modules loaded: []" in out.stdout, (out.stdout[-3000:], out.stderr[-3000:])
    return out.returncode, out.stdout, out.stderr


def stage_lines(stdout: str) -> list[tuple[str, str]]:
    """(stage, text) of every `[stage] text` line, in the order printed."""
    return re.findall(r"^\[(\S+)\] (.*)$", stdout, re.M)


def final_table(stdout: str) -> dict[str, dict[str, str]]:
    """The table the runner prints at the end, by stage (fixed-width columns)."""
    lines = stdout.splitlines()
    head = max(i for i, ln in enumerate(lines) if ln.startswith("stage ") and "status" in ln)
    spans = [m.span() for m in re.finditer(r"-+", lines[head + 1])]
    cols = [lines[head][a:b].strip() for a, b in spans]
    rows = {}
    for ln in lines[head + 2:]:
        if not ln.strip():
            break
        cells = [ln[a:b if i + 1 < len(spans) else None].strip() for i, (a, b) in enumerate(spans)]
        rows[cells[0]] = dict(zip(cols, cells))
    return rows


def peak(spans: list[tuple[float, float]]) -> int:
    """The most intervals open at once (one that ends as another starts does not overlap)."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = top = 0
    for _, step in events:
        now += step
        top = max(top, now)
    return top


def unique_host(proj: Project) -> None:
    """GPU-slot lock files of this test alone (the box is shared with other test runs)."""
    proj.env["PCGPT_HOST"] = f"test-local-{time.time_ns()}"


@pytest.fixture
def probes(project: Project) -> Project:
    """The project with stand-in GPU stages `probe@<i>` for `probe.items` (0..3) and
    `probe_sum` after the first four."""
    (project.path / "probe.py").write_text(PROBE)
    spec = yaml.safe_load((project.path / "dvc.yaml").read_text())
    spec["stages"]["probe"] = {"foreach": "${probe.items}", "do": {
        "cmd": "python probe.py ${item}", "deps": ["probe.py", "model/__init__.py"],
        "params": ["probe.fail", "probe.sleep_s"], "outs": ["probe/${item}.json"]}}
    outs = [f"probe/{i}.json" for i in range(4)]
    spec["stages"]["probe_sum"] = {"cmd": f"cat {' '.join(outs)} > probe_sum.json", "deps": outs,
                                   "outs": ["probe_sum.json"]}
    (project.path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    project.set_params({"probe": {"items": [0, 1, 2, 3], "fail": [], "sleep_s": 4}})
    project.commit("probe stages")
    unique_host(project)
    return project


def probe_runs(proj: Project) -> list[dict]:
    return [json.loads((proj.path / "probe" / f"{i}.json").read_text()) for i in range(4)]


# --------------------------------------------------------------------------- no subprocess

def test_run_dag_starts_stages_after_their_upstream_and_skips_below_a_failure():
    dag = {"a": Stage("a", (), False, ()), "b": Stage("b", ("a",), True, ()),
           "c": Stage("c", ("a",), True, ()), "d": Stage("d", ("b",), False, ()),
           "e": Stage("e", ("c",), False, ())}
    started, ended = [], []

    def stage(name):
        started.append(name)
        time.sleep(0.05)
        ended.append(name)
        if name == "b":
            raise RuntimeError("b broke")
        return {"stage": name, "status": "ran"}

    errors = []
    with ThreadPoolExecutor(4) as pool:
        rows = run_dag(dag, list(dag), lambda n, ups: pool.submit(stage, n),
                       lambda fs: next(as_completed(fs)), errors.append)
    assert {n: r["status"] for n, r in rows.items()} == {
        "a": "ran", "b": "failed", "c": "ran", "d": "not run (upstream failed)", "e": "ran"}
    assert "d" not in started and errors == ["b failed: b broke"]
    assert started.index("b") > ended.index("a") and started.index("e") > ended.index("c")


def test_slots_share_a_device_only_up_to_per_device_and_spread_first(monkeypatch):
    monkeypatch.setenv(flows_dag.ENV_HOST, f"test-{time.time_ns()}")
    held: list[str] = []
    order, peaks, errors = [], [0], []
    guard = threading.Lock()

    def worker():
        with first_free_device(["a", "b"], per_device=2) as dev:
            with guard:
                held.append(dev)
                order.append(dev)
                peaks[0] = max(peaks[0], len(held))
                if held.count(dev) > 2:
                    errors.append(f"{dev} held {held.count(dev)} times")
            time.sleep(0.4)
            with guard:
                held.remove(dev)

    threads = [threading.Thread(target=worker) for _ in range(7)]
    for t in threads:
        t.start()
        time.sleep(0.02)  # in turn, so the first two take the first slot of each device
    for t in threads:
        t.join(30)
    assert errors == [] and peaks[0] == 4 and held == []
    assert order[:2] == ["a", "b"]


def test_waiting_for_a_slot_ends_when_the_runner_stops(monkeypatch):
    monkeypatch.setenv(flows_dag.ENV_HOST, f"test-{time.time_ns()}")
    stop = threading.Event()
    with first_free_device(["a"]):
        threading.Timer(0.3, stop.set).start()
        t0 = time.monotonic()
        with pytest.raises(flows_dag.SlotWaitCancelled):
            with first_free_device(["a"], stop=stop):
                pass
        assert time.monotonic() - t0 < 2


def test_slots_come_from_gpus_or_the_host(monkeypatch):
    assert Slots.parse("a, b", 2) == Slots(["a", "b"], 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert Slots.parse(None).devices == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert Slots.parse(None).devices == ["cpu0"]  # a CPU-only host: one training at a time
    with pytest.raises(ValueError, match="--gpus: no device named"):
        Slots.parse("")
    with pytest.raises(ValueError, match="--gpus a,a: name each device once"):
        Slots.parse("a,a")
    with pytest.raises(ValueError, match="--per-gpu 0: must be >= 1"):
        Slots.parse("a", 0)


# --------------------------------------------------------------------------- real DVC

@pytest.mark.slow
def test_local_run_follows_the_dag_on_two_gpus_and_leaves_dvc_clean(project):
    project.set_params(tiny_params(project.params, {"tracking": {"enabled": False}}),
                       replace=("ablation",))
    project.commit("tiny profile")
    unique_host(project)
    t0 = time.monotonic()
    code, out, err = local(project, "--gpus", "a,b")
    wall = time.monotonic() - t0
    assert code == 0, (out[-4000:], err[-3000:])
    lines = stage_lines(out)
    first, done = {}, {}
    for i, (stage, text) in enumerate(lines):
        first.setdefault(stage, i)
        if text.startswith("ran in "):
            done[stage] = i
    assert set(done) == TINY_STAGES
    dag = flows_dag.read_dag(project.path)
    for name in TINY_STAGES:  # nothing starts before its upstream stages finished
        assert all(done[u] < first[name] for u in dag[name].upstream), name
    # two slots: two trainings at once, never more, never two on one device
    held: dict[str, str] = {}
    top = 0
    for stage, text in lines:
        if m := re.match(r"GPU slot taken: device (\S+)$", text):
            assert m[1] not in held.values(), f"{stage} took {m[1]} while {held} held"
            held[stage] = m[1]
            top = max(top, len(held))
        elif text.startswith("GPU slot released"):
            del held[stage]
    assert top == 2 and held == {}
    rows = final_table(out)
    assert {n: r["status"] for n, r in rows.items()} == dict.fromkeys(TINY_STAGES, "ran")
    assert {n for n, r in rows.items() if r["gpu"] in ("a", "b")} == TRAINING
    assert all(rows[n]["gpu"] == "-" for n in TINY_STAGES - TRAINING)
    assert "Data and pipelines are up to date" in project.dvc("status").stdout
    t1 = time.monotonic()
    code, out, err = local(project, "--gpus", "a,b")
    assert code == 0, err[-3000:]
    assert {r["status"] for r in final_table(out).values()} == {"unchanged"}
    print(f"\nlocal run of the tiny pipeline: {wall:.1f} s; no-op re-run {time.monotonic() - t1:.1f} s")


@pytest.mark.slow
def test_gpu_slots_bound_concurrency_and_set_cuda_visible_devices(probes):
    code, out, err = local(probes, "probe", "--gpus", "a", "--per-gpu", "2")
    assert code == 0, err[-3000:]
    runs = probe_runs(probes)
    assert peak([(r["start"], r["end"]) for r in runs]) == 2
    assert {r["device"] for r in runs} == {"a"}

    code, out, err = local(probes, "probe", "--gpus", "a,b", "--force")
    assert code == 0, err[-3000:]
    runs = probe_runs(probes)
    assert peak([(r["start"], r["end"]) for r in runs]) == 2
    for dev in ("a", "b"):  # one stage per device at a time
        assert peak([(r["start"], r["end"]) for r in runs if r["device"] == dev]) == 1
    assert {r["device"] for r in runs} == {"a", "b"}
    assert {n: r["gpu"] for n, r in final_table(out).items()} == {n: r["device"] for n, r in
                                                                  zip(PROBES, runs)}

    probes.env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU-only host, no --gpus
    code, out, err = local(probes, "probe", "--force")
    assert code == 0, err[-3000:]
    runs = probe_runs(probes)
    assert peak([(r["start"], r["end"]) for r in runs]) == 1
    assert {r["device"] for r in runs} == {""}  # left as it was
    assert {r["gpu"] for r in final_table(out).values()} == {"cpu0"}


@pytest.mark.slow
def test_a_failed_stage_stops_its_downstream_and_the_others_go_on(probes):
    before = (probes.path / "params.yaml").read_text()
    code, out, err = local(probes, "probe_sum", "-S", "probe.fail=[2]", "--gpus", "a,b")
    assert code == 1, (out[-3000:], err[-3000:])
    assert {n: r["status"] for n, r in final_table(out).items()} == {
        "probe@0": "ran", "probe@1": "ran", "probe@2": "failed", "probe@3": "ran",
        "probe_sum": "not run (upstream failed)"}
    assert "2 of 5 stages failed or were not run: probe@2, probe_sum" in err
    assert "probe 2: failing as asked" in err  # the stage's own last words
    assert not (probes.path / "probe_sum.json").exists()
    assert (probes.path / "params.yaml").read_text() == before
    assert "local-" not in probes.dvc("exp", "show", "--json").stdout  # a failed run saves nothing

    # the DAG is read with the overrides applied: a new item is a new stage
    code, out, err = local(probes, "probe", "probe_sum", "-S", "probe.sleep_s=1",
                           "-S", "probe.items=[0,1,2,3,4]", "--gpus", "a,b")
    assert code == 0, err[-3000:]
    assert final_table(out).keys() == {*PROBES, "probe@4", "probe_sum"}
    assert {r["status"] for r in final_table(out).values()} == {"ran"}
    assert (probes.path / "params.yaml").read_text() == before
    exps = json.loads(probes.dvc("exp", "show", "--json").stdout)
    found = [e for base in exps for e in (base.get("experiments") or [])
             if (e.get("name") or "").startswith("local-")]
    assert len(found) == 1
    assert found[0]["revs"][0]["data"]["params"]["params.yaml"]["data"]["probe"]["sleep_s"] == 1
