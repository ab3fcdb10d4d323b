"""The `report` section of params.yaml (pure Python: `python -m pipeline.params check` reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.metrics import METRICS, REQUIRED_NUMERIC
from pipeline.params import ParamsError, load_section

SECTIONS = ("report",)


@dataclass
class ReportInputs:
    """Where the other stages wrote their files (their paths, repeated as the report's deps)."""

    pretrain: str = "metrics/pretrain"
    ablate: str = "metrics/ablate"
    download: str = "metrics/download.json"
    tokenizer: str = "metrics/tokenizer.json"
    tokens_meta: str = "data/tokens/meta.json"
    raw: str = "data/raw"  # <raw>/<source>/manifest.json is hashed for provenance if present


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
    inputs: ReportInputs = field(default_factory=ReportInputs)
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
    """The `report` section, and the runs and variants it names where params define them."""
    cfg = load_section(ReportConfig, "report", params=params)
    found = []
    runs = params.get("runs")
    if isinstance(runs, dict):
        for key in ("baseline_run", "pcgpt_run"):
            if getattr(cfg, key) not in runs:
                found.append(f"report.{key}: {getattr(cfg, key)!r} is not a run "
                             f"(known: {', '.join(sorted(runs))})")
    ablation = params.get("ablation")
    variants = ablation.get("variants") if isinstance(ablation, dict) else None
    if isinstance(variants, dict):
        for key in ("reference", "control"):
            if getattr(cfg, key) not in variants:
                found.append(f"report.{key}: {getattr(cfg, key)!r} is not an ablation variant "
                             f"(known: {', '.join(sorted(variants))})")
    if found:
        raise ParamsError(*found)
    return cfg
