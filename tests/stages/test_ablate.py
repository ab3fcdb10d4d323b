"""The ablation grid: item configs change one factor; the whole pipeline runs under real DVC."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.metrics import read_run_metrics, run_seed_metrics
from pipeline.params import ParamsError, check_seeds
from stages.ablate import check_params, item_config, load_ablation

# A small grid of this test's own (the shipped params.yaml grid is a setting, not a contract).
PARAMS = {
    "seed": 5,
    "seeds": [0, 1, 2],
    "model": {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 16},
    "pc": {"algorithm": "bp"},
    "train": {"steps": 8, "micro_batch": 4},
    "runs": {"baseline": {},
             "bp_gaussian": {"model": {"attention": {"kernel": "gaussian", "precision": "head"}}},
             "pcgpt": {"model": {"attention": {"kernel": "gaussian", "precision": "head"}},
                       "pc": {"algorithm": "pc", "settle_steps": 2, "state_lr": 1.0, "precision": "layer"}}},
    "ablation": {
        "base": "pcgpt",
        "variants": {
            "err_prec_fixed": {"question": "precision", "override": {"pc": {"precision": "fixed"}}},
            "attn_laplace": {"question": "distribution", "override": {"model": {"attention": {"kernel": "laplace"}}}},
            "settle_T1": {"question": "settling", "override": {"pc": {"settle_steps": 1}}},
            "settle_T4": {"question": "settling", "override": {"pc": {"settle_steps": 4}}},
            "attn_settle_2": {"question": "settling", "eval": {"attn_settle_steps": 2}},
            "fixed": {"question": "equivalence", "versus": "bp_gaussian",
                      "override": {"pc": {"fixed_predictions": True, "precision": "fixed"}}},
        },
    },
}


def test_items_run_at_the_pretrain_scale_and_change_one_factor_each():
    abl = load_ablation(PARAMS)
    base = item_config(PARAMS, abl, "settle_T1", 1)
    assert base.seed == 1 and base.model.n_embd == 16 and base.train.steps == 8  # the pretrain scale
    assert base.model.n_layer == 2 and base.pc.algorithm == "pc"                  # the base run
    ref = item_config(PARAMS, abl, "attn_settle_2", 1).to_params()  # trained exactly as the base
    from stages.pretrain.config import load_config
    assert {**load_config("pcgpt", PARAMS).to_params(), "seed": 1} == ref
    for name, v in abl.variants.items():
        a = item_config(PARAMS, abl, name, 1).to_params()
        changed = {f"{sec}.{k}" for sec in ("model", "pc", "train") for k in a[sec] if a[sec][k] != ref[sec][k]}
        overridden = {f"{sec}.{k}" for sec, keys in v.override.items() for k in keys}
        assert changed == overridden, name  # exactly the overridden keys differ from the base
    assert item_config(PARAMS, abl, "settle_T4", 0).pc.settle_steps == 4
    assert abl.variants["attn_settle_2"].eval.attn_settle_steps == 2


@pytest.mark.parametrize("patch, message", [
    ({"base": "nope"}, "ablation.base='nope': no such run"),
    ({"variants": {"x-y": {"question": "settling"}}}, "names may hold letters, digits and '_' only"),
    ({"variants": {"x": {"question": "speed"}}}, "ablation.variants.x.question: 'speed' is not allowed"),
    ({"variants": {"x": {"question": "settling", "override": {"optim": {}}}}},
     "variants.x.override.optim: unknown section"),
    ({"variants": {"x": {"question": "settling", "override": {"pc": {"errr": "laplace"}}}}},
     "pc.errr: unknown key"),
    ({"variants": {"x": {"question": "settling", "override": {"pc": {"error": "cauchy"}}}}},
     "pc.error='cauchy': must be one of gaussian, student_t, laplace"),
    ({"variants": {"pcgpt": {"question": "settling"}}}, "ablation.variants.pcgpt: also the name of a run"),
    ({"variants": {"x": {"question": "equivalence"}}}, "variants.x.versus: an equivalence check names the run"),
    ({"variants": {"x": {"question": "equivalence", "versus": "bp"}}},
     "ablation.variants.x.versus: 'bp' is not a run"),
    ({"scale": {"model": {"n_embd": 8}}}, "ablation.scale: unknown key"),
])
def test_bad_ablation_params_name_the_key(patch, message):
    params = json.loads(json.dumps(PARAMS))
    params["ablation"].update(patch)
    with pytest.raises(ParamsError, match=re.escape(message)):
        check_params(params)


@pytest.mark.parametrize("seeds, message", [([], "seeds: expected a non-empty list"), ([1, 1], "must not repeat"),
                                            ("0", "seeds: expected a non-empty list")])
def test_bad_seeds_name_the_key(seeds, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        check_seeds({"seeds": seeds})
    assert check_seeds({"seed": 7}) == [7]  # default: the shared seed


def test_every_broken_variant_is_named_at_once():
    params = json.loads(json.dumps(PARAMS))
    params["ablation"]["variants"]["settle_T1"]["override"]["pc"]["settle_steps"] = -1
    params["ablation"]["variants"]["attn_laplace"]["override"]["model"]["attention"]["kernel"] = "laplce"
    with pytest.raises(ParamsError) as e:
        check_params(params)
    assert len(e.value.problems) == 2
    assert "after merging ablation.variants.settle_T1" in e.value.problems[1]
    assert "model.attention.kernel='laplce'" in e.value.problems[0]


# -- the whole pipeline, end to end ----------------------------------------------------

TINY = {
    "seeds": [0, 1],
    "data": {"source": "synthetic", "catalog": {"synthetic": {"n_docs": 200, "min_len": 4, "max_len": 16}}},
    "tokenizer": {"kind": "char"},
    "model": {"block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 16},
    "train": {"steps": 8, "micro_batch": 4, "warmup_steps": 2, "eval_every": 4, "eval_batches": 2,
              "log_every": 4, "save_every": 4, "sample_prompts": ["ab"], "sample_tokens": 4, "threads": 1},
    "runs": {"pcgpt": {"pc": {"settle_steps": 2}}, "pc_dot": {"pc": {"settle_steps": 2}}},
}
GRID = {
    "variants": {
        "settle_T1": {"question": "settling", "override": {"pc": {"settle_steps": 1}}},
        "attn_settle_1": {"question": "settling", "eval": {"attn_settle_steps": 1}},
        "fixed_predictions": {"question": "equivalence", "versus": "bp_gaussian",
                              "override": {"pc": {"fixed_predictions": True, "settle_steps": 2}}},
    },
}
RUNS = ("baseline", "bp_gaussian", "pc_dot", "pcgpt")


def ran(stdout: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", stdout))


@pytest.mark.slow
def test_whole_pipeline_repro_then_noop_then_only_new_variant(project):
    grid = {**project.params["ablation"], **GRID}  # the default grid's variants replaced
    project.set_params({**TINY, "ablation": grid}, replace=("ablation",))
    project.commit("tiny pipeline")

    first = ran(project.dvc("repro").stdout)
    items = {f"ablate@{v}-{s}" for v in GRID["variants"] for s in TINY["seeds"]}
    assert first == {"download", "tokenizer", "report"} | {f"pretrain@{r}" for r in RUNS} | items

    p = project.path
    # every declared output exists
    outs = yaml.safe_load((p / "dvc.lock").read_text())["stages"]
    for stage, entry in outs.items():
        for out in entry.get("outs", []):
            assert (p / out["path"]).exists(), (stage, out["path"])
    for item in items:
        m = read_run_metrics(p / f"metrics/ablate/{item.split('@')[1]}.json")
        assert m["step"] == 8 and math.isfinite(m["val/loss"])
        assert m["question"] == GRID["variants"][m["variant"]]["question"]
    settle = read_run_metrics(p / "metrics/ablate/settle_T1-0.json")
    assert settle["override"] == {"pc.settle_steps": 1} and settle["pc/settle_steps"] == 1
    test_time = read_run_metrics(p / "metrics/ablate/attn_settle_1-0.json")
    assert test_time["override"] == {"eval.attn_settle_steps": 1}
    base = read_run_metrics(run_seed_metrics(p / "metrics/pretrain", "pcgpt", 0))
    assert test_time["train/loss"] == base["train/loss"]  # trained exactly like the base (the pretrain run)
    # every run's seeds, and the mean over them as the DVC metric
    for run in RUNS:
        seeds = [read_run_metrics(run_seed_metrics(p / "metrics/pretrain", run, s)) for s in TINY["seeds"]]
        mean = json.loads((p / f"metrics/pretrain/{run}.json").read_text())
        assert mean["seeds"] == 2 and mean["val/loss"] == pytest.approx(sum(m["val/loss"] for m in seeds) / 2)
    # the equivalence check holds exactly: fixed predictions at T = n_layer, state_lr 1 is backprop
    for seed in TINY["seeds"]:
        fixed = read_run_metrics(p / f"metrics/ablate/fixed_predictions-{seed}.json")
        bp = read_run_metrics(run_seed_metrics(p / "metrics/pretrain", "bp_gaussian", seed))
        assert fixed["val/loss"] == pytest.approx(bp["val/loss"], abs=1e-5), seed
        assert fixed["versus"] == "bp_gaussian"
    # equal up to float rounding (the val losses above agree to 1e-5): a passing check
    assert re.search(r"fixed_predictions: (identical to|equal to) bp_gaussian on every seed",
                     (p / "reports/report.md").read_text())
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
    # every seed of a pretrain run is its own MLflow run; only the first seed's model is registered
    seeds = client.search_runs([exp.experiment_id], "tags.`pcgpt.run` = 'pcgpt'")
    assert sorted(r.data.tags["pcgpt.seed"] for r in seeds) == ["0", "1"]
    name = f"{project.params['tracking']['registered_model']}-pcgpt"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # the PC diagnostics over training: in MLflow with a step, in the curve and the long table
    for r in seeds:
        assert [m.step for m in client.get_metric_history(r.info.run_id, "pc/grad_cos")] == [4, 8]
    curve = (p / "metrics/pretrain/pcgpt/1_curve.tsv").read_text().splitlines()
    assert "grad_cos" in curve[0].split("\t") and len(curve) == 3
    diag = (p / "metrics/pretrain/pcgpt/1_diagnostics.tsv").read_text().splitlines()
    assert {ln.split("\t")[2] for ln in diag[1:]} >= {"pc/grad_cos", "pc/precision", "pc/error_energy"}
