"""The `report` section of params.yaml, and where the report's inputs are: composed from the
sections of the stages that write them (`data`, `tokenizer`, `train`, `ablation`), never
repeated here. Pure Python: `python -m pipeline.params check` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.metrics import METRICS, REQUIRED_NUMERIC
from pipeline.params import ParamsError, attempt, build, load_section

SECTIONS = ("report",)


@dataclass
class ReportInputs:
    """Where the other stages wrote what the report reads (relative to the repository root)."""

    pretrain: Path
    """`train.metrics_dir`: <run>.json (+ _details, _curve.tsv, _samples, _attention)."""
    ablate: Path
    """`ablation.metrics_dir`: <variant>-<seed>.json (+ _details)."""
    download: Path
    """`data.metrics_file`."""
    tokenizer: Path
    """`tokenizer.metrics_file`."""
    tokens_meta: Path
    """`<tokenizer.tokens_dir>/meta.json`."""
    manifest: Path | None
    """`<data.raw_dir>/<data.source>/manifest.json`, hashed for provenance (not a DVC dep:
    None where the `data` section does not say)."""


def report_inputs(params: dict[str, Any]) -> ReportInputs:
    """The input paths, from the writers' own config sections (defaults where one is absent)."""
    from stages.ablate import load_ablation
    from stages.data_config import DataConfig, TokenizerConfig
    from stages.pretrain.config import TrainConfig

    tok = build(TokenizerConfig, params.get("tokenizer") or {}, "tokenizer")
    train = build(TrainConfig, params.get("train") or {}, "train")
    ablate = load_ablation(params).metrics_dir if "ablation" in params else "metrics/ablate"
    data = build(DataConfig, params["data"], "data") if "data" in params else None
    return ReportInputs(Path(train.metrics_dir), Path(ablate),
                        Path(data.metrics_file if data else DataConfig.metrics_file),
                        Path(tok.metrics_file), tok.tokens_meta, data.manifest_path if data else None)


@dataclass
class ReportConfig:
    """The `report` section of params.yaml."""

    confidence: float = 0.95
    """Coverage of every interval (t-interval of a mean, Welch interval of a difference)."""
    reference: str = "pcgpt"
    """Ablation variant every difference is taken against: the unchanged PC-GPT."""
    control: str = "bp"
    """Backprop control variant, shown in every ablation table."""
    baseline_run: str = "baseline"
    """Pretrain run of the backprop GPT in the headline table."""
    pcgpt_run: str = "pcgpt"
    """Pretrain run of the PC-GPT in the headline table."""
    metric: str = "val/loss"
    """The metric the ablation differences, verdicts and bar charts are about."""
    table_metrics: list[str] = field(default_factory=lambda: ["val/acc", "perf/step_ms"])
    """Extra columns (mean ± CI) of the ablation tables."""
    headline_metrics: list[str] = field(default_factory=lambda: [
        "val/loss", "val/ppl", "val/bpb", "val/acc", "perf/tok_per_s", "mem/peak_gib"])
    """Rows of the headline table (baseline vs PC-GPT)."""
    test_time_settle_key: str = "attn_settle"
    """Override keys containing this mark test-time attention-settling variants (plotted apart from T)."""
    samples_per_model: int = 3
    """Generated samples shown per model."""
    out_dir: str = "reports"

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence: {self.confidence} must be in [0.5, 1)")
        for name, keys in (("metric", [self.metric]), ("table_metrics", self.table_metrics),
                           ("headline_metrics", self.headline_metrics)):
            for key in keys:
                if key not in METRICS:
                    raise ValueError(f"{name}: {key!r} is not a known metric (known: {', '.join(METRICS)})")
        if self.reference == self.control:
            raise ValueError(f"control: {self.control!r} must differ from reference")
        if self.samples_per_model < 0:
            raise ValueError(f"samples_per_model: must be >= 0, got {self.samples_per_model}")

    @property
    def required_metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*REQUIRED_NUMERIC, self.metric, *self.table_metrics,
                                    *self.headline_metrics]))


def check_params(params: dict[str, Any]) -> ReportConfig:
    """The `report` section, the runs and variants it names, and its inputs' sections."""
    found: list[str] = []
    cfg = attempt(found, load_section, ReportConfig, "report", "params.yaml", params)
    attempt(found, report_inputs, params)
    runs = params.get("runs")
    if cfg and isinstance(runs, dict):
        for key in ("baseline_run", "pcgpt_run"):
            if getattr(cfg, key) not in runs:
                found.append(f"report.{key}: {getattr(cfg, key)!r} is not a run "
                             f"(known: {', '.join(sorted(runs))})")
    ablation = params.get("ablation")
    variants = ablation.get("variants") if isinstance(ablation, dict) else None
    if cfg and isinstance(variants, dict):
        for key in ("reference", "control"):
            if getattr(cfg, key) not in variants:
                found.append(f"report.{key}: {getattr(cfg, key)!r} is not an ablation variant "
                             f"(known: {', '.join(sorted(variants))})")
    if found:
        raise ParamsError(*found)
    return cfg
