"""The `report` section of params.yaml, and where the report's inputs are: composed from the
sections of the stages that write them (`data`, `tokenizer`, `train`, `ablation`), never
repeated here. Pure Python: `python -m pipeline.params check` reads it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.metrics import METRICS, REQUIRED_NUMERIC
from pipeline.params import ParamsError, attempt, build, check_seeds, load_section

SECTIONS = ("report",)


@dataclass
class ReportInputs:
    """Where the other stages wrote what the report reads (relative to the repository root)."""

    pretrain: Path
    """`train.metrics_dir`: <run>/<seed>.json (+ _details, _curve.tsv, _diagnostics.tsv),
    <run>_samples.json, <run>_attention.json."""
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
    runs: list[str] = field(default_factory=list)
    """The pretrain runs (`runs`), each trained once per seed."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """`seeds`: of every pretrain run and every ablation variant."""


def report_inputs(params: dict[str, Any]) -> ReportInputs:
    """The input paths, from the writers' own config sections (defaults where one is absent)."""
    from stages.ablate import load_ablation
    from stages.data_config import DataConfig, TokenizerConfig
    from stages.pretrain.config import TrainConfig

    tok = build(TokenizerConfig, params.get("tokenizer") or {}, "tokenizer")
    train = build(TrainConfig, params.get("train") or {}, "train")
    ablate = load_ablation(params).metrics_dir if "ablation" in params else "metrics/ablate"
    data = build(DataConfig, params["data"], "data") if "data" in params else None
    runs = params.get("runs")
    return ReportInputs(Path(train.metrics_dir), Path(ablate),
                        Path(data.metrics_file if data else DataConfig.metrics_file),
                        Path(tok.metrics_file), tok.tokens_meta, data.manifest_path if data else None,
                        list(runs) if isinstance(runs, dict) else [], check_seeds(params))


@dataclass
class ReportConfig:
    """The `report` section of params.yaml."""

    confidence: float = 0.95
    """Coverage of every interval (t-interval of a mean, Welch interval of a difference)."""
    baseline_run: str = "baseline"
    """The headline's 2x2 of attention kernel x training algorithm, four pretrain runs:
    backprop with dot-product attention (the GPT baseline) ..."""
    kernel_run: str = "bp_gaussian"
    """... backprop with PC-GPT's attention (baseline -> kernel_run: the kernel effect; it is
    also the backprop control of every ablation table) ..."""
    pc_dot_run: str = "pc_dot"
    """... PC-GPT's training algorithm with dot-product attention ..."""
    pcgpt_run: str = "pcgpt"
    """... and PC-GPT (kernel_run -> pcgpt_run: the algorithm effect). It is the ablation
    grid's base (`ablation.base`): the reference of every ablation difference."""
    metric: str = "val/loss"
    """The metric the headline effects, ablation differences, verdicts and bar charts are about."""
    table_metrics: list[str] = field(default_factory=lambda: ["val/acc", "perf/step_ms"])
    """Extra columns (mean ± CI) of the ablation tables."""
    headline_metrics: list[str] = field(default_factory=lambda: [
        "val/loss", "val/ppl", "val/bpb", "val/acc", "perf/tok_per_s", "mem/peak_gib"])
    """Rows of the headline table (mean ± CI over seeds of each of the four runs)."""
    chance_margin: float = 0.10
    """The grid is "above chance" when every run ends at least this fraction below the
    unigram bpb ..."""
    majority_factor: float = 2.0
    """... and the backprop control's val accuracy is at least this multiple of the
    majority-token accuracy (issue 11: 10 % and 2x on the CPU default)."""
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
        runs = self.headline_runs
        if len(set(runs)) != len(runs):
            raise ValueError(f"baseline_run, kernel_run, pc_dot_run, pcgpt_run: must be four different "
                             f"runs, got {', '.join(runs)}")
        if not 0 <= self.chance_margin < 1:
            raise ValueError(f"chance_margin: {self.chance_margin} must be in [0, 1)")
        if not self.majority_factor >= 1:
            raise ValueError(f"majority_factor: {self.majority_factor} must be >= 1")
        if self.samples_per_model < 0:
            raise ValueError(f"samples_per_model: must be >= 0, got {self.samples_per_model}")

    @property
    def headline_runs(self) -> list[str]:
        return [self.baseline_run, self.kernel_run, self.pc_dot_run, self.pcgpt_run]

    @property
    def reference(self) -> str:
        """The run every ablation difference is taken against."""
        return self.pcgpt_run

    @property
    def control(self) -> str:
        """The backprop control of the ablation tables (same attention as the reference)."""
        return self.kernel_run

    @property
    def required_metrics(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*REQUIRED_NUMERIC, self.metric, *self.table_metrics,
                                    *self.headline_metrics]))


def check_params(params: dict[str, Any]) -> ReportConfig:
    """The `report` section, the runs it names, the grid's base, and its inputs' sections."""
    found: list[str] = []
    cfg = attempt(found, load_section, ReportConfig, "report", "params.yaml", params)
    attempt(found, report_inputs, params)
    runs = params.get("runs")
    if cfg and isinstance(runs, dict):
        for key in ("baseline_run", "kernel_run", "pc_dot_run", "pcgpt_run"):
            if getattr(cfg, key) not in runs:
                found.append(f"report.{key}: {getattr(cfg, key)!r} is not a run "
                             f"(known: {', '.join(sorted(runs))})")
    ablation = params.get("ablation")
    base = ablation.get("base", "pcgpt") if isinstance(ablation, dict) else None
    if cfg and base is not None and base != cfg.pcgpt_run:
        found.append(f"report.pcgpt_run: {cfg.pcgpt_run!r} must be the ablation grid's base "
                     f"(ablation.base: {base!r}), the reference of every ablation difference")
    if found:
        raise ParamsError(*found)
    return cfg
