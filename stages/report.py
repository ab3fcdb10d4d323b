"""Stage `report`: tables, statistics and figures from what the other stages wrote.

Reads (JSON/TSV only, never Markdown; the formats are the stage contract):
  metrics/pretrain/<run>.json + <run>_details.json, <run>_curve.tsv, <run>_samples.json,
  <run>_attention.json
  metrics/ablate/<variant>-<seed>.json + _details.json (the grid: `ablation.variants` x `ablation.seeds`)
  metrics/download.json, metrics/tokenizer.json, data/tokens/meta.json,
  data/raw/<source>/manifest.json (hashed for provenance when present), params.yaml
Writes (under `report.out_dir`, default `reports/`):
  results.parquet, results.csv   one row per run (pretrain runs and ablation items), every metric
  report.md                      figures linked as figures/<name>.png
  report.html                    self-contained: CSS inline, figures embedded as data URIs
  figures/*.png
Run:
  python -m stages.report          (from the repository root; `dvc repro report` does this)

The `report` and `tracking` sections and the grid are checked first; every input is
read and validated before anything is written; a missing or
malformed file stops the stage with a message naming the file, and the outputs
are built in a staging folder and moved into place only when all are complete.

Statistics: mean ± t-interval over seeds per variant; each variant's difference
to the reference variant (`report.reference`, the unchanged PC-GPT) with a Welch
interval; the verdict only claims what that interval supports.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from pipeline import tracking
from pipeline.io import sha256_file
from pipeline.metrics import (CURVE_COLUMNS, DETAILS_SUFFIX, METRICS, details_path, fmt_number,
                              is_number, read_run_metrics)
from pipeline.params import PARAMS_FILE, ParamsError, fail, load_section, read_params, validate
from pipeline.tracking import Tracker
from stages import report_config
from stages.report_config import ReportConfig
from stages import report_figures as figs
from stages.report_render import (Badge, Block, Bullets, Heading, Note, Para, Samples,
                                  Table, to_html, to_markdown)

QUESTIONS = ("precision", "distribution", "pathway", "settling")
QUESTION_TITLES = {
    "precision": "Precision weighting",
    "distribution": "Distributions",
    "pathway": "Error propagation pathways",
    "settling": "Settling",
}
ALL_QUESTIONS = ("control",) + QUESTIONS


class ReportInputError(ValueError):
    """An input file of the report is missing or malformed (the message names the file)."""


# --------------------------------------------------------------------- config

@dataclass
class Grid:
    """The ablation grid params.yaml asks for (None: not declared, use whatever files exist)."""

    variants: list[str] | None = None
    seeds: list[int] | None = None


def grid_from_params(params: dict[str, Any]) -> Grid:
    """Variants x seeds from the `ablation` section (owned by the ablate stage), if present.

    Accepts `variants` as a mapping name -> spec (the contract) or a list of names
    or of {name: ...} mappings; `seeds` as a list of integers.
    """
    section = params.get("ablation")
    if section is None:
        return Grid()
    if not isinstance(section, dict):
        raise ParamsError(f"ablation: expected a mapping, got {type(section).__name__}")
    variants = section.get("variants")
    names: list[str] | None
    if variants is None:
        names = None
    elif isinstance(variants, dict):
        names = [str(k) for k in variants]
    elif isinstance(variants, list):
        names = [str(v["name"]) if isinstance(v, dict) and "name" in v else str(v) for v in variants]
    else:
        raise ParamsError(f"ablation.variants: expected a mapping or list, got {type(variants).__name__}")
    seeds = section.get("seeds")
    if seeds is not None and (not isinstance(seeds, list)
                              or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
        raise ParamsError(f"ablation.seeds: expected a list of integers, got {seeds!r}")
    return Grid(names, seeds)


# ------------------------------------------------------------------ statistics

def t_critical(confidence: float, df: float) -> float:
    """Two-sided Student-t critical value: P(|T_df| <= t) = confidence."""
    return float(sps.t.ppf(0.5 + confidence / 2.0, df))


@dataclass(frozen=True)
class MeanCI:
    """Mean over seeds with a t-interval; `half` is None for a single seed."""

    n: int
    mean: float
    sd: float  # sample standard deviation (ddof=1); nan for n = 1
    half: float | None

    @property
    def lo(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def hi(self) -> float | None:
        return None if self.half is None else self.mean + self.half


def mean_ci(values: list[float] | np.ndarray, confidence: float) -> MeanCI:
    """Mean ± t_{(1+c)/2, n-1} · s/√n over seeds."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci of no values")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(1, mean, float("nan"), None)
    sd = float(x.std(ddof=1))
    return MeanCI(int(x.size), mean, sd, t_critical(confidence, x.size - 1) * sd / math.sqrt(x.size))


@dataclass(frozen=True)
class Diff:
    """mean(a) − mean(b) with a Welch interval; lo/hi None when either side has one seed."""

    estimate: float
    lo: float | None
    hi: float | None
    df: float | None


def welch_diff(a: MeanCI, b: MeanCI, confidence: float) -> Diff:
    """Difference of means with the Welch–Satterthwaite interval (unequal variances)."""
    est = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Diff(est, None, None, None)
    va, vb = a.sd ** 2 / a.n, b.sd ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical seeds on both sides: the difference is exact
        return Diff(est, est, est, float("inf"))
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    half = t_critical(confidence, df) * se
    return Diff(est, est - half, est + half, df)


def verdict(diff: Diff, metric: str, reference: str) -> tuple[str, str]:
    """Plain-language verdict and its kind (better/worse/neutral/na), claiming only what the interval supports."""
    spec = METRICS[metric]
    if diff.lo is None or diff.hi is None:
        return "1 seed: no interval", "na"
    if not all(math.isfinite(v) for v in (diff.estimate, diff.lo, diff.hi)):
        return "not computable (non-finite values)", "na"
    if diff.lo <= 0.0 <= diff.hi:
        return "no detectable difference", "neutral"
    higher = diff.lo > 0.0
    good = higher == (spec.better == "higher")
    return (f"{'higher' if higher else 'lower'} {spec.label} than {reference} "
            f"({'better' if good else 'worse'})", "better" if good else "worse")


@dataclass
class VariantSummary:
    """One row of an ablation table."""

    variant: str
    question: str
    description: str
    override: dict[str, Any]
    seeds: list[int]
    stats: dict[str, MeanCI]  # metric -> mean ± CI over seeds
    diff: Diff | None  # None for the reference itself
    verdict: str
    kind: str


def summarize_ablation(runs: pd.DataFrame, cfg: ReportConfig) -> dict[str, VariantSummary]:
    """Per variant: mean ± CI of every shown metric, difference to the reference and verdict.

    `runs` is the ablation part of the results table (one row per variant x seed).
    Variants keep the order in which they first appear in `runs`.
    """
    metrics = list(dict.fromkeys([cfg.metric, *cfg.table_metrics, "perf/step_ms", "pc/settle_steps"]))
    out: dict[str, VariantSummary] = {}
    for variant, group in runs.groupby("variant", sort=False):
        first = group.iloc[0]
        # The decision metric always gets stats (a diverged seed's NaN makes them NaN and the
        # verdict "not computable"); other metrics only where every seed reports them (bp has
        # no pc/settle_steps).
        st = {m: mean_ci(group[m].to_numpy(dtype=float), cfg.confidence)
              for m in metrics if m in group and (m == cfg.metric or group[m].notna().all())}
        out[str(variant)] = VariantSummary(
            variant=str(variant), question=str(first["question"]), description=str(first["description"]),
            override=json.loads(first["override"]), seeds=sorted(int(s) for s in group["seed"]),
            stats=st, diff=None, verdict="", kind="")
    if cfg.reference not in out:
        raise ReportInputError(
            f"{cfg.inputs.ablate}: no runs of the reference variant {cfg.reference!r} "
            f"(report.reference); the ablation grid must include it")
    ref = out[cfg.reference].stats[cfg.metric]
    for s in out.values():
        if s.variant == cfg.reference:
            s.verdict, s.kind = "reference", "ref"
            continue
        s.diff = welch_diff(s.stats[cfg.metric], ref, cfg.confidence)
        s.verdict, s.kind = verdict(s.diff, cfg.metric, cfg.reference)
    return out


# ---------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    """Everything the report reads, validated."""

    pretrain: dict[str, dict[str, Any]]  # run -> metrics
    curves: dict[str, pd.DataFrame]
    samples: dict[str, list[dict[str, str]]]
    attention: dict[str, dict[str, Any]]
    ablate: list[dict[str, Any]]  # one metrics dict per grid item, in grid order
    download: dict[str, Any]
    tokenizer: dict[str, Any]
    tokens_meta: dict[str, Any]
    params_sha256: str
    manifest: tuple[str, str] | None  # (path, sha256)
    notes: list[str] = field(default_factory=list)


def read_json(path: Path, what: str, hint: str = "") -> Any:
    """Parse a JSON file, raising ReportInputError naming it when missing or malformed."""
    if not path.is_file():
        raise ReportInputError(f"{path}: missing ({what}){'; ' + hint if hint else ''}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportInputError(f"{path}: not valid JSON ({what}): {e}") from e


def check_metrics(obj: Any, path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """Validate one flat metrics dict (pretrain or ablation item) against the contract."""
    if not isinstance(obj, dict):
        raise ReportInputError(f"{path}: expected a JSON object of metrics, got {type(obj).__name__}")
    for key in required:
        if key not in obj:
            raise ReportInputError(f"{path}: missing metric {key!r}")
        if not is_number(obj[key]):
            raise ReportInputError(f"{path}: metric {key!r} must be a number, got {obj[key]!r}")
    if not isinstance(obj.get("device"), str):
        raise ReportInputError(f"{path}: missing 'device' (a string naming the hardware)")
    for key, v in obj.items():
        if key.startswith(("pc/", "attn/", "perf/", "mem/", "val/", "train/")) and not is_number(v):
            raise ReportInputError(f"{path}: metric {key!r} must be a number, got {v!r}")
    return obj


def _check_curve(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ReportInputError(f"{path}: not a valid TSV curve: {e}") from e
    missing = [c for c in CURVE_COLUMNS if c not in df.columns]
    if missing:
        raise ReportInputError(f"{path}: curve is missing column(s) {', '.join(missing)} "
                               f"(expected header {' '.join(CURVE_COLUMNS)})")
    for c in CURVE_COLUMNS:
        if not pd.api.types.is_numeric_dtype(df[c]):
            raise ReportInputError(f"{path}: column {c!r} is not numeric")
    if df.empty:
        raise ReportInputError(f"{path}: curve has no rows")
    return df


def _check_samples(obj: Any, path: Path) -> list[dict[str, str]]:
    if not isinstance(obj, list) or not all(
            isinstance(s, dict) and isinstance(s.get("prompt"), str) and isinstance(s.get("completion"), str)
            for s in obj):
        raise ReportInputError(f"{path}: expected a list of {{\"prompt\": str, \"completion\": str}}")
    return obj


def _check_attention(obj: Any, path: Path) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ReportInputError(f"{path}: expected a JSON object")
    for key, tp in (("layer", int), ("head", int), ("kernel", str), ("tokens", list), ("weights", list)):
        if not isinstance(obj.get(key), tp):
            raise ReportInputError(f"{path}: {key!r} missing or not a {tp.__name__}")
    n = len(obj["tokens"])
    w = obj["weights"]
    if n == 0 or len(w) != n or not all(isinstance(r, list) and len(r) == n and all(map(is_number, r))
                                        for r in w):
        raise ReportInputError(f"{path}: 'weights' must be a {n}x{n} matrix of numbers (one row per token)")
    return obj


def _pretrain_runs(folder: Path) -> list[str]:
    suffixes = ("_samples", "_attention", DETAILS_SUFFIX)
    return sorted(p.stem for p in folder.glob("*.json") if not p.stem.endswith(suffixes))


def read_run(path: Path, what: str, required: tuple[str, ...]) -> dict[str, Any]:
    """One run's metrics (`<name>.json` + `<name>_details.json`, see pipeline/metrics.py), validated."""
    if not path.is_file():
        raise ReportInputError(f"{path}: missing ({what})")
    try:
        m = read_run_metrics(path)
    except (UnicodeDecodeError, ValueError) as e:
        raise ReportInputError(f"{path}: not valid JSON ({what}, or its {details_path(path).name}): {e}") from e
    return check_metrics(m, path, required)


def load_inputs(cfg: ReportConfig, root: Path, grid: Grid, params_file: Path) -> Inputs:
    """Read and validate every input; raise ReportInputError naming the first bad file."""
    ins = cfg.inputs
    notes: list[str] = []
    pdir = root / ins.pretrain
    if not pdir.is_dir():
        raise ReportInputError(f"{pdir}: missing (pretrain metrics folder); run `dvc repro pretrain` first")
    required = cfg.required_metrics
    runs = _pretrain_runs(pdir)
    for run in (cfg.baseline_run, cfg.pcgpt_run):
        if run not in runs:
            raise ReportInputError(f"{pdir / (run + '.json')}: missing (pretrain metrics of run {run!r}, "
                                   f"report.{'baseline_run' if run == cfg.baseline_run else 'pcgpt_run'})")
    pretrain = {r: read_run(pdir / f"{r}.json", "pretrain metrics", required) for r in runs}
    curves, samples, attention = {}, {}, {}
    for r in runs:
        if (p := pdir / f"{r}_curve.tsv").is_file():
            curves[r] = _check_curve(p)
        if (p := pdir / f"{r}_samples.json").is_file():
            samples[r] = _check_samples(read_json(p, "generated samples"), p)
        if (p := pdir / f"{r}_attention.json").is_file():
            attention[r] = _check_attention(read_json(p, "attention map"), p)

    adir = root / ins.ablate
    if not adir.is_dir():
        raise ReportInputError(f"{adir}: missing (ablation metrics folder); run `dvc repro ablate` first")
    present = {p.name: p for p in sorted(adir.glob("*.json")) if not p.stem.endswith(DETAILS_SUFFIX)}
    if grid.variants is not None and grid.seeds is not None:
        expected = [f"{v}-{s}.json" for v in grid.variants for s in grid.seeds]
        for name in expected:
            if name not in present:
                raise ReportInputError(f"{adir / name}: missing (ablation item of the grid in "
                                       f"{params_file.name} ablation.variants x ablation.seeds)")
        extra = sorted(set(present) - set(expected))
        if extra:
            notes.append(f"Ignored {len(extra)} file(s) in {ins.ablate} that are not in the ablation "
                         f"grid of {params_file.name}: {', '.join(extra)}.")
        files = [present[n] for n in expected]
    else:
        files = list(present.values())
        notes.append(f"No ablation grid (ablation.variants, ablation.seeds) in {params_file.name}: "
                     f"every file in {ins.ablate} is reported.")
    ablate = []
    for p in files:
        m = read_run(p, "ablation metrics", required)
        for key, tp in (("variant", str), ("question", str), ("description", str), ("override", dict)):
            if not isinstance(m.get(key), tp):
                raise ReportInputError(f"{p}: {key!r} missing or not a {tp.__name__}")
        if not isinstance(m.get("seed"), int) or isinstance(m["seed"], bool):
            raise ReportInputError(f"{p}: 'seed' missing or not an integer")
        if m["question"] not in ALL_QUESTIONS:
            raise ReportInputError(f"{p}: question {m['question']!r} is not one of {', '.join(ALL_QUESTIONS)}")
        if p.name != f"{m['variant']}-{m['seed']}.json":
            raise ReportInputError(f"{p}: holds variant {m['variant']!r} seed {m['seed']}, "
                                   f"which belongs in {m['variant']}-{m['seed']}.json")
        ablate.append(m)

    download = read_json(root / ins.download, "download metrics", "run `dvc repro download` first")
    tokenizer = read_json(root / ins.tokenizer, "tokenizer metrics", "run `dvc repro tokenizer` first")
    tokens_meta = read_json(root / ins.tokens_meta, "token shard metadata", "run `dvc repro tokenizer` first")
    for obj, rel in ((download, ins.download), (tokenizer, ins.tokenizer), (tokens_meta, ins.tokens_meta)):
        if not isinstance(obj, dict):
            raise ReportInputError(f"{root / rel}: expected a JSON object, got {type(obj).__name__}")
    for key in ("wall_s",):
        for obj, rel in ((download, ins.download), (tokenizer, ins.tokenizer)):
            if not is_number(obj.get(key)):
                raise ReportInputError(f"{root / rel}: {key!r} missing or not a number")

    manifest = None
    source = download.get("source")
    candidates = ([root / ins.raw / source / "manifest.json"] if isinstance(source, str)
                  else sorted((root / ins.raw).glob("*/manifest.json")))
    found = [c for c in candidates if c.is_file()]
    if found:
        read_json(found[0], "data manifest")  # must at least be valid JSON
        manifest = (found[0].relative_to(root).as_posix(), sha256_file(found[0]))
    else:
        notes.append(f"No data manifest under {ins.raw}/ in this workspace (not a dependency of the "
                     f"report; `dvc pull` the download stage to hash it).")
    return Inputs(pretrain, curves, samples, attention, ablate, download, tokenizer, tokens_meta,
                  sha256_file(params_file), manifest, notes)


# --------------------------------------------------------------------- results

ID_COLUMNS = ("source", "run", "variant", "seed", "question", "description", "override", "device")


def results_table(inputs: Inputs) -> pd.DataFrame:
    """One row per run: pretrain runs, then ablation items; id columns, then every metric."""
    rows = []
    for run, m in inputs.pretrain.items():
        rows.append({"source": "pretrain", "run": run, "variant": run, "seed": m.get("seed"),
                     "question": None, "description": m.get("description"),
                     "override": json.dumps(m.get("override", {}), sort_keys=True), **_metric_items(m)})
    for m in inputs.ablate:
        rows.append({"source": "ablate", "run": f"{m['variant']}-{m['seed']}", "variant": m["variant"],
                     "seed": m["seed"], "question": m["question"], "description": m["description"],
                     "override": json.dumps(m["override"], sort_keys=True), **_metric_items(m)})
    df = pd.DataFrame(rows)
    df["device"] = [m["device"] for m in [*inputs.pretrain.values(), *inputs.ablate]]
    metric_cols = sorted(c for c in df.columns if c not in ID_COLUMNS)
    df = df[list(ID_COLUMNS) + metric_cols]
    df["seed"] = df["seed"].astype("Int64")
    for c in ("source", "run", "variant", "question", "description", "override", "device"):
        df[c] = df[c].astype("string")
    for c in metric_cols:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def _metric_items(m: dict[str, Any]) -> dict[str, float]:
    skip = {"run", "variant", "seed", "question", "description", "override", "device"}
    return {k: float(v) for k, v in m.items() if k not in skip and is_number(v)}


# ------------------------------------------------------------------ provenance

LIBRARIES = ("torch", "numpy", "pandas", "pyarrow", "scipy", "matplotlib", "dvc", "mlflow", "prefect",
             "tiktoken", "rustbpe", "safetensors")
# Pipeline outputs tracked in git (cache: false): they change on every run and say
# nothing about whether the code and params match the commit.
OUTPUT_PATHS = ("metrics", "reports", "dvc.lock")


def git_state(root: Path) -> tuple[str, str]:
    """(commit, dirty description) of the repository at `root`; outputs of the pipeline excluded."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        excludes = [f":(exclude){p}" for p in OUTPUT_PATHS]
        changed = [ln for ln in git("status", "--porcelain", "--", ".", *excludes).splitlines() if ln]
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git repository, or no commit yet)", "unknown"
    dirty = f"dirty ({len(changed)} changed path{'s' if len(changed) != 1 else ''})" if changed else "clean"
    return commit, dirty


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def stage_wall_clock(inputs: Inputs) -> list[tuple[str, float]]:
    """(stage, seconds) from each metrics file's wall_s; ablation items summed."""
    rows = [("download", float(inputs.download["wall_s"])), ("tokenizer", float(inputs.tokenizer["wall_s"]))]
    rows += [(f"pretrain@{run}", float(m["wall_s"])) for run, m in inputs.pretrain.items()]
    if inputs.ablate:
        rows.append((f"ablate ({len(inputs.ablate)} items, summed)",
                     float(sum(m["wall_s"] for m in inputs.ablate))))
    return rows


# -------------------------------------------------------------------- document

def fmt_mean_ci(s: MeanCI | None, metric: str) -> str:
    if s is None or not math.isfinite(s.mean):
        return "n/a"
    spec = METRICS[metric]
    if s.half is None:
        return spec.show(s.mean)
    return f"{spec.show(s.mean)} ± {fmt_number(s.half * spec.scale, spec.fmt)}"


def fmt_diff(d: Diff | None, metric: str) -> str:
    if d is None:
        return "—"
    if not math.isfinite(d.estimate):
        return "n/a"
    spec = METRICS[metric]
    sgn = "+" + spec.fmt
    est = fmt_number(d.estimate * spec.scale, sgn)
    if d.lo is None or d.hi is None:
        return est
    return f"{est} [{fmt_number(d.lo * spec.scale, sgn)}, {fmt_number(d.hi * spec.scale, sgn)}]"


def _with_unit(metric: str) -> str:
    spec = METRICS[metric]
    return f"{spec.label} ({spec.unit})" if spec.unit else spec.label


def _override_text(override: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in override.items()) or "—"


def headline_blocks(inputs: Inputs, cfg: ReportConfig) -> list[Block]:
    base, pc = inputs.pretrain[cfg.baseline_run], inputs.pretrain[cfg.pcgpt_run]
    metrics = list(dict.fromkeys([*cfg.headline_metrics, "tokens", "wall_s", "n_params"]))
    rows = []
    for m in metrics:
        if m not in base or m not in pc:
            continue
        spec = METRICS[m]
        b, p = float(base[m]), float(pc[m])
        rel = fmt_number(100.0 * (p - b) / abs(b), "+.1f") + " %" if b else "n/a"
        rows.append([_with_unit(m), spec.show(b), spec.show(p), fmt_number((p - b) * spec.scale, "+" + spec.fmt),
                     rel, f"{spec.better} is better"])
    blocks: list[Block] = [Table(
        ["Metric", cfg.baseline_run, cfg.pcgpt_run, f"{cfg.pcgpt_run} − {cfg.baseline_run}", "relative", ""],
        rows, ["l", "r", "r", "r", "r", "l"],
        caption=f"Pretrain runs {cfg.baseline_run} (backprop GPT) and {cfg.pcgpt_run} (PC-GPT), final evaluation.")]
    if "val/unigram_bpb" in pc:
        blocks.append(Para(f"Reference line: the validation set costs "
                           f"{METRICS['val/unigram_bpb'].show(float(pc['val/unigram_bpb']))} bits/byte under the "
                           f"training unigram distribution; a model that learned anything beats it."))
    blocks.append(Note("One run per model: these differences are not tested for significance. "
                       "The ablation tables below repeat the comparison over seeds with intervals."))
    return blocks


def ablation_table(summ: dict[str, VariantSummary], question: str, cfg: ReportConfig) -> Table:
    names = [cfg.reference] + [v for v, s in summ.items() if s.question == question
                               and v not in (cfg.reference, cfg.control)]
    if cfg.control in summ:
        names.append(cfg.control)
    pct = int(round(cfg.confidence * 100))
    cols = ["Variant", "Change", "n", METRICS[cfg.metric].short, f"Δ vs {cfg.reference} [{pct}% CI]", "Verdict"]
    cols += [METRICS[m].short for m in cfg.table_metrics]
    rows, emphasis = [], {}
    for i, name in enumerate(names):
        s = summ[name]
        change = "PC-GPT default" if name == cfg.reference else (s.description or _override_text(s.override))
        row = [name, change, str(len(s.seeds)), fmt_mean_ci(s.stats.get(cfg.metric), cfg.metric),
               fmt_diff(s.diff, cfg.metric), Badge(s.verdict, s.kind)]  # type: ignore[arg-type]
        row += [fmt_mean_ci(s.stats.get(m), m) for m in cfg.table_metrics]
        rows.append(row)
        if name == cfg.reference:
            emphasis[i] = "ref"
        elif name == cfg.control:
            emphasis[i] = "control"
    return Table(cols, rows, ["l", "l", "r", "r", "r", "l"] + ["r"] * len(cfg.table_metrics),
                 caption=f"{QUESTION_TITLES[question]}: each variant changes one factor of {cfg.reference}; "
                         f"{cfg.control} is the backprop control; n seeds. Cells: mean ± {pct}% CI half-width "
                         f"({METRICS[cfg.metric].short.lower()} in {METRICS[cfg.metric].unit}). "
                         f"Δ = variant − {cfg.reference}, Welch interval.", emphasis=emphasis)


def ablation_bars(summ: dict[str, VariantSummary], question: str, cfg: ReportConfig) -> list[figs.Bar]:
    """The chart's bars: the question's variants, then the control (the reference is the zero line)."""
    names = [v for v, s in summ.items() if s.question == question and v not in (cfg.reference, cfg.control)]
    names += [cfg.control] if cfg.control in summ else []
    return [figs.Bar(n, summ[n].diff.estimate, summ[n].diff.lo, summ[n].diff.hi, summ[n].kind,
                     control=n == cfg.control) for n in names if summ[n].diff is not None]


def settling_figure(summ: dict[str, VariantSummary], cfg: ReportConfig, fig_dir: Path) -> figs.FigureResult:
    """Val loss / step time against T (x = the run's own pc/settle_steps) and against test-time steps.

    Test-time attention-settling variants are those whose override key contains
    `report.test_time_settle_key`; their x is the override's value.
    """
    def point(s: VariantSummary, x: float) -> figs.Point:
        y, ms = s.stats[cfg.metric], s.stats.get("perf/step_ms")
        return figs.Point(s.variant, x, y.mean, y.half, ms.mean if ms else None, ms.half if ms else None,
                          reference=s.variant == cfg.reference)

    train, test = [], []
    for s in summ.values():
        if s.question != "settling" and s.variant != cfg.reference:
            continue
        tt = [v for k, v in s.override.items() if cfg.test_time_settle_key in k]
        if tt and is_number(tt[0]):
            test.append(point(s, float(tt[0])))
        elif "pc/settle_steps" in s.stats:
            train.append(point(s, s.stats["pc/settle_steps"].mean))
    ref = summ.get(cfg.reference)
    ref_pt = point(ref, 0.0) if ref else None
    ctl = summ.get(cfg.control)
    control = (ctl.stats[cfg.metric].mean, ctl.stats[cfg.metric].half) if ctl else None
    return figs.settling(train, test, ref_pt, control, _with_unit(cfg.metric), cfg.reference,
                         cfg.confidence, fig_dir)


def build_document(inputs: Inputs, results: pd.DataFrame, cfg: ReportConfig, root: Path,
                   fig_dir: Path) -> tuple[list[Block], str]:
    """The report's blocks (figures drawn into `fig_dir` on the way) and its subtitle line."""
    blocks: list[Block] = []
    pct = int(round(cfg.confidence * 100))
    ablate_runs = results[results["source"] == "ablate"]
    summ = summarize_ablation(ablate_runs, cfg) if len(ablate_runs) else {}
    base, pc = inputs.pretrain[cfg.baseline_run], inputs.pretrain[cfg.pcgpt_run]
    ml = METRICS[cfg.metric]

    # -- at a glance
    blocks.append(Heading("At a glance", 2, "glance"))
    glance = [f"{cfg.pcgpt_run} reaches {ml.label} {ml.show(float(pc[cfg.metric]))} vs "
              f"{ml.show(float(base[cfg.metric]))} for {cfg.baseline_run} "
              f"(one run each, {fmt_number(float(pc['tokens']), ',.0f')} training tokens), at "
              f"{METRICS['perf/tok_per_s'].show(float(pc['perf/tok_per_s']))} vs "
              f"{METRICS['perf/tok_per_s'].show(float(base['perf/tok_per_s']))} tokens/s."]
    for q in QUESTIONS:
        vs = [s for s in summ.values() if s.question == q and s.variant not in (cfg.reference, cfg.control)]
        if not vs:
            continue
        found = [f"{s.variant}: {s.verdict}" for s in vs if s.kind in ("better", "worse")]
        glance.append(f"{QUESTION_TITLES[q]}: {len(found)} of {len(vs)} variant(s) differ detectably from "
                      f"{cfg.reference} in {ml.label}" + (f" ({'; '.join(found)})." if found else "."))
    if cfg.control in summ:
        glance.append(f"Control {cfg.control}: {summ[cfg.control].verdict}.")
    blocks.append(Bullets(glance))
    for n in inputs.notes:
        blocks.append(Note(n))

    # -- headline
    blocks.append(Heading("Baseline vs PC-GPT", 2, "headline"))
    blocks += headline_blocks(inputs, cfg)
    fig = figs.curves(inputs.curves, cfg.baseline_run, cfg.pcgpt_run, fig_dir)
    blocks.append(fig.block() if fig.ok else Note(fig.note))

    # -- ablations
    blocks.append(Heading("Ablations", 2, "ablations"))
    if not summ:
        blocks.append(Note(f"No ablation runs in {cfg.inputs.ablate}: the ablation tables and charts are skipped."))
    else:
        seeds = sorted({int(s) for s in ablate_runs["seed"]})
        blocks.append(Para(
            f"Every variant changes one factor of the PC-GPT default ({cfg.reference}) and is trained with "
            f"seeds {', '.join(map(str, seeds))}. Cells show the mean over seeds ± the half-width of its "
            f"{pct}% Student-t interval; Δ is the difference of means to {cfg.reference} with a {pct}% Welch "
            f"interval. A verdict names a direction only when that interval excludes zero."))
        for q in QUESTIONS:
            blocks.append(Heading(QUESTION_TITLES[q], 3))
            if not any(s.question == q for s in summ.values()):
                blocks.append(Note(f"The grid has no {q} variant: nothing to compare."))
                continue
            blocks.append(ablation_table(summ, q, cfg))
            fig = figs.ablation_bars(ablation_bars(summ, q, cfg), q, QUESTION_TITLES[q], ml.label,
                                     cfg.reference, cfg.confidence, fig_dir)
            blocks.append(fig.block() if fig.ok else Note(fig.note))
            if q == "settling":
                fig = settling_figure(summ, cfg, fig_dir)
                blocks.append(fig.block() if fig.ok else Note(fig.note))

    # -- PC internals
    blocks.append(Heading("Inside PC-GPT", 2, "internals"))
    for fig in (figs.precision(pc, cfg.pcgpt_run, fig_dir), figs.energy(pc, cfg.pcgpt_run, fig_dir),
                figs.attention(inputs.attention, cfg.baseline_run, cfg.pcgpt_run, fig_dir)):
        blocks.append(fig.block() if fig.ok else Note(fig.note))

    # -- samples
    blocks.append(Heading("Generated samples", 2, "samples"))
    for run in (cfg.baseline_run, cfg.pcgpt_run):
        items = inputs.samples.get(run)
        if items is None:
            blocks.append(Note(f"No samples file for {run} ({cfg.inputs.pretrain}/{run}_samples.json)."))
        else:
            blocks.append(Samples(f"{run}", [(s["prompt"], s["completion"])
                                             for s in items[:cfg.samples_per_model]]))

    # -- provenance
    blocks.append(Heading("Provenance", 2, "provenance"))
    commit, dirty = git_state(root)
    meta = inputs.tokens_meta
    tok = ", ".join(f"{k} {meta[k]}" for k in ("kind", "vocab_size", "train_tokens", "val_tokens",
                                                "bytes_per_token_val") if k in meta)
    devices = sorted({m["device"] for m in [*inputs.pretrain.values(), *inputs.ablate]})
    prov = [
        ["git commit", commit], ["working tree", dirty + " (pipeline outputs metrics/, reports/, dvc.lock not counted)"],
        ["params.yaml sha256", inputs.params_sha256],
        ["data manifest sha256", f"{inputs.manifest[1]} ({inputs.manifest[0]})" if inputs.manifest else "not present"],
        ["data source", str(inputs.download.get("source", "unknown"))],
        ["tokenizer", tok or "unknown"],
        ["tokenizer sha256", str(meta.get("tokenizer_sha256", "unknown"))],
        ["hardware", "; ".join(devices)],
        ["host", f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"],
        ["generated", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
    ]
    blocks.append(Table(["Item", "Value"], prov, caption="What this report was computed from."))
    wall = stage_wall_clock(inputs)
    blocks.append(Table(["Stage", "Wall clock (s)"], [[s, fmt_number(v, ",.1f")] for s, v in wall]
                        + [["total", fmt_number(sum(v for _, v in wall), ",.1f")]], ["l", "r"],
                        caption="Wall clock per stage, from each stage's metrics (wall_s)."))
    libs = library_versions()
    blocks.append(Table(["Library", "Version"], [[k, v] for k, v in libs.items()], ["l", "l"],
                        caption="Library versions of the environment that ran the report."))
    short = commit[:12] if all(c in "0123456789abcdef" for c in commit) else "unknown"
    subtitle = (f"commit {short} · {dirty} · {len(inputs.pretrain)} pretrain runs · "
                f"{len(inputs.ablate)} ablation runs · {pct}% intervals")
    return blocks, subtitle


# ----------------------------------------------------------------------- write

REPORT_FILES = ("report.md", "report.html", "results.parquet", "results.csv")
TITLE = "PC-GPT: predictive coding vs backprop"


def write_report(inputs: Inputs, cfg: ReportConfig, root: Path) -> dict[str, Path]:
    """Build every output in a staging folder, then move them into `out_dir` (figures/ replaced whole)."""
    out = root / cfg.out_dir
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".tmp-report-", dir=out))
    try:
        fig_dir = stage / "figures"
        fig_dir.mkdir()
        results = results_table(inputs)
        results.to_parquet(stage / "results.parquet", index=False, engine="pyarrow")
        results.to_csv(stage / "results.csv", index=False)
        blocks, subtitle = build_document(inputs, results, cfg, root, fig_dir)
        (stage / "report.md").write_text(f"{to_markdown(TITLE, blocks, 'figures')}", encoding="utf-8")
        (stage / "report.html").write_text(to_html(TITLE, subtitle, blocks), encoding="utf-8")
        for name in REPORT_FILES:  # each rename is atomic; figures/ swapped as one folder
            os.replace(stage / name, out / name)
        old = out / "figures"
        if old.exists():
            os.replace(old, stage / "old-figures")
        os.replace(fig_dir, old)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {"report.md": out / "report.md", "report.html": out / "report.html",
            "results.parquet": out / "results.parquet", "results.csv": out / "results.csv",
            "figures": out / "figures"}


def log_report(tracker: Tracker, paths: dict[str, Path]) -> None:
    """Log the report files as artifacts under `report/`: to the report's own stage run and to
    the pipeline's parent run, where a researcher opening the pipeline execution finds them.
    `tracker` comes from `pipeline.tracking.stage_run` (MLflow or null); a failed upload is
    the tracker's one warning, never an error."""
    for to_parent in (False, True):
        for path in paths.values():
            tracker.log_artifact(path, f"report/{path.name}" if path.is_dir() else "report",
                                 to_parent=to_parent)


def prepare(root: Path = Path("."), params_file: Path | None = None
            ) -> tuple[ReportConfig, Inputs, dict[str, Any]]:
    """Load the `report` params and read + validate every input (nothing is written)."""
    params_file = params_file or root / PARAMS_FILE
    params = read_params(params_file)
    validate(params, [report_config.check_params, grid_from_params, tracking.check_params])
    cfg = load_section(ReportConfig, "report", params_file, params=params)
    grid = grid_from_params(params)
    return cfg, load_inputs(cfg, root, grid, params_file), params


def run(root: Path = Path("."), params_file: Path | None = None) -> dict[str, Path]:
    """Validate every input, then write the report (no tracking); returns the written paths."""
    cfg, inputs, _ = prepare(root, params_file)
    return write_report(inputs, cfg, root)


def main() -> int:
    t0 = time.perf_counter()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    root = Path(".")
    try:
        cfg, inputs, params = prepare(root)
        track_cfg = load_section(tracking.TrackingConfig, "tracking", params=params)
    except (ReportInputError, ParamsError) as e:
        fail("report", e)
    manifest = root / inputs.manifest[0] if inputs.manifest else None
    with tracking.stage_run("report", params=cfg, config=track_cfg, manifest=manifest) as tracker:
        paths = write_report(inputs, cfg, root)
        log_report(tracker, paths)
    print(f"report: wrote {', '.join(str(p) for p in paths.values())} in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
