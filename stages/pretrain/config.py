"""The params of the `pretrain` stage (sections `model`, `pc`, `train`, the named `runs`) and
the paths of a run's files.

Pure Python (no torch import): `python -m pipeline.params check` validates these
sections with it in well under a second, and the stage and `stages.ablate` build
their run configs through it, typed once, here. A run is `runs.<run>` (an override of
`model`, `pc`, `train`) deep-merged over the base sections; an ablation item is
the same merge with its own override (`merge_config`). Every section is also
checked on its own: a bad base value fails even where every run overrides it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.config import GPTConfig, PCConfig
from pipeline.metrics import curve_path, diagnostics_path, run_seed_metrics
from pipeline.params import ParamsError, attempt, build, check_seed, deep_merge, merged, to_dict

SECTIONS = ("model", "pc", "train", "runs")
RUN_SECTIONS = ("model", "pc", "train")
PATH_KEYS = ("models_dir", "metrics_dir", "checkpoints_dir")


@dataclass
class TrainConfig:
    """The `train` section: schedule, optimizer, evaluation, checkpoints, paths."""

    steps: int = 600
    """Optimizer steps."""
    micro_batch: int = 16
    """Sequences per rank per micro-step (what fits in memory)."""
    batch_tokens: int = 0
    """Tokens per optimizer step over all ranks and micro-steps; must be a multiple of
    micro_batch*block_size*world_size (the quotient is the gradient-accumulation count).
    0: one micro-step per rank."""
    optimizer: Literal["adamw", "muon"] = "adamw"
    """`muon`: Muon for the 2-D block matrices, AdamW for the rest (model/utils.py)."""
    lr: float = 3e-3
    """Peak learning rate (AdamW; Muon's own lr is scaled by make_optimizer)."""
    min_lr_frac: float = 0.1
    """The decay ends at lr*min_lr_frac (a floor, not zero: the last steps still learn)."""
    warmup_steps: int = 50
    decay: Literal["cosine", "linear"] = "cosine"
    weight_decay: float = 0.1
    """Decoupled weight decay on matrices and embeddings only (not gains or precisions)."""
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global grad norm to this (0 = off)."""
    label_smoothing: float = 0.0
    eval_every: int = 100
    """Evaluate on the fixed val batches every this many steps (and at the end)."""
    eval_batches: int = 8
    """Fixed val batches of micro_batch windows, spread evenly over val.bin."""
    log_every: int = 10
    """Log train metrics (and check the loss is finite) every this many steps."""
    save_every: int = 100
    """Checkpoint every this many steps (and at the end and on SIGTERM/SIGINT)."""
    keep_last: int = 2
    """Checkpoints kept besides the best one."""
    resume: Literal["auto", "never"] = "auto"
    """`auto`: continue from the newest intact checkpoint of the same config, if any;
    `never`: delete this run's checkpoints and start from step 0."""
    device: str = "auto"
    """`auto` (cuda if available, else cpu), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Autocast dtype of the forward: `auto` = bfloat16 on CUDA, float32 on CPU."""
    compile: bool = True
    """torch.compile the model on CUDA. CPU runs never compile: at this scale the
    compile time exceeds what it saves in a 5-minute run."""
    cuda_graph: Literal["auto", "off"] = "auto"
    """`auto`: on CUDA with `compile`, the whole optimizer step (micro-steps, all-reduce,
    clip, AdamW) is captured in one CUDA graph after three eager steps and replayed
    (model/step.py), so small models are bound by the GPU, not by Python; needs
    optimizer adamw and pc.tol 0, else the step runs uncaptured. `off`: never."""
    threads: int = 0
    """torch CPU threads per process (0: the cores divided by the local ranks)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms (slower on GPU; CPU runs are deterministic anyway)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["ROMEO:", "To be, or not"])
    sample_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_k: int = 50
    models_dir: str = "models"
    """The final model goes to <models_dir>/<run>/."""
    metrics_dir: str = "metrics/pretrain"
    """<run>.json (mean over seeds), <run>/<seed>.json (+ _details.json, _curve.tsv,
    _diagnostics.tsv), <run>_samples.json, <run>_attention.json."""
    checkpoints_dir: str = "checkpoints"
    """Scratch: <checkpoints_dir>/<run>/seed<seed>/ (not a DVC out, survives `dvc repro`)."""

    def __post_init__(self) -> None:
        for name in ("steps", "micro_batch", "eval_every", "eval_batches", "log_every",
                     "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("batch_tokens", "warmup_steps", "keep_last", "threads", "sample_tokens",
                     "sample_top_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_frac <= 1:
            raise ValueError(f"min_lr_frac: must be in [0, 1], got {self.min_lr_frac}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("weight_decay, grad_clip: must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not self.sample_temperature > 0:
            raise ValueError(f"sample_temperature: must be > 0, got {self.sample_temperature}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device: {self.device!r} must be auto, cpu, cuda or cuda:<n>")

    def lr_at(self, step: int) -> float:
        """Linear warmup over warmup_steps, then cosine or linear decay to lr*min_lr_frac."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if self.decay == "cosine" else 1 - progress
        return self.lr * (self.min_lr_frac + (1 - self.min_lr_frac) * shape)

    def accum_steps(self, block_size: int, world: int) -> int:
        """Micro-steps per optimizer step (gradient accumulation) for `batch_tokens`."""
        per_micro = self.micro_batch * block_size * world
        if self.batch_tokens % per_micro:
            raise ParamsError(f"train.batch_tokens={self.batch_tokens}: must be a multiple of "
                              f"micro_batch*block_size*world_size={per_micro}")
        return max(1, self.batch_tokens // per_micro)


@dataclass
class PretrainConfig:
    """Everything one training run depends on: what `train()` takes and checkpoints hash."""

    seed: int
    model: GPTConfig
    """The `model` section with the `pc` section inside, typed and checked once, here.
    `vocab_size` is not a param: it comes from the shards (`gpt_config`)."""
    train: TrainConfig

    @property
    def pc(self) -> PCConfig:
        return self.model.pc

    def gpt_config(self, vocab_size: int) -> GPTConfig:
        """The model config for the shards' vocabulary of `vocab_size` ids, unpadded:
        model/generate.py samples from every logit, so padding ids (never trained
        toward anything but "unlikely") would be sampled by an undertrained model and
        fail to decode. The default BPE size, 2048, is a multiple of 64 already."""
        return dataclasses.replace(self.model, vocab_size=vocab_size)

    def to_params(self) -> dict[str, Any]:
        """The merged sections as params.yaml holds them (every default filled in): what
        MLflow logs, meta.json records and `config_hash` hashes."""
        model = {k: v for k, v in to_dict(self.model).items() if k not in ("vocab_size", "pc")}
        return {"seed": self.seed, "model": model, "pc": to_dict(self.pc), "train": to_dict(self.train)}


@dataclass
class RunPaths:
    """Every file a run (one seed of it) reads or writes: composed here, nowhere else."""

    tokens_dir: Path
    tokenizer_dir: Path
    model_dir: Path
    metrics: Path
    """Headline metrics; pipeline.metrics.details_path(metrics) is the rest."""
    curve: Path
    diagnostics: Path
    """The per-layer PC diagnostics over training (pipeline.metrics.DIAGNOSTICS_COLUMNS)."""
    samples: Path | None
    """Generated samples and the attention map: written for the registered seed only."""
    attention: Path | None
    checkpoints: Path

    @classmethod
    def for_run(cls, run: str, train: TrainConfig, tokens_dir: str | Path, tokenizer_dir: str | Path,
                seed: int, first: bool = True) -> RunPaths:
        """Seed `seed` of a named run: metrics/pretrain/<run>/<seed>.json (+ _details, _curve,
        _diagnostics) and checkpoints/<run>/seed<seed>/. The first seed's model is models/<run>/
        (the DVC out, registered in MLflow) with the run's samples and attention map; the other
        seeds' models are scratch beside their checkpoints (one model per run is enough to use)."""
        m, scratch = Path(train.metrics_dir), Path(train.checkpoints_dir) / run
        metrics = run_seed_metrics(m, run, seed)
        return cls(Path(tokens_dir), Path(tokenizer_dir),
                   Path(train.models_dir) / run if first else scratch / f"seed{seed}-model",
                   metrics, curve_path(metrics), diagnostics_path(metrics),
                   m / f"{run}_samples.json" if first else None, m / f"{run}_attention.json" if first else None,
                   scratch / f"seed{seed}")

    @classmethod
    def in_folder(cls, folder: str | Path, tokens_dir: str | Path, tokenizer_dir: str | Path) -> RunPaths:
        """Every output in one scratch folder (an ablation item's run; no samples or attention
        map: the report reads neither for grid items, and sampling costs ~1 s a run on CPU)."""
        f = Path(folder)
        return cls(Path(tokens_dir), Path(tokenizer_dir), f / "model", f / "train.json", f / "curve.tsv",
                   f / "diagnostics.tsv", None, None, f / "checkpoints")


def run_metrics(train: TrainConfig, run: str) -> Path:
    """`<metrics_dir>/<run>.json`: the run's headline numbers averaged over its seeds (the DVC metric)."""
    return Path(train.metrics_dir) / f"{run}.json"


def model_config(model: dict[str, Any], pc: dict[str, Any]) -> GPTConfig:
    """The `model` section (with the `pc` section inside) as a GPTConfig, checked; its
    vocab_size is GPTConfig's default until the shards set it (PretrainConfig.gpt_config)."""
    if not isinstance(model, dict):
        raise ParamsError(f"model: expected a mapping, got {type(model).__name__} {model!r}")
    for key, where in (("vocab_size", "data/tokens/meta.json"), ("pc", "the `pc` section")):
        if key in model:
            raise ParamsError(f"model.{key}: not a model param here (it comes from {where})")
    return build(GPTConfig, {**model, "pc": pc}, "model")


def check_override(override: Any, where: str) -> dict[str, Any]:
    """`override` (at key path `where`) is a mapping of run sections, paths left alone."""
    if not isinstance(override, dict):
        raise ParamsError(f"{where}: expected a mapping of sections, got {override!r}")
    found = []
    for section, value in override.items():
        if section not in RUN_SECTIONS:
            found.append(f"{where}.{section}: unknown section (allowed: {', '.join(RUN_SECTIONS)})")
        elif not isinstance(value, dict):
            found.append(f"{where}.{section}: expected a mapping, got {value!r}")
        elif section == "train":
            found += [f"{where}.train.{key}: paths cannot be overridden per run (dvc.yaml declares "
                      "them from the base `train` section)" for key in PATH_KEYS if key in value]
    if found:
        raise ParamsError(*found)
    return override


def merge_config(params: dict[str, Any], override: Any, where: str) -> PretrainConfig:
    """The base sections model/pc/train with `override` (at key path `where`) deep-merged in,
    every key checked; each problem names `where` besides its own key path."""
    check_override(override, where)
    found: list[str] = []
    sections = {s: deep_merge(params.get(s) or {}, override.get(s) or {}) for s in RUN_SECTIONS}
    pc = attempt(found, build, PCConfig, sections["pc"], "pc")
    train = attempt(found, build, TrainConfig, sections["train"], "train")
    model = attempt(found, model_config, sections["model"], to_dict(pc) if pc else {})
    seed = attempt(found, check_seed, params)
    if found:
        raise merged(where, ParamsError(*found))
    return PretrainConfig(seed=seed, model=model, train=train)


def _runs(params: dict[str, Any]) -> dict[str, Any]:
    runs = params.get("runs")
    if not isinstance(runs, dict) or not runs:
        raise ParamsError("runs: missing or empty (a mapping of run name -> override)")
    return runs


def load_config(run: str, params: dict[str, Any]) -> PretrainConfig:
    """The config of named run `run`: sections model/pc/train with `runs.<run>` merged in."""
    runs = _runs(params)
    if run not in runs:
        raise ParamsError(f"runs.{run}: no such run (known: {', '.join(sorted(runs))})")
    return merge_config(params, runs[run] or {}, f"runs.{run}")


def check_params(params: dict[str, Any]) -> None:
    """Sections model, pc, train on their own, then every run after merging."""
    found: list[str] = []
    attempt(found, model_config, params.get("model") or {}, {})
    attempt(found, build, PCConfig, params.get("pc") or {}, "pc")
    attempt(found, build, TrainConfig, params.get("train") or {}, "train")
    for run in attempt(found, _runs, params) or {}:
        attempt(found, load_config, run, params)
    if found:
        raise ParamsError(*found)


def config_hash(cfg: PretrainConfig) -> str:
    """sha256 of what determines the trajectory: checkpoints of another hash are not resumed.
    Bookkeeping knobs (logging, saving, resume, samples, paths) are left out."""
    d = cfg.to_params()
    for k in ("resume", "log_every", "save_every", "keep_last", "sample_prompts", "sample_tokens",
              "sample_temperature", "sample_top_k", *PATH_KEYS):
        d["train"].pop(k)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
