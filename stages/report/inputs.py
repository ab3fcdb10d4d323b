"""The report's inputs, read and validated before anything is written: every file the other
stages wrote (pipeline/metrics.py is their contract), and the results table built from them.
A missing or malformed file is a ReportInputError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.io import sha256_file
from pipeline.metrics import (CURVE_COLUMNS, DETAILS_SUFFIX, DIAGNOSTICS_COLUMNS, QUESTIONS, curve_path,
                              details_path, diagnostics_path, is_number, numeric, read_run_metrics,
                              run_seed_metrics)
from stages.ablate import AblationConfig
from stages.report.config import ReportConfig, ReportInputs


class ReportInputError(ValueError):
    """An input file of the report is missing or malformed (the message names the file)."""


@dataclass
class Inputs:
    """Everything the report reads, validated."""

    pretrain: dict[str, dict[int, dict[str, Any]]]  # run -> seed -> metrics
    curves: dict[str, dict[int, pd.DataFrame]]  # run -> seed -> one row per evaluation
    diagnostics: dict[str, dict[int, pd.DataFrame]]  # run -> seed -> per-layer series (long format)
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


def _check_tsv(path: Path, columns: tuple[str, ...], what: str, text: tuple[str, ...] = (),
               rows: bool = True) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ReportInputError(f"{path}: not a valid TSV {what}: {e}") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ReportInputError(f"{path}: {what} is missing column(s) {', '.join(missing)} "
                               f"(expected header {' '.join(columns)})")
    for c in df.columns:
        if c not in text and not pd.api.types.is_numeric_dtype(df[c]) and len(df):
            raise ReportInputError(f"{path}: column {c!r} is not numeric")
    if rows and df.empty:
        raise ReportInputError(f"{path}: {what} has no rows")
    return df


def _check_curve(path: Path) -> pd.DataFrame:
    return _check_tsv(path, CURVE_COLUMNS, "curve")


def _check_diagnostics(path: Path) -> pd.DataFrame:
    """The per-layer series (empty for a backprop run)."""
    return _check_tsv(path, DIAGNOSTICS_COLUMNS, "diagnostics table", text=("metric",), rows=False)


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


def read_run(path: Path, what: str, required: tuple[str, ...]) -> dict[str, Any]:
    """One run's metrics (`<name>.json` + `<name>_details.json`, see pipeline/metrics.py), validated."""
    if not path.is_file():
        raise ReportInputError(f"{path}: missing ({what})")
    try:
        m = read_run_metrics(path)
    except (UnicodeDecodeError, ValueError) as e:
        raise ReportInputError(f"{path}: not valid JSON ({what}, or its {details_path(path).name}): {e}") from e
    return check_metrics(m, path, required)


def load_inputs(cfg: ReportConfig, ins: ReportInputs, root: Path, grid: AblationConfig | None,
                params_file: Path) -> Inputs:
    """Read and validate every input; raise ReportInputError naming the first bad file.
    `grid`: the ablation grid of params (None: report every item file there is)."""
    notes: list[str] = []
    pdir = root / ins.pretrain
    if not pdir.is_dir():
        raise ReportInputError(f"{pdir}: missing (pretrain metrics folder); run `dvc repro pretrain` first")
    required = cfg.required_metrics
    pretrain: dict[str, dict[int, dict[str, Any]]] = {}
    curves: dict[str, dict[int, pd.DataFrame]] = {}
    diagnostics: dict[str, dict[int, pd.DataFrame]] = {}
    samples, attention = {}, {}
    for r in ins.runs:
        pretrain[r], curves[r], diagnostics[r] = {}, {}, {}
        for seed in ins.seeds:
            path = run_seed_metrics(pdir, r, seed)
            pretrain[r][seed] = read_run(path, f"pretrain metrics of run {r!r}, seed {seed}", required)
            if (p := curve_path(path)).is_file():
                curves[r][seed] = _check_curve(p)
            if (p := diagnostics_path(path)).is_file():
                diagnostics[r][seed] = _check_diagnostics(p)
        if (p := pdir / f"{r}_samples.json").is_file():
            samples[r] = _check_samples(read_json(p, "generated samples"), p)
        if (p := pdir / f"{r}_attention.json").is_file():
            attention[r] = _check_attention(read_json(p, "attention map"), p)

    adir = root / ins.ablate
    if not adir.is_dir():
        raise ReportInputError(f"{adir}: missing (ablation metrics folder); run `dvc repro ablate` first")
    present = {p.name: p for p in sorted(adir.glob("*.json")) if not p.stem.endswith(DETAILS_SUFFIX)}
    if grid is not None:
        expected = [grid.metrics_path(v, s).name for v in grid.variants for s in ins.seeds]
        for name in expected:
            if name not in present:
                raise ReportInputError(f"{adir / name}: missing (ablation item of the grid in "
                                       f"{params_file.name} ablation.variants x seeds)")
        extra = sorted(set(present) - set(expected))
        if extra:
            notes.append(f"Ignored {len(extra)} file(s) in {ins.ablate} that are not in the ablation "
                         f"grid of {params_file.name}: {', '.join(extra)}.")
        files = [present[n] for n in expected]
    else:
        files = list(present.values())
        notes.append(f"No ablation grid (ablation.variants) in {params_file.name}: "
                     f"every file in {ins.ablate} is reported.")
    ablate = []
    for p in files:
        m = read_run(p, "ablation metrics", required)
        for key, tp in (("variant", str), ("question", str), ("description", str), ("override", dict),
                        ("versus", str)):
            if not isinstance(m.get(key), tp):
                raise ReportInputError(f"{p}: {key!r} missing or not a {tp.__name__}")
        if not isinstance(m.get("seed"), int) or isinstance(m["seed"], bool):
            raise ReportInputError(f"{p}: 'seed' missing or not an integer")
        if m["question"] not in QUESTIONS:
            raise ReportInputError(f"{p}: question {m['question']!r} is not one of {', '.join(QUESTIONS)}")
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
    if ins.manifest is not None and (root / ins.manifest).is_file():
        read_json(root / ins.manifest, "data manifest")  # must at least be valid JSON
        manifest = (ins.manifest.as_posix(), sha256_file(root / ins.manifest))
    else:
        notes.append(f"No data manifest ({ins.manifest or 'no `data` section in params'}) in this "
                     "workspace (not a dependency of the report; `dvc pull` the download stage to hash it).")
    return Inputs(pretrain, curves, diagnostics, samples, attention, ablate, download, tokenizer, tokens_meta,
                  sha256_file(params_file), manifest, notes)


# --------------------------------------------------------------------- results

ID_COLUMNS = ("source", "run", "variant", "seed", "question", "description", "override", "versus", "device")


def results_table(inputs: Inputs) -> pd.DataFrame:
    """One row per trained model: every seed of the pretrain runs (variant = the run), then the
    ablation items; id columns, then every metric."""
    rows, devices = [], []
    for run, seeds in inputs.pretrain.items():
        for seed, m in seeds.items():
            rows.append({"source": "pretrain", "run": f"{run}-{seed}", "variant": run, "seed": seed,
                         "question": None, "description": None, "override": "{}", "versus": None,
                         **_metric_items(m)})
            devices.append(m["device"])
    for m in inputs.ablate:
        rows.append({"source": "ablate", "run": f"{m['variant']}-{m['seed']}", "variant": m["variant"],
                     "seed": m["seed"], "question": m["question"], "description": m["description"],
                     "override": json.dumps(m["override"], sort_keys=True), "versus": m["versus"],
                     **_metric_items(m)})
        devices.append(m["device"])
    df = pd.DataFrame(rows)
    df["device"] = devices
    metric_cols = sorted(c for c in df.columns if c not in ID_COLUMNS)
    df = df[list(ID_COLUMNS) + metric_cols]
    df["seed"] = df["seed"].astype("Int64")
    for c in ("source", "run", "variant", "question", "description", "override", "versus", "device"):
        df[c] = df[c].astype("string")
    for c in metric_cols:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype(float)
    return df


def _metric_items(m: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in numeric(m).items() if k not in ID_COLUMNS}
