"""The Prefect flow's pieces that need no server: the DAG read from DVC, target selection,
DVC `-S` overrides, GPU device locks, and prefect.yaml against the code it deploys."""

from __future__ import annotations

import importlib
import re
import threading
import time

import pytest
import yaml

from pipeline import flows
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def dag():
    return flows.read_dag(ROOT)


def test_dag_comes_from_dvc_with_every_training_stage_after_the_tokenizer(dag):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    abl = params["ablation"]
    items = {f"ablate@{v}-{s}" for v in abl["variants"] for s in params["seeds"]}
    pretrain = {f"pretrain@{r}" for r in params["runs"]}
    assert set(dag) == {"download", "tokenizer", "report"} | pretrain | items
    order = list(dag)
    assert order[:2] == ["download", "tokenizer"] and order[-1] == "report"
    # ties in dvc.yaml's order: the pretrain runs (every seed in one process, the longest
    # stages) are submitted, and take GPU slots, before the grid items ready with them
    assert order[2:2 + len(pretrain)] == [f"pretrain@{r}" for r in params["runs"]]
    assert dag["tokenizer"].upstream == ("download",)
    for name in pretrain | items:  # all of them can run at once after the tokenizer
        assert dag[name].upstream == ("tokenizer",), name
        assert dag[name].gpu, name
    assert set(dag["report"].upstream) == pretrain | items | {"download", "tokenizer"}
    assert not any(dag[n].gpu for n in ("download", "tokenizer", "report"))
    # Ablation items are restorable from a run cache (no git-tracked output), so a
    # distributed run sends them to other hosts; pretrain's tracked metrics keep it local.
    assert all(not dag[n].uncached and flows.dispatched(dag[n], True) for n in items)
    assert all(dag[n].uncached and not flows.dispatched(dag[n], True) for n in pretrain)
    assert not any(flows.dispatched(dag[n], False) for n in dag)


def test_a_new_variant_is_a_new_stage_without_code_changes(project):
    params = project.params
    params["ablation"]["variants"]["attn_prec_token"] = {
        "question": "precision", "override": {"model": {"attention": {"precision": "token"}}}}
    project.set_params(params)
    dag = flows.read_dag(project.path)
    new = {f"ablate@attn_prec_token-{s}" for s in params["seeds"]}
    assert new <= set(dag)
    assert all(dag[n].upstream == ("tokenizer",) and dag[n].gpu for n in new)
    assert new <= set(dag["report"].upstream)


def test_targets_bring_their_upstream_stages_and_groups_expand(dag):
    assert flows.select(dag, ["tokenizer"]) == ["download", "tokenizer"]
    assert flows.select(dag, ["pretrain@pcgpt"]) == ["download", "tokenizer", "pretrain@pcgpt"]
    ablate = flows.select(dag, ["ablate"])
    assert ablate[:2] == ["download", "tokenizer"]
    assert set(ablate[2:]) == {n for n in dag if n.startswith("ablate@")}
    assert flows.select(dag, None) == flows.select(dag, []) == list(dag)
    assert flows.select(dag, ["report"]) == list(dag)
    with pytest.raises(ValueError, match=re.escape("targets: no stage 'pretrain@nope' in dvc.yaml")):
        flows.select(dag, ["pretrain@nope"])


def test_overrides_use_dvcs_own_parser_and_name_a_bad_key(project):
    text = flows.params_with(project.path, ["train.steps=7", "seeds=[3,4]",
                                            "tokenizer.kind=char"])
    new = yaml.safe_load(text)
    assert new["train"]["steps"] == 7 and new["seeds"] == [3, 4]
    assert new["tokenizer"]["kind"] == "char"
    assert (project.path / "params.yaml").read_text() != text  # the workspace is untouched
    assert not list(project.path.glob(".tmp-params-*"))
    with pytest.raises(ValueError, match=r"overrides \['train.stepz=7'\]:.*stepz"):
        flows.params_with(project.path, ["train.stepz=7"])
    with pytest.raises(ValueError, match="'train.steps' is not of the form key=value"):
        flows.params_with(project.path, ["train.steps"])
    with pytest.raises(ValueError, match="only params.yaml can be overridden"):
        flows.params_with(project.path, ["other.yaml:a=1"])


def test_a_flow_plans_the_dag_of_its_overridden_params(project):
    """Overrides of `seeds` (or of the grid) change which stages exist: the flow's plan reads
    the DAG with them applied, then leaves params.yaml as it was."""
    from pipeline.flows.flow import plan_run

    before = (project.path / "params.yaml").read_text()
    plan = plan_run(project.path, ["tokenizer"], ["seeds=[7]"], distribute=False)
    items = [n for n in plan.dag if n.startswith("ablate@")]
    assert items and all(n.endswith("-7") for n in items), items
    assert plan.order == ["download", "tokenizer"] and plan.devices == []
    assert (project.path / "params.yaml").read_text() == before


def test_device_locks_never_share_a_device_and_free_on_exit(monkeypatch):
    monkeypatch.setenv(flows.ENV_HOST, f"test-{time.time_ns()}")
    devices = ["0", "1"]
    held: list[str] = []
    peak, errors = [0], []
    guard = threading.Lock()

    def worker():
        with flows.first_free_device(devices) as dev:
            with guard:
                if dev in held:
                    errors.append(f"device {dev} taken twice")
                held.append(dev)
                peak[0] = max(peak[0], len(held))
            time.sleep(0.4)
            with guard:
                held.remove(dev)

    threads = [threading.Thread(target=worker) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and peak[0] == 2 and held == []


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    assert flows.visible_gpus() == ["2", "5"] == flows.slot_devices(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert flows.visible_gpus() == []
    assert flows.slot_devices(2) == ["cpu0", "cpu1"]  # a CPU-only host: one slot per limit


def test_prefect_yaml_matches_the_code_it_deploys():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"nightly", "adhoc", "any-host"}
    for d in deps.values():
        path, func = d["entrypoint"].split(":")
        assert path in ("pipeline/flows/flow.py", "pipeline/flows/hosts.py"), path
        obj = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), func)
        assert obj is getattr(flows, func)
        assert d["work_pool"]["name"] == flows.POOL
        jv = d["work_pool"]["job_variables"]
        assert jv["stream_output"] is False
        assert int(jv["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"]) == flows.HEARTBEAT_S
        assert jv["env"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
        if d["name"] == "any-host":
            assert f"{obj.name}/{d['name']}" == flows.STAGE_DEPLOYMENT
            assert "concurrency_limit" not in d  # stages of one run go out at once
        else:
            assert obj.name == "pcgpt"
            assert d["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert [s["cron"] for s in deps["nightly"]["schedules"]] == ["0 2 * * *"]
    assert "schedules" not in deps["adhoc"]
    assert flows.ZOMBIE_AFTER_S >= 3 * flows.HEARTBEAT_S  # prefect #18653: fewer misfires


def test_lock_pins_an_sqlalchemy_that_keeps_the_scheduler_working():
    # SQLAlchemy 2.1's bulk DML breaks Prefect 3.8.8's scheduler (cron deployments never
    # get runs); the scheduler test in test_flows_prefect.py exercises it.
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M))
    assert pins["SQLAlchemy"].startswith("2.0."), pins["SQLAlchemy"]
