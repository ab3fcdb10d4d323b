"""`dvc repro` download -> tokenizer -> pretrain@baseline + pretrain@pcgpt in a throwaway
git+DVC copy, then the MLflow SQLite store read back through MLflow's client."""

from __future__ import annotations

from pathlib import Path

import mlflow
import mlflow.artifacts
import pytest
from mlflow.tracking import MlflowClient

from pipeline.metrics import read_run_metrics, run_seed_metrics

pytestmark = pytest.mark.slow
RUNS = ("baseline", "pcgpt")
TINY = {
    "seeds": [0],
    "data": {"source": "synthetic", "catalog": {"synthetic": {"n_docs": 200, "min_len": 4, "max_len": 16}}},
    "tokenizer": {"kind": "char"},
    "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "train": {"steps": 20, "micro_batch": 4, "warmup_steps": 4, "eval_every": 10, "eval_batches": 2,
              "log_every": 5, "save_every": 10, "sample_tokens": 8, "threads": 1},
}


def test_repro_trains_both_runs_and_tracks_them_in_mlflow(project):
    project.set_params(TINY)
    project.commit("tiny pipeline")
    proc = project.dvc("repro", *(f"pretrain@{r}" for r in RUNS))
    for stage in ("download", "tokenizer", *(f"pretrain@{r}" for r in RUNS)):
        assert f"Running stage '{stage}'" in proc.stdout, stage
    p, params = project.path, project.params
    for run in RUNS:
        m = read_run_metrics(run_seed_metrics(p / "metrics/pretrain", run, 0))
        assert m["run"] == run and m["step"] == 20
        assert (p / f"models/{run}/model.safetensors").is_file()
        assert len((p / f"metrics/pretrain/{run}/0_curve.tsv").read_text().splitlines()) == 3
    assert "Data and pipelines are up to date" in project.dvc("status", *(f"pretrain@{r}" for r in RUNS)).stdout
    assert "Running stage" not in project.dvc("repro", "pretrain@pcgpt").stdout

    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    parents = client.search_runs([exp.experiment_id], "tags.`pcgpt.kind` = 'pipeline'")
    first_parent = [r for r in parents if any(
        c.data.tags.get("mlflow.parentRunId") == r.info.run_id
        for c in client.search_runs([exp.experiment_id], "tags.`pcgpt.kind` = 'stage'"))]
    assert len(first_parent) == 1, [r.info.run_name for r in parents]
    parent = first_parent[0]
    children = {r.info.run_name: r for r in client.search_runs(
        [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert {f"pretrain@{r}" for r in RUNS} <= set(children), sorted(children)

    for run in RUNS:
        child = children[f"pretrain@{run}"]
        assert child.info.status == "FINISHED"
        assert child.data.params["train.steps"] == "20" and child.data.params["model.n_layer"] == "2"
        assert child.data.params["pc.algorithm"] == params["runs"][run]["pc"]["algorithm"]
        tags = child.data.tags
        assert tags["dvc.stage"] == f"pretrain@{run}" and tags["git.commit"] and tags["device"] == "cpu"
        assert tags["data.manifest_sha256"]
        history = client.get_metric_history(child.info.run_id, "train/loss")
        assert sorted({h.step for h in history}) == [5, 10, 15, 20]
        assert sorted(h.step for h in client.get_metric_history(child.info.run_id, "val/bpb")) == [10, 20]
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"meta.json", "0.json", "0_details.json", "0_curve.tsv", "0_diagnostics.tsv",
                f"{run}_samples.json", f"{run}_attention.json"} <= artifacts, artifacts

    name = f"{params['tracking']['registered_model']}-baseline"
    mlflow.set_tracking_uri(project.env["MLFLOW_TRACKING_URI"])
    model = mlflow.pyfunc.load_model(f"models:/{name}@{params['tracking']['model_alias']}")
    # the registered model ships only the model package, the tokenizer library and the loader
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{params['tracking']['model_alias']}"))
    code = sorted(str(p.relative_to(local / "code")) for p in (local / "code").rglob("*.py"))
    assert [c for c in code if not c.startswith("model/")] == [
        "pipeline/__init__.py", "pipeline/model_dir.py", "pipeline/tokenizer.py"], code
    assert "model/gpt.py" in code and (local / "pyfunc.py").is_file()  # the model's own code
    out = model.predict(["a"], params={"max_new_tokens": 5, "seed": 1})
    again = model.predict(["a"], params={"max_new_tokens": 5, "seed": 1})
    assert len(out) == 1 and out[0].startswith("a") and len(out[0]) > 1 and out == again
