"""The report stage: numbers, verdicts, failure on bad inputs, graceful skips, the page in a browser,
and the DVC stage with its MLflow artifacts."""

from __future__ import annotations

import base64
import functools
import http.server
import math
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats as sps

from pipeline.io import sha256_file
from pipeline.metrics import diverged_record, read_run_metrics, write_run_metrics
from pipeline.params import ParamsError, load_section
from stages.report import figures as report_figures
from stages.report import stats
from stages.report.config import ReportConfig
from stages.report.inputs import ReportInputError
from stages.report.stage import run
from tests.stages.report_fixtures import PRETRAIN, VARIANTS, write_report_inputs

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"


# This test's own `report` section (the shipped params.yaml is a setting, not a contract).
REPORT = {"confidence": 0.95, "baseline_run": "baseline", "kernel_run": "bp_gaussian", "pc_dot_run": "pc_dot",
          "pcgpt_run": "pcgpt", "metric": "val/loss", "table_metrics": ["val/acc", "perf/step_ms"],
          "headline_metrics": ["val/loss", "val/ppl", "val/bpb", "val/acc", "perf/tok_per_s", "mem/peak_gib"],
          "test_time_settle_key": "attn_settle", "samples_per_model": 3}


def _setup(root: Path, **kw):
    written = write_report_inputs(root, **kw)
    params = {"seed": 1337, "report": REPORT, **written.params, "tracking": {"enabled": False}}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return written


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One complete report from the hand-made inputs, shared by the read-only tests."""
    root = tmp_path_factory.mktemp("report")
    written = _setup(root)
    paths = run(root)
    return root, written, paths


# ---------------------------------------------------------------- the numbers

EXPECTED_VERDICTS = {  # by construction of the fixture's seed values (see report_fixtures)
    "pcgpt": "reference",
    "bp_gaussian": "higher val loss than pcgpt (worse)",
    "ipc": "lower val loss than pcgpt (better)",
    "attn_fixed": "higher val loss than pcgpt (worse)",
    "layer_fixed": "no detectable difference",
    "attn_student_t": "lower val loss than pcgpt (better)",
    "err_laplace": "no detectable difference",
    "bottom_up": "higher val loss than pcgpt (worse)",
    "T0": "higher val loss than pcgpt (worse)",
    "T1": "higher val loss than pcgpt (worse)",
    "T4": "no detectable difference",
    "attn_settle_4": "no detectable difference",
    "bp_matched": "lower val loss than pcgpt (better)",
    "fixed": "identical to bp_gaussian on every seed (as constructed)",
}


def grid_summary(root: Path, paths) -> dict:
    from stages.report.document import grid_rows

    results = pd.read_parquet(paths["results.parquet"])
    cfg = load_section(ReportConfig, "report", root / "params.yaml")
    return stats.summarize_ablation(grid_rows(results, cfg), cfg.metric, cfg.table_metrics, cfg.reference,
                                    cfg.confidence)


def test_ablation_means_intervals_and_verdicts(built):
    root, written, paths = built
    summ = grid_summary(root, paths)
    assert set(summ) == set(VARIANTS) | {"pcgpt", "bp_gaussian"}  # the reference and control: pretrain runs
    for name, s in summ.items():
        vals = written.val_losses(name)
        st = s.stats["val/loss"]
        assert st.n == 3 and st.mean == pytest.approx(np.mean(vals))
        assert st.half == pytest.approx(4.302653 * np.std(vals, ddof=1) / math.sqrt(3), rel=1e-5)
        assert s.verdict == EXPECTED_VERDICTS[name], name
        if name != "pcgpt":
            versus = "bp_gaussian" if name == "fixed" else "pcgpt"
            ci = sps.ttest_ind(vals, written.val_losses(versus), equal_var=False).confidence_interval(0.95)
            assert (s.diff.lo, s.diff.hi) == pytest.approx((ci.low, ci.high)) or name == "fixed"
    assert summ["fixed"].max_abs == 0.0 and summ["fixed"].diff.estimate == 0.0

    md = paths["report.md"].read_text().split("## Ablations")[1]
    # Hand-computed: pcgpt sd 0.02 -> ± 4.303*0.02/√3 = 0.050; attn_fixed − pcgpt = 0.100 with
    # Welch se 0.01633 on 4 df -> ± 2.776*0.01633 = 0.045.
    row = next(ln for ln in md.splitlines() if ln.startswith("| attn_fixed "))
    assert "| 3.100 ± 0.050 | +0.100 [+0.055, +0.145] | pcgpt | higher val loss than pcgpt (worse) |" in row
    row = next(ln for ln in md.splitlines() if ln.startswith("| attn_student_t "))
    assert "| 2.900 ± 0.050 | −0.100 [−0.145, −0.055] | pcgpt | lower val loss than pcgpt (better) |" in row
    # Each question's table lists its variants, the reference and the control, and nothing else.
    sections = re.split(r"^### ", md, flags=re.M)[1:]
    for title, q in [("Training algorithm", "algorithm"), ("Precision weighting", "precision"),
                     ("Distributions", "distribution"), ("Error propagation pathways", "pathway"),
                     ("Settling", "settling"), ("Compute-matched", "compute"), ("Equivalence checks", "equivalence")]:
        body = next(s for s in sections if s.startswith(title)).split("\n## ")[0]
        rows = {ln.split("|")[1].strip() for ln in body.splitlines()
                if ln.startswith("| ") and not ln.startswith("| Variant")}
        assert rows == {"pcgpt", "bp_gaussian"} | {v for v, spec in VARIANTS.items() if spec[0] == q}, title
    # The compute-matched table shows the wall clock of both budgets.
    body = next(s for s in sections if s.startswith("Compute-matched"))
    assert "Wall (s)" in body.split("\n| ")[0] + body


def test_headline_2x2_with_intervals(built):
    root, written, paths = built
    md = paths["report.md"].read_text()
    # mean ± t-interval of each run (pcgpt: 3.000 ± 0.050)
    row = next(ln for ln in md.splitlines() if ln.startswith("| val loss (nats/token) |"))
    assert "| 3.400 ± 0.050 | 3.300 ± 0.099 | 3.500 ± 0.124 | 3.000 ± 0.050 |" in row
    effects = {ln.split("|")[1].strip(): ln for ln in md.splitlines() if ln.startswith("| kernel effect")
               or ln.startswith("| algorithm effect") or ln.startswith("| PC-GPT vs")}
    for name, a, b in [("kernel effect (under backprop)", "bp_gaussian", "baseline"),
                       ("algorithm effect (PC-GPT attention)", "pcgpt", "bp_gaussian"),
                       ("kernel effect (under PC)", "pcgpt", "pc_dot"),
                       ("algorithm effect (dot attention)", "pc_dot", "baseline")]:
        ci = sps.ttest_ind(written.val_losses(a), written.val_losses(b), equal_var=False).confidence_interval(0.95)
        est = np.mean(written.val_losses(a)) - np.mean(written.val_losses(b))
        cell = f"{est:+.3f} [{ci.low:+.3f}, {ci.high:+.3f}]".replace("-", "−")
        assert cell in effects[name], (name, effects[name])
    assert "kernel effect (under backprop) | bp_gaussian − baseline | −0.100 [" in md
    assert "lower val loss than bp_gaussian (better)" in effects["algorithm effect (PC-GPT attention)"]
    # The reference lines and the chance check: fixture bpb = loss / ln 2 / 3.5, unigram 4.6.
    assert "4.600 bits/byte under the training unigram distribution" in md and "15.0 %" in md
    assert "every run ends ≥ 10 % below the unigram bpb" in md
    # the bp control's worst seed: accuracy 0.6 − 0.1 × 3.34 = 26.6 %, 1.77x the majority 15 %: below 2x
    assert "reaches val accuracy 26.6 % on its worst seed, 1.77× the majority-token accuracy 15.0 % (below 2×)" in md
    # The regime sentence comes from the runs' merged config.
    assert "pcgpt trains with `pc`, free predictions, T = 2 settling steps" in md
    assert "It is not backprop by construction" in md


def test_results_table(built):
    root, written, paths = built
    csv = pd.read_csv(paths["results.csv"])
    pq = pd.read_parquet(paths["results.parquet"])
    assert len(pq) == len(csv) == 4 * 3 + len(VARIANTS) * 3
    assert list(pq.columns) == list(csv.columns)
    # Every metric a stage wrote is a column, and the values round-trip.
    item = read_run_metrics(root / "metrics/ablate/T1-2.json")
    row = pq[pq["run"] == "T1-2"].iloc[0]
    assert row["variant"] == "T1" and row["seed"] == 2 and row["question"] == "settling"
    for k, v in item.items():
        if isinstance(v, (int, float)) and k != "seed":
            assert row[k] == pytest.approx(v), k
    seed = pq[(pq["source"] == "pretrain") & (pq["run"] == "pcgpt-1")].iloc[0]
    assert seed["variant"] == "pcgpt" and seed["val/loss"] == pytest.approx(PRETRAIN["pcgpt"][1])
    assert np.allclose(pq.select_dtypes("number").to_numpy(float), csv.select_dtypes("number").to_numpy(float),
                       equal_nan=True)


def test_outputs_are_self_contained_and_linked(built):
    root, _, paths = built
    figures = sorted(p.name for p in paths["figures"].glob("*.png"))
    assert {"curves.png", "diagnostics.png", "diagnostics_layers.png", "ablation_precision.png", "settling.png",
            "precision.png", "attention.png"} <= set(figures)
    assert "energy.png" not in figures  # no plot dominated by the −½·log π constant
    md = paths["report.md"].read_text()
    assert sorted(re.findall(r"\]\(figures/([^)]+)\)", md)) == figures
    html = paths["report.html"].read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == len(figures) and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert base64.b64decode(srcs[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    # Sample text is escaped, not interpreted.
    assert "&lt;through&gt; yonder window &amp; breaks" in html and "<through>" not in html
    # Provenance: the params digest is the file's sha256; library versions are listed.
    assert sha256_file(root / "params.yaml") in md
    assert re.search(r"\| torch \| \d+\.\d+", md) and "| hardware | cpu (fixture) |" in md
    assert not list(paths["report.md"].parent.glob(".tmp-*"))  # no staging left behind


def test_single_seed_says_no_interval(tmp_path):
    _setup(tmp_path, seeds=(7,))
    paths = run(tmp_path)
    md = paths["report.md"].read_text()
    row = next(ln for ln in md.split("## Ablations")[1].splitlines() if ln.startswith("| attn_fixed "))
    assert "| 1 | 3.100 | +0.100 | pcgpt | 1 seed: no interval |" in row
    assert "no detectable difference" not in md.split("## Ablations")[1].split("## Inside")[0]


def edit_run(path: Path, change) -> None:
    """Rewrite one run's metrics (headline + details) with `change(metrics)` applied, as a
    stage writes them."""
    m = read_run_metrics(path)
    change(m)
    write_run_metrics(path, m)


def test_diverged_seed_is_reported_not_hidden(tmp_path):
    _setup(tmp_path)
    p = tmp_path / "metrics/ablate/T0-1.json"
    item = read_run_metrics(p)
    # what ablate writes for an item that diverged (json writes NaN)
    write_run_metrics(p, {**diverged_record(item["run"], "loss is nan at step 3", "cpu"),
                          **{k: item[k] for k in ("variant", "seed", "question", "description", "override",
                                                  "versus")}})
    md = run(tmp_path)["report.md"].read_text()
    row = next(ln for ln in md.split("## Ablations")[1].splitlines() if ln.startswith("| T0 "))
    assert "| n/a | n/a | pcgpt | not computable (non-finite values) |" in row


# ------------------------------------------------------------------- failures

def _corrupt(kind: str, root: Path) -> str:
    """Break one input; return the path the error must name."""
    if kind == "missing pretrain":
        (root / "metrics/pretrain/pcgpt/1.json").unlink()
        return "metrics/pretrain/pcgpt/1.json"
    if kind == "malformed json":
        (root / "metrics/ablate/T1-1.json").write_text('{"val/loss": 3.0,')
        return "metrics/ablate/T1-1.json"
    if kind == "missing metric":
        edit_run(root / "metrics/ablate/ipc-0.json", lambda m: m.pop("val/loss"))
        return "metrics/ablate/ipc-0.json"
    if kind == "string metric":
        edit_run(root / "metrics/pretrain/baseline/2.json", lambda m: m.update({"perf/tok_per_s": "fast"}))
        return "metrics/pretrain/baseline/2.json"
    if kind == "missing grid item":
        (root / "metrics/ablate/err_laplace-2.json").unlink()
        return "metrics/ablate/err_laplace-2.json"
    if kind == "bad curve":
        (root / "metrics/pretrain/pcgpt/0_curve.tsv").write_text("step,tokens\n1,2\n")
        return "metrics/pretrain/pcgpt/0_curve.tsv"
    if kind == "bad diagnostics":
        (root / "metrics/pretrain/pcgpt/2_diagnostics.tsv").write_text("step\tmetric\n1\tx\n")
        return "metrics/pretrain/pcgpt/2_diagnostics.tsv"
    if kind == "missing tokens meta":
        (root / "data/tokens/meta.json").unlink()
        return "data/tokens/meta.json"
    if kind == "wrong file name":
        edit_run(root / "metrics/ablate/T4-0.json", lambda m: m.update({"seed": 5}))
        return "metrics/ablate/T4-0.json"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing pretrain", "malformed json", "missing metric", "string metric",
                                  "missing grid item", "bad curve", "bad diagnostics", "missing tokens meta",
                                  "wrong file name"])
def test_bad_input_names_the_file_and_writes_nothing(tmp_path, kind):
    _setup(tmp_path)
    bad = _corrupt(kind, tmp_path)
    with pytest.raises(ReportInputError) as err:
        run(tmp_path)
    assert bad in str(err.value)
    assert not (tmp_path / "reports").exists()


def test_failure_while_writing_leaves_no_partial_report(tmp_path, monkeypatch):
    _setup(tmp_path)
    run(tmp_path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "reports").iterdir() if p.is_file()}
    pngs = sorted(p.name for p in (tmp_path / "reports/figures").iterdir())

    def broken(*a, **k):
        raise RuntimeError("disk full while drawing")

    monkeypatch.setattr(report_figures, "precision", broken)
    edit_run(tmp_path / "metrics/pretrain/pcgpt/0.json", lambda m: m.update({"val/loss": 3.2}))
    with pytest.raises(RuntimeError):
        run(tmp_path)
    after = {p.name: p.read_bytes() for p in (tmp_path / "reports").iterdir() if p.is_file()}
    assert after == before  # the previous complete report, untouched
    assert sorted(p.name for p in (tmp_path / "reports/figures").iterdir()) == pngs
    assert not list((tmp_path / "reports").glob(".tmp-*"))


@pytest.mark.slow
def test_command_line_error_is_one_clean_line(tmp_path):
    _setup(tmp_path)
    bad = _corrupt("malformed json", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "stages.report"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith("report: error: ") and bad in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "reports").exists()


# ------------------------------------------------------------ graceful skips

def test_absent_optional_inputs_are_skipped_with_a_note(tmp_path):
    no_settling = {k: v for k, v in VARIANTS.items() if v[0] != "settling"}
    _setup(tmp_path, variants=no_settling, optional=False)
    # A PC-GPT with a fixed attention kernel: layer precision only, no per-head precision.
    edit_run(tmp_path / "metrics/pretrain/pcgpt/0.json",
             lambda m: [m.pop(k) for k in list(m) if k.startswith("attn/precision/")])
    paths = run(tmp_path)
    md = paths["report.md"].read_text()
    for note in ("Training curves skipped", "Attention maps skipped", "No samples file for baseline",
                 "No per-head attention precision", "No data manifest", "PC diagnostics over training skipped",
                 "Per-layer diagnostics skipped"):
        assert note in md, note
    assert "### Settling" not in md  # no settling variant in this grid: no table
    figures = {p.name for p in paths["figures"].glob("*.png")}
    assert {"precision.png", "ablation_precision.png"} <= figures
    assert not {"curves.png", "attention.png", "settling.png", "ablation_settling.png", "diagnostics.png"} & figures


def test_bp_reference_run_without_pc_diagnostics(tmp_path):
    # The headline PC-GPT run without any PC diagnostics (e.g. settling T=0 reported as bp):
    _setup(tmp_path)
    edit_run(tmp_path / "metrics/pretrain/pcgpt/0.json",
             lambda m: [m.pop(k) for k in list(m) if k.startswith(("pc/", "attn/"))])
    md = run(tmp_path)["report.md"].read_text()
    assert "Precision figure skipped" in md


# ------------------------------------------------------------------ browser

# Debian's packages (.ci/run installs them); an explicit driver path keeps selenium-manager offline.
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,1000", "--hide-scrollbars"]


def test_html_report_in_headless_chromium(built, tmp_path, monkeypatch):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        missing = "Debian chromium + chromium-driver not installed (.ci/run installs them)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing}; under CI=true the browser test must run, not skip")
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # never let selenium-manager download a driver
    _, _, paths = built
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(paths["report.html"].parent))

    class Quiet(http.server.ThreadingHTTPServer):
        def handle_error(self, request, client_address):  # a browser closing a socket is not a failure
            pass

    server = Quiet(("127.0.0.1", 0), lambda *a: handler(*a))
    server.RequestHandlerClass.log_message = lambda *a, **k: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = Options()
    opts.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS + [f"--user-data-dir={tmp_path / 'chrome-profile'}"]:
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/report.html")
        driver.execute_script("return document.fonts ? document.fonts.ready : true")
        imgs = driver.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
        n_png = len(list(paths["figures"].glob("*.png")))
        assert len(imgs) == n_png > 0
        assert all(complete and width > 0 for _, complete, width in imgs), imgs
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
        # Numbers are right-aligned in tabular figures; the reference row stands out.
        align = driver.execute_script(
            "const td = document.querySelector('td.r'); const s = getComputedStyle(td);"
            "return [s.textAlign, s.fontVariantNumeric]")
        assert align == ["right", "tabular-nums"]
        n_tables = len(re.findall(r"^### ", paths["report.md"].read_text(), flags=re.M))
        assert driver.execute_script("return document.querySelectorAll('tr.ref').length") == n_tables
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "report-top.png"))
        full = driver.execute_cdp_cmd("Page.captureScreenshot",
                                      {"format": "png", "captureBeyondViewport": True})
        (ARTIFACTS / "report-full.png").write_bytes(base64.b64decode(full["data"]))
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------- DVC + MLflow

@pytest.mark.slow
def test_dvc_stage_runs_and_logs_to_the_parent_run(project):
    """The report stage of the real dvc.yaml (alone) on hand-made inputs: outputs, no-op rerun,
    provenance commit, and the report as artifacts of the pipeline's parent MLflow run."""
    stage = yaml.safe_load((project.path / "dvc.yaml").read_text())["stages"]["report"]
    (project.path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"report": stage}}, sort_keys=False))
    written = write_report_inputs(project.path)
    project.set_params({"ablation": written.params["ablation"], "seeds": written.params["seeds"],
                        "runs": written.params["runs"]}, replace=("ablation", "runs"))
    project.commit("inputs")
    head = project.run("git", "rev-parse", "HEAD").stdout.strip()
    project.dvc("repro", "report")
    out = project.path / "reports"
    for name in ("report.md", "report.html", "results.parquet", "results.csv", "figures/curves.png"):
        assert (out / name).is_file(), name
    md = (out / "report.md").read_text()
    assert f"| git commit | {head} |" in md and "| working tree | clean" in md
    assert "Stage 'report' didn't change" in project.dvc("repro", "report").stdout
    assert "up to date" in project.dvc("status", "report").stdout.lower()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=project.env["MLFLOW_TRACKING_URI"])
    exp = client.get_experiment_by_name(project.params["tracking"]["experiment"])
    (parent,) = client.search_runs([exp.experiment_id], "tags.`pcgpt.kind` = 'pipeline'")
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/results.parquet", "report/figures"} <= logged
    (child,) = client.search_runs([exp.experiment_id], "tags.`pcgpt.kind` = 'stage'")
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id


def test_regime_says_when_pc_is_backprop_by_construction():
    """model/pc.py: fixed predictions at T >= n_layer with state_lr 1 (Gaussian, full pathway)
    give backprop's gradients; free predictions, fewer steps or a smaller step do not."""
    from model.config import PCConfig
    from stages.report.document import bp_by_construction

    fixed = dict(algorithm="pc", settle_steps=4, state_lr=1.0, fixed_predictions=True)
    assert "fixed predictions at equilibrium" in bp_by_construction(PCConfig(**fixed), 4)
    assert bp_by_construction(PCConfig(**{**fixed, "settle_steps": 8}), 4)
    for change in ({"settle_steps": 3}, {"state_lr": 0.5}, {"fixed_predictions": False},
                   {"error": "student_t"}, {"error_pathway": "bottom_up"}):
        assert bp_by_construction(PCConfig(**{**fixed, **change}), 4) is None, change
    assert bp_by_construction(PCConfig(algorithm="ipc", settle_steps=0), 4) == "T = 0 is defined as backprop"
    assert bp_by_construction(PCConfig(algorithm="bp"), 4) == "it is backprop"


def test_the_grid_base_must_be_the_headline_pcgpt_run():
    from stages.report.config import check_params

    params = {"runs": {r: {} for r in ("baseline", "bp_gaussian", "pc_dot", "pcgpt", "other")},
              "ablation": {"base": "other", "variants": {}}, "report": {}}
    with pytest.raises(ParamsError, match=re.escape("report.pcgpt_run: 'pcgpt' must be the ablation grid's base")):
        check_params(params)
    params["ablation"]["base"] = "pcgpt"
    check_params(params)
    params["report"]["kernel_run"] = "baseline"
    with pytest.raises(ParamsError, match="must be four different runs"):
        check_params(params)
