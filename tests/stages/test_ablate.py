"""The ablation grid: item configs change one factor; the whole pipeline runs under real DVC."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.params import ParamsError
from stages.ablate import item_config, load_ablation
from tests.conftest import ROOT

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def test_default_grid_covers_the_four_questions_one_factor_each():
    abl = load_ablation(PARAMS)
    questions = {v.question for v in abl.variants.values()}
    assert questions == {"control", "precision", "distribution", "pathway", "settling"}
    assert len(abl.seeds) >= 2
    base = item_config(PARAMS, abl, abl.base, abl.seeds[0])
    for name, v in abl.variants.items():
        cfg = item_config(PARAMS, abl, name, abl.seeds[0])
        assert cfg.seed == abl.seeds[0]
        # every item runs at the grid's scale
        assert cfg.model["n_layer"] == abl.scale["model"]["n_layer"]
        assert cfg.train.steps == abl.scale["train"]["steps"]
        if name == "bp" or not v.override:
            continue
        # exactly the overridden keys differ from the base (one factor per variant)
        for section, keys in v.override.items():
            base_sec = base.model if section == "model" else vars(getattr(base, section))
            item_sec = cfg.model if section == "model" else vars(getattr(cfg, section))
            assert base_sec != item_sec, name
            for key in set(base_sec) - set(keys):
                assert base_sec[key] == item_sec[key], (name, key)
    settle = sorted(item_config(PARAMS, abl, n, 0).pc.settle_steps
                    for n, v in abl.variants.items() if n.startswith("settle_T") or n == abl.base)
    assert settle == [0, 1, 2, 4, 8]
    test_time = sorted(v.eval.attn_settle_steps for v in abl.variants.values()
                       if v.eval.attn_settle_steps is not None)
    assert test_time == [1, 4]


@pytest.mark.parametrize("patch, message", [
    ({"base": "nope"}, "ablation.base='nope': no such run"),
    ({"seeds": []}, "seeds: must list at least one seed"),
    ({"seeds": [1, 1]}, "must not repeat"),
    ({"variants": {"x-y": {"question": "control"}}}, "names may hold letters, digits and '_' only"),
    ({"variants": {"x": {"question": "speed"}}}, "ablation.variants.x.question: 'speed' is not allowed"),
    ({"variants": {"x": {"question": "control", "override": {"optim": {}}}}},
     "variants.x.override.optim: unknown section"),
    ({"variants": {"x": {"question": "control", "override": {"pc": {"errr": "laplace"}}}}},
     "pc.errr: unknown key"),
    ({"variants": {"x": {"question": "control", "override": {"pc": {"error": "cauchy"}}}}},
     "pc.error='cauchy': must be one of gaussian, student_t, laplace"),
])
def test_bad_ablation_params_name_the_key(patch, message):
    params = json.loads(json.dumps(PARAMS))
    params["ablation"].update(patch)
    with pytest.raises(ParamsError, match=re.escape(message)):
        abl = load_ablation(params)
        for name in abl.variants:
            item_config(params, abl, name, abl.seeds[0])


# -- the whole pipeline, end to end ----------------------------------------------------

TINY = {
    "data": {"source": "synthetic", "catalog": {"synthetic": {"n_docs": 200, "min_len": 4, "max_len": 16}}},
    "tokenizer": {"kind": "char"},
    "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32},
    "train": {"steps": 12, "micro_batch": 4, "warmup_steps": 2, "eval_every": 6, "eval_batches": 2,
              "log_every": 6, "save_every": 6, "sample_tokens": 8, "threads": 1},
    "runs": {"pcgpt": {"pc": {"settle_steps": 2}}},
}
GRID = {
    "seeds": [0, 1],
    "scale": {"model": {"n_layer": 2, "n_embd": 16, "n_head": 2, "block_size": 16},
              "train": {"steps": 8, "eval_every": 4, "save_every": 4, "log_every": 4,
                        "sample_prompts": ["ab"], "sample_tokens": 4}},
    "variants": {
        "pcgpt": {"question": "control", "description": "PC-GPT default"},
        "bp": {"question": "control", "override": {"pc": {"algorithm": "bp"},
                                                   "model": {"attention": {"kernel": "dot",
                                                                           "precision": "fixed"}}}},
        "settle_T1": {"question": "settling", "override": {"pc": {"settle_steps": 1}}},
        "attn_settle_1": {"question": "settling", "eval": {"attn_settle_steps": 1}},
    },
}


def ran(stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", stdout))


@pytest.mark.slow
def test_whole_pipeline_repro_then_noop_then_only_new_variant(project):
    grid = {**project.params["ablation"], **GRID}  # the default grid's variants replaced
    project.set_params({**TINY, "ablation": grid}, replace=("ablation",))
    project.commit("tiny pipeline")

    first = ran(project.dvc("repro").stdout)
    items = {f"ablate@{v}-{s}" for v in GRID["variants"] for s in GRID["seeds"]}
    assert first == {"download", "tokenizer", "pretrain@baseline", "pretrain@pcgpt", "report"} | items

    p = project.path
    # every declared output exists
    outs = yaml.safe_load((p / "dvc.lock").read_text())["stages"]
    for stage, entry in outs.items():
        for out in entry.get("outs", []):
            assert (p / out["path"]).exists(), (stage, out["path"])
    for item in items:
        m = json.loads((p / f"metrics/ablate/{item.split('@')[1]}.json").read_text())
        assert m["step"] == 8 and math.isfinite(m["val/loss"])
        assert m["question"] == GRID["variants"][m["variant"]]["question"]
    settle = json.loads((p / "metrics/ablate/settle_T1-0.json").read_text())
    assert settle["override"] == {"pc.settle_steps": 1} and settle["pc/settle_steps"] == 1
    test_time = json.loads((p / "metrics/ablate/attn_settle_1-0.json").read_text())
    assert test_time["override"] == {"eval.attn_settle_steps": 1}
    base = json.loads((p / "metrics/ablate/pcgpt-0.json").read_text())
    assert test_time["train/loss"] == base["train/loss"]  # trained exactly like the base
    for f in ("report.md", "report.html", "results.csv", "results.parquet"):
        assert (p / "reports" / f).stat().st_size > 0, f
    assert "Data and pipelines are up to date" in project.dvc("status").stdout

    # a second repro does nothing
    assert ran(project.dvc("repro").stdout) == set()

    # adding a variant runs only its items and the report
    project.set_params({"ablation": {"variants": {
        **GRID["variants"], "err_laplace": {"question": "distribution",
                                             "override": {"pc": {"error": "laplace"}}}}}})
    assert ran(project.dvc("repro").stdout) == {"ablate@err_laplace-0", "ablate@err_laplace-1", "report"}
    assert "err_laplace" in (p / "reports/report.md").read_text()

    # every item is an MLflow child run of a pipeline parent, tagged with variant and seed
    client = MlflowClient(project.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(project.params["tracking"]["experiment"])
    runs = client.search_runs([exp.experiment_id], "tags.`ablation.variant` = 'settle_T1'")
    assert sorted(r.data.tags["ablation.seed"] for r in runs) == ["0", "1"]
    for r in runs:
        parent = client.get_run(r.data.tags["mlflow.parentRunId"])
        assert parent.data.tags["pcgpt.kind"] == "pipeline"
        assert r.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(r.info.run_id, "val/loss")] == [4, 8]
