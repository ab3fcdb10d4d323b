"""What a flow run shows in the Prefect UI: a table of its stages, the report's headline
table and a link to its MLflow parent run."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import yaml
from prefect.artifacts import create_link_artifact, create_table_artifact

from pipeline import tracking


def mlflow_link(parent: tracking.Tracker) -> tuple[str, str] | None:
    """(address, link text) of the MLflow parent run; None without tracking."""
    if not parent.run_id:
        return None
    uri = tracking.tracking_uri()
    exp = getattr(parent, "experiment_id", "0")
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{parent.run_id}", "MLflow parent run"
    # A file store has no web address of its own: this is where `mlflow ui` serves it.
    return (f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{parent.run_id}",
            f"MLflow parent run (serve with: mlflow ui --backend-store-uri {uri})")


def headline_table(root: Path) -> list[dict[str, Any]] | None:
    """The report's headline (baseline vs PC-GPT on `report.headline_metrics`, the mean over
    each run's seeds), read from the results.csv the report stage wrote; None if there is no
    report."""
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    rep = params.get("report") or {}
    path = root / rep.get("out_dir", "reports") / "results.csv"
    if not path.is_file():
        return None
    runs: dict[str, list[dict[str, str]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r.get("source") == "pretrain":  # one row per seed; `variant` names the run
                runs.setdefault(r["variant"], []).append(r)
    names = [rep.get("baseline_run", "baseline"), rep.get("pcgpt_run", "pcgpt")]
    if not all(n in runs for n in names):
        return None

    def mean(rows: list[dict[str, str]], m: str) -> str:
        try:
            return repr(sum(float(r[m]) for r in rows) / len(rows))
        except (KeyError, ValueError):
            return ""
    return [{"metric": m, **{n: mean(runs[n], m) for n in names}} for m in rep.get("headline_metrics", [])]


def publish(rows: dict[str, dict[str, Any]], root: Path, parent: tracking.Tracker,
            report_ran: bool) -> None:
    """The run's artifacts: `pcgpt-stages`, `pcgpt-headline` (if the report ran),
    `pcgpt-mlflow` (if tracking is on)."""
    table = [{"stage": r["stage"], "status": r["status"], "wall_s": r.get("wall_s", ""),
              "waited_s": r.get("waited_s", ""), "gpu": r.get("gpu", ""), "host": r.get("host", ""),
              "error": r.get("error", "")} for r in rows.values()]
    create_table_artifact(table, key="pcgpt-stages",
                          description="Stages of this run: DVC's verdict (ran / restored from the "
                                      "run cache / unchanged), seconds running and waiting for a "
                                      "GPU slot, the device and host.")
    head = headline_table(root) if report_ran else None
    if head:
        create_table_artifact(head, key="pcgpt-headline",
                              description="The report's headline: baseline GPT vs PC-GPT, final "
                                          "evaluation (reports/results.csv).")
    link = mlflow_link(parent)
    if link:
        create_link_artifact(link[0], link_text=link[1], key="pcgpt-mlflow",
                             description="This pipeline execution in MLflow: the parent run, with "
                                         "every stage run as its child.")
