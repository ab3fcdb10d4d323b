"""What the training stages write and the report reads: metric names, units, files, questions.

One run's final metrics are one flat dict (`val/loss`, `perf/tok_per_s`, `pc/...`,
the names of DESIGN.md §5, the same in MLflow). `write_run_metrics` splits it in two:

    <name>.json          the headline numbers (HEADLINE, and PC_SUMMARY for PC runs):
                         the file DVC reads as metrics, so `dvc metrics show` and
                         `dvc exp show` stay readable
    <name>_details.json  everything else: run identity, device, parameter count, and the
                         per-layer / per-head diagnostics (not a DVC metric)

and `read_run_metrics` puts them back together. `METRICS` says how each headline
name is shown (label, unit, format) and which direction is better.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pipeline.io import write_json

HEADLINE = ("step", "train/loss", "val/loss", "val/ppl", "val/bpb", "val/acc", "perf/tok_per_s",
            "mem/peak_gib", "wall_s")
PC_SUMMARY = ("pc/energy_after", "pc/settle_residual")
"""A PC run's energy after settling (total over layers) and settling residual ‖∂E/∂x‖, of its
last training step. Two, not more: with them a `dvc metrics show` row of the default grid is
182 columns wide (the energy before settling, in the details, would make it 202)."""
CURVE_COLUMNS = ("step", "tokens", "wall_s", "train_loss", "val_loss", "lr")
"""Columns of `<run>_curve.tsv`: one row per evaluation (`dvc plots`, the report's curves)."""
DETAILS_SUFFIX = "_details"


def fmt_number(v: float | None, spec: str) -> str:
    """Format with a true minus sign (U+2212) so signed columns line up."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a" if v is None or math.isnan(v) else ("∞" if v > 0 else "−∞")
    return format(v, spec).replace("-", "−")


@dataclass(frozen=True)
class MetricSpec:
    """How a metric is shown: label, unit, number format, and which direction is better."""

    label: str
    unit: str
    fmt: str  # a format spec for float(), e.g. ".3f"
    better: Literal["lower", "higher"]
    scale: float = 1.0  # display = value * scale (accuracy as a percentage)
    short: str = ""  # column header in tables

    def show(self, value: float) -> str:
        return fmt_number(value * self.scale, self.fmt)


METRICS: dict[str, MetricSpec] = {
    "train/loss": MetricSpec("train loss", "nats/token", ".3f", "lower", short="Train loss"),
    "val/loss": MetricSpec("val loss", "nats/token", ".3f", "lower", short="Val loss"),
    "val/ppl": MetricSpec("val perplexity", "", ".2f", "lower", short="Val ppl"),
    "val/bpb": MetricSpec("val bpb", "bits/byte", ".3f", "lower", short="Val bpb"),
    "val/acc": MetricSpec("val accuracy", "%", ".1f", "higher", scale=100.0, short="Val acc (%)"),
    "val/unigram_bpb": MetricSpec("unigram bits per byte (reference line)", "bits/byte", ".3f", "lower",
                                  short="Unigram bpb"),
    "perf/tok_per_s": MetricSpec("throughput", "tokens/s", ",.0f", "higher", short="Tokens/s"),
    "perf/step_ms": MetricSpec("step time", "ms", ".1f", "lower", short="Step (ms)"),
    "perf/mfu_pct": MetricSpec("MFU", "%", ".2f", "higher", short="MFU (%)"),
    "mem/peak_gib": MetricSpec("peak memory", "GiB", ".3f", "lower", short="Peak mem (GiB)"),
    "wall_s": MetricSpec("wall time", "s", ".1f", "lower", short="Wall (s)"),
    "tokens": MetricSpec("training tokens", "", ",.0f", "higher", short="Tokens"),
    "n_params": MetricSpec("parameters", "", ",.0f", "lower", short="Params"),
}

REQUIRED_NUMERIC = ("step", "tokens", "wall_s", "train/loss", "val/loss", "val/ppl", "val/bpb",
                    "val/acc", "perf/tok_per_s", "perf/step_ms", "mem/peak_gib")
"""Keys every run's metrics carry, as numbers (the report refuses a file without them)."""


def is_number(v: Any) -> bool:
    """A metric value: int or float, not bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def numeric(d: dict[str, Any]) -> dict[str, float]:
    """The items of `d` that are metric values (what MLflow and the results table take)."""
    return {k: v for k, v in d.items() if is_number(v)}


# The research questions an ablation variant answers (`ablation.variants.<v>.question`):
# the report has one table per question, `control` rows (the reference, backprop) in each.
QUESTIONS = ("control", "precision", "distribution", "pathway", "settling")
QUESTION_TITLES = {"precision": "Precision weighting", "distribution": "Distributions",
                   "pathway": "Error propagation pathways", "settling": "Settling"}


def diverged_record(run: str, error: str, device: str) -> dict[str, Any]:
    """The final metrics of a run that stopped on a NaN/inf loss: every required metric NaN
    (the report shows "not computable", never a number), the error kept as `diverged`."""
    nan = float("nan")
    return {"run": run, "diverged": error, "device": device, **{k: nan for k in (*REQUIRED_NUMERIC, *HEADLINE)}}


def details_path(metrics_path: str | Path) -> Path:
    """`<dir>/<name>.json` -> `<dir>/<name>_details.json`."""
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}{DETAILS_SUFFIX}{p.suffix}")


def split(final: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(headline, details) of one run's flat metrics dict; every key lands in exactly one."""
    keep = (*HEADLINE, *PC_SUMMARY)
    headline = {k: final[k] for k in keep if k in final}
    return headline, {k: v for k, v in final.items() if k not in headline}


def write_run_metrics(metrics_path: str | Path, final: dict[str, Any]) -> None:
    """Write `final` as `<name>.json` (headline) + `<name>_details.json` (the rest), atomically each."""
    headline, details = split(final)
    write_json(details_path(metrics_path), details)
    write_json(metrics_path, headline)


def read_run_metrics(metrics_path: str | Path) -> Any:
    """The one flat dict `write_run_metrics` split, put back together (a missing details file
    is no error). Raises OSError for a missing metrics file, ValueError for invalid JSON."""
    out = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    details = details_path(metrics_path)
    if isinstance(out, dict) and details.is_file():
        extra = json.loads(details.read_text(encoding="utf-8"))
        if not isinstance(extra, dict):
            raise ValueError(f"{details}: expected a JSON object, got {type(extra).__name__}")
        out = {**extra, **out}
    return out


__all__ = ["HEADLINE", "PC_SUMMARY", "CURVE_COLUMNS", "DETAILS_SUFFIX", "MetricSpec", "METRICS",
           "REQUIRED_NUMERIC", "QUESTIONS", "QUESTION_TITLES", "fmt_number", "is_number", "numeric",
           "diverged_record", "details_path", "split", "write_run_metrics", "read_run_metrics"]
