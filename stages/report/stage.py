"""The report stage from params to files: validate every input, then write every output,
then (from `main`) log them to MLflow. See __init__.py for what it reads and writes."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.io import atomic_dir, atomic_path, write_text
from pipeline.params import PARAMS_FILE, ParamsError, fail, load_section, read_params, validate
from stages.ablate import load_ablation
from stages.report import config
from stages.report.config import ReportConfig, ReportInputs, report_inputs
from stages.report.document import build_document
from stages.report.inputs import Inputs, ReportInputError, load_inputs, results_table
from stages.report.render import to_html, to_markdown

TITLE = "PC-GPT: predictive coding vs backprop"


def prepare(root: Path = Path("."), params_file: Path | None = None
            ) -> tuple[ReportConfig, ReportInputs, Inputs, dict[str, Any]]:
    """Check the params the report reads, then read + validate every input (nothing is written)."""
    params_file = params_file or root / PARAMS_FILE
    params = read_params(params_file)
    validate(params, [config.check_params, tracking.check_params])
    cfg = load_section(ReportConfig, "report", params_file, params=params)
    ins = report_inputs(params)
    grid = load_ablation(params) if "ablation" in params else None
    return cfg, ins, load_inputs(cfg, ins, root, grid, params_file), params


def write_report(inputs: Inputs, cfg: ReportConfig, ins: ReportInputs, root: Path,
                 params: dict[str, Any] | None = None) -> dict[str, Path]:
    """Draw and build everything first: the figures in a folder that then replaces figures/
    whole, the files each atomically once all of it is built; a failure leaves the previous
    report untouched."""
    out = root / cfg.out_dir
    paths = {name: out / name for name in ("report.md", "report.html", "results.parquet", "results.csv")}
    with atomic_dir(out / "figures") as fig_dir:
        results = results_table(inputs)
        blocks, subtitle = build_document(inputs, results, cfg, ins, root, fig_dir, params)
        markdown, html = to_markdown(TITLE, blocks, "figures"), to_html(TITLE, subtitle, blocks)
        with atomic_path(paths["results.parquet"]) as tmp:
            results.to_parquet(tmp, index=False, engine="pyarrow")
        with atomic_path(paths["results.csv"]) as tmp:
            results.to_csv(tmp, index=False)
        write_text(paths["report.md"], markdown)
        write_text(paths["report.html"], html)
    return {**paths, "figures": out / "figures"}


def log_report(tracker: tracking.Tracker, paths: dict[str, Path]) -> None:
    """Log the report files as artifacts under `report/`: to the report's own stage run and to
    the pipeline's parent run, where a researcher opening the pipeline execution finds them.
    `tracker` comes from `pipeline.tracking.stage_run` (MLflow or null); a failed upload is
    the tracker's one warning, never an error."""
    for to_parent in (False, True):
        for path in paths.values():
            tracker.log_artifact(path, f"report/{path.name}" if path.is_dir() else "report",
                                 to_parent=to_parent)


def run(root: Path = Path("."), params_file: Path | None = None) -> dict[str, Path]:
    """Validate every input, then write the report (no tracking); returns the written paths."""
    cfg, ins, inputs, params = prepare(root, params_file)
    return write_report(inputs, cfg, ins, root, params)


def main() -> int:
    t0 = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(".")
    try:
        cfg, ins, inputs, params = prepare(root)
        track_cfg = load_section(tracking.TrackingConfig, "tracking", params=params)
    except (ReportInputError, ParamsError) as e:
        fail("report", e)
    manifest = root / inputs.manifest[0] if inputs.manifest else None
    with tracking.stage_run("report", params=cfg, config=track_cfg, manifest=manifest) as tracker:
        paths = write_report(inputs, cfg, ins, root, params)
        log_report(tracker, paths)
    print(f"report: wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
