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

Over training, one row per evaluation:

    <name>_curve.tsv        CURVE_COLUMNS (every run) + PC_CURVE_COLUMNS (PC runs): losses,
                            and the scalar PC diagnostics of `PCGPT.pc_diagnostics` on one
                            fixed training batch (`dvc plots`, the report's curves)
    <name>_diagnostics.tsv  the per-layer series (DIAGNOSTIC_SERIES) in long format,
                            DIAGNOSTICS_COLUMNS: one row per (evaluation, metric, layer)

A pretrain run is trained once per seed (`seeds`): `run_seed_metrics(dir, run, seed)` is
one seed's metrics file, the files above sit beside it, and `<run>.json` is the mean
over seeds (`seed_mean`), the one row per run `dvc metrics show` reads.
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
PC_SUMMARY = ("pc/energy_before", "pc/energy_after", "pc/settle_residual", "pc/grad_cos")
"""Totals over layers (and the residual ‖∂E/∂x‖) of a PC run's last training step, and the
cosine between its weight update and backprop's gradient at the last evaluation."""
CURVE_COLUMNS = ("step", "tokens", "wall_s", "train_loss", "val_loss", "val_bpb", "val_acc", "lr")
"""Columns of every `<run>_curve.tsv`: one row per evaluation (`dvc plots`, the report's curves)."""
PC_CURVE_COLUMNS = {
    "grad_cos": "pc/grad_cos",                # cos(PC weight update, backprop gradient), all shared weights
    "settle_residual": "pc/settle_residual",  # RMS ‖∂E/∂x‖ per token after settling
    "energy_drop": "pc/energy_drop",          # relative decrease of the true energy by settling
    "settle_rejected": "pc/settle_rejected",  # backtracking: rejected settling tries
    "precision_mean": "pc/precision_mean",    # mean layer precision π over layers
    "diverged_count": "pc/settle_diverged_count",  # evaluations so far where settling raised E
}
"""Extra curve columns of PC runs -> the metric each holds (MLflow / final-metrics name). The
values come from `PCGPT.pc_diagnostics` on one fixed training batch at each evaluation."""
DIAGNOSTIC_SERIES = ("pc/grad_cos", "pc/precision", "pc/error_energy", "pc/true_error_energy", "pc/error")
"""Per-layer diagnostics kept over training (`<metric>/<layer>` keys): cosine to backprop per
block, layer precision π, the prediction-error energy Σρ per token without the −½·log π
constant (at the training step's settled states, and with predictions recomputed), mean |e|."""
DIAGNOSTICS_COLUMNS = ("step", "wall_s", "metric", "layer", "value")
"""Columns of `<run>_diagnostics.tsv` (long format: one row per evaluation, metric and layer)."""
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
    "val/majority_acc": MetricSpec("majority-token accuracy (reference line)", "%", ".1f", "higher",
                                   scale=100.0, short="Majority acc (%)"),
    "val/unigram_bpb": MetricSpec("unigram bits per byte (reference line)", "bits/byte", ".3f", "lower",
                                  short="Unigram bpb"),
    "perf/tok_per_s": MetricSpec("throughput", "tokens/s", ",.0f", "higher", short="Tokens/s"),
    "perf/step_ms": MetricSpec("step time", "ms", ".1f", "lower", short="Step (ms)"),
    "perf/mfu_pct": MetricSpec("MFU", "%", ".2f", "higher", short="MFU (%)"),
    "mem/peak_gib": MetricSpec("peak memory", "GiB", ".3f", "lower", short="Peak mem (GiB)"),
    "wall_s": MetricSpec("wall time", "s", ".1f", "lower", short="Wall (s)"),
    "tokens": MetricSpec("training tokens", "", ",.0f", "higher", short="Tokens"),
    "n_params": MetricSpec("parameters", "", ",.0f", "lower", short="Params"),
    "pc/grad_cos": MetricSpec("cosine to the backprop gradient", "", ".3f", "higher", short="cos(PC, BP)"),
    "pc/energy_drop": MetricSpec("relative energy decrease by settling", "", ".3f", "higher",
                                 short="Energy drop"),
    "pc/settle_residual": MetricSpec("settling residual ‖∂E/∂x‖", "", ".3g", "lower", short="Residual"),
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
# the report has one table per question, the reference and control rows in each.
# `equivalence`: a variant equal to another run by construction (`equals`), a check of the
# code, reported apart from the findings.
QUESTIONS = ("control", "algorithm", "precision", "distribution", "pathway", "settling", "numerics",
             "compute", "equivalence")
QUESTION_TITLES = {"algorithm": "Training algorithm", "precision": "Precision weighting",
                   "distribution": "Distributions", "pathway": "Error propagation pathways",
                   "settling": "Settling", "numerics": "Numerics: the error's size against the float format",
                   "compute": "Compute-matched comparison (equal wall clock)"}


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


def run_seed_metrics(metrics_dir: str | Path, run: str, seed: int) -> Path:
    """One seed's metrics file of pretrain run `run`: `<metrics_dir>/<run>/<seed>.json`
    (its details, curve and diagnostics beside it, named `<seed>_...`)."""
    return Path(metrics_dir) / run / f"{seed}.json"


def curve_path(metrics_path: str | Path) -> Path:
    """`<dir>/<name>.json` -> `<dir>/<name>_curve.tsv`."""
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}_curve.tsv")


def diagnostics_path(metrics_path: str | Path) -> Path:
    """`<dir>/<name>.json` -> `<dir>/<name>_diagnostics.tsv`."""
    p = Path(metrics_path)
    return p.with_name(f"{p.stem}_diagnostics.tsv")


def seed_mean(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """The headline numbers (HEADLINE, PC_SUMMARY) averaged over a run's seeds, with `seeds`,
    their count: the run's row in `dvc metrics show` (the report reads the seeds themselves)."""
    keys = [k for k in (*HEADLINE, *PC_SUMMARY) if all(is_number(m.get(k)) for m in per_seed)]
    same = {k for k in keys if len({m[k] for m in per_seed}) == 1}  # e.g. `step`: kept as it is
    return {"seeds": len(per_seed), **{k: per_seed[0][k] if k in same else
                                       sum(float(m[k]) for m in per_seed) / len(per_seed) for k in keys}}


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


__all__ = ["HEADLINE", "PC_SUMMARY", "CURVE_COLUMNS", "PC_CURVE_COLUMNS", "DIAGNOSTIC_SERIES",
           "DIAGNOSTICS_COLUMNS", "DETAILS_SUFFIX", "run_seed_metrics", "curve_path", "diagnostics_path",
           "seed_mean", "MetricSpec", "METRICS",
           "REQUIRED_NUMERIC", "QUESTIONS", "QUESTION_TITLES", "fmt_number", "is_number", "numeric",
           "diverged_record", "details_path", "split", "write_run_metrics", "read_run_metrics"]
