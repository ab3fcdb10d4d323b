"""Stage `ablate@<variant>-<seed>`: one item of the PC ablation grid.

The grid is a DVC `matrix` over `ablation.variants` x `seeds`. A variant is a name,
the research question it answers and a small override of the PC-GPT base run
(`runs.<ablation.base>`), one factor changed; a user adds a variant by editing
params.yaml only. Every item is a pretrain run through the same
`stages.pretrain.trainer.train` loop (no second training loop) at the pretrain runs'
own scale and seeds, so the grid's reference (the base run) and its backprop control
are the pretrain runs themselves: trained once, read by the report from
metrics/pretrain/ (why: on 2 CPU cores they would cost ~40 % of the grid again).
A variant equal to a run by construction names it in `versus` under the question
`equivalence`: the report shows it as a check of the code, not as a finding.

Reads:  data/tokens/, data/tokenizer/; params.yaml `seeds`, `model`, `pc`, `train`,
        `runs.<base>`, `ablation.base`, `ablation.variants.<variant>`,
        `ablation.metrics_dir`, `ablation.scratch_dir` (at start-up every run and every
        variant of the grid is checked, before any work).
Writes: metrics/ablate/<variant>-<seed>.json  the run's headline metrics (a DVC metric) and
        metrics/ablate/<variant>-<seed>_details.json  the rest: variant, seed, question,
        override, description, device and the diagnostics (pipeline/metrics.py);
        <scratch_dir>/<variant>-<seed>/  resumable checkpoints, the item's model, curve
        and samples (scratch: not DVC outs, git-ignored);
        an MLflow child run under the pipeline's parent, tagged with variant and seed.
Run:    python -m stages.ablate <variant> <seed>      (or `dvc repro ablate@<variant>-<seed>`)

Test-time variants (`eval.attn_settle_steps`) train exactly like the base (same seed,
same config: bit-identical weights on CPU) and then evaluate with that many
attention-settling steps, the only factor that differs. A diverged item (NaN/inf
loss) is a result, not a crash: pipeline.metrics.diverged_record.

`load_ablation` is the one parser of the `ablation` section (the report reads the
grid through it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.metrics import QUESTIONS, diverged_record, write_run_metrics
from pipeline.params import (ParamsError, attempt, build, check_seed, check_seeds, deep_merge, fail,
                             flatten, read_params, validate)

SECTIONS = ("ablation",)


@dataclass
class EvalOverride:
    """What changes at test time only (the model is trained as the base)."""

    attn_settle_steps: int | None = None
    """Attention-settling steps used when evaluating (None: as trained)."""

    def __post_init__(self) -> None:
        if self.attn_settle_steps is not None and self.attn_settle_steps < 0:
            raise ValueError(f"attn_settle_steps={self.attn_settle_steps}: must be >= 0")


@dataclass
class Variant:
    question: str
    """Which research question the variant answers (pipeline.metrics.QUESTIONS; groups the
    report's tables)."""
    description: str = ""
    """A short human label for the report."""
    override: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Sections `model`, `pc`, `train`, deep-merged over the base run (like `runs.<run>`)."""
    eval: EvalOverride = field(default_factory=EvalOverride)
    versus: str = ""
    """The pretrain run the report compares this variant with ("": the base run). Question
    `equivalence`: the run it equals by construction (the check is that Δ is 0)."""

    def __post_init__(self) -> None:
        if self.question not in QUESTIONS:
            raise ValueError(f"question: {self.question!r} is not allowed (must be one of "
                             f"{', '.join(QUESTIONS)})")

    def changes(self) -> dict[str, Any]:
        """What the variant changes, flat: `pc.settle_steps`, `eval.attn_settle_steps`, ..."""
        out = flatten(self.override)
        out.update({f"eval.{k}": v for k, v in dataclasses.asdict(self.eval).items() if v is not None})
        return out


@dataclass
class AblationConfig:
    base: str = "pcgpt"
    """The run in `runs` every variant modifies (the grid's reference)."""
    variants: dict[str, Variant] = field(default_factory=dict)
    metrics_dir: str = "metrics/ablate"
    scratch_dir: str = "checkpoints/ablate"

    def metrics_path(self, variant: str, seed: int) -> Path:
        """The item's headline metrics (pipeline.metrics.details_path: the rest)."""
        return Path(self.metrics_dir) / f"{item_name(variant, seed)}.json"

    def __post_init__(self) -> None:
        for name, v in self.variants.items():
            if not name.replace("_", "").isalnum():
                raise ValueError(f"variants.{name}: names may hold letters, digits and '_' only "
                                 "(they become DVC stage names and file names)")
            for section in v.override:
                if section not in ("model", "pc", "train"):
                    raise ValueError(f"variants.{name}.override.{section}: unknown section "
                                     "(allowed: model, pc, train)")
            if v.question == "equivalence" and not v.versus:
                raise ValueError(f"variants.{name}.versus: an equivalence check names the run it "
                                 "equals by construction")


def item_name(variant: str, seed: int) -> str:
    """The matrix item's name: DVC calls the stage `ablate@<variant>-<seed>`."""
    return f"{variant}-{seed}"


def load_ablation(params: dict[str, Any]) -> AblationConfig:
    """The `ablation` section on its own."""
    if "ablation" not in params:
        raise ParamsError("ablation: section missing from params.yaml")
    return build(AblationConfig, params["ablation"], "ablation")


def item_config(params: dict[str, Any], abl: AblationConfig, variant: str, seed: int):
    """The PretrainConfig of one grid item: base run <- variant override, seed."""
    # here, not at the top: the report reads the grid through this module without torch
    from stages.pretrain.config import RUN_SECTIONS, merge_config

    if variant not in abl.variants:
        raise ParamsError(f"ablation.variants.{variant}: no such variant "
                          f"(known: {', '.join(sorted(abl.variants))})")
    runs = params.get("runs") or {}
    if abl.base not in runs:
        raise ParamsError(f"ablation.base={abl.base!r}: no such run in `runs` "
                          f"(known: {', '.join(sorted(runs))})")
    # Only the base run's well-formed sections: a malformed one is the runs check's problem
    # (one line), and must not hide this variant's own problems.
    base = runs[abl.base] if isinstance(runs[abl.base], dict) else {}
    base = {s: v for s, v in base.items() if s in RUN_SECTIONS and isinstance(v, dict)}
    override = deep_merge(base, abl.variants[variant].override)
    cfg = merge_config(params, override, f"ablation.variants.{variant}")
    return dataclasses.replace(cfg, seed=seed)


def check_params(params: dict[str, Any]) -> None:
    """The `ablation` section on its own, then every variant merged over the base run: a
    broken variant fails every item's start, not only its own (after hours of the others).
    Variants are named apart from the runs (the report puts both in one table), and `versus`
    names a run."""
    found: list[str] = []
    abl = attempt(found, load_ablation, params)
    runs = params.get("runs") if isinstance(params.get("runs"), dict) else {}
    if abl is not None:
        for variant, v in abl.variants.items():
            attempt(found, item_config, params, abl, variant, 0)
            if variant in runs:
                found.append(f"ablation.variants.{variant}: also the name of a run in `runs` (the grid's "
                             f"reference {abl.base!r} and its control are the runs themselves)")
            if v.versus and v.versus not in runs:
                found.append(f"ablation.variants.{variant}.versus: {v.versus!r} is not a run "
                             f"(known: {', '.join(sorted(runs))})")
    if found:
        raise ParamsError(*found)


def item_record(metrics: dict[str, Any], abl: AblationConfig, variant: str, seed: int) -> dict[str, Any]:
    """An item's final metrics with what identifies it (variant, seed, question, description,
    the changes): the one flat dict the report reads back."""
    v = abl.variants[variant]
    return {**metrics, "variant": variant, "seed": seed, "question": v.question,
            "description": v.description or variant, "override": v.changes(), "versus": v.versus or abl.base}


def run_item(params: dict[str, Any], variant: str, seed: int, tracker=None) -> dict[str, Any]:
    """Train one grid item, write its metrics (headline + details), return them."""
    from pipeline.model_dir import load_model
    from pipeline.tracking import NullTracker, device_name
    from stages.data_config import check_tokenizer
    from stages.pretrain.config import RunPaths
    from stages.pretrain.data import load_shards, val_batches
    from stages.pretrain.evaluation import evaluate
    from stages.pretrain.runtime import Runtime
    from stages.pretrain.trainer import NonFiniteLoss, train

    tracker = tracker or NullTracker()
    abl = load_ablation(params)
    cfg = item_config(params, abl, variant, seed)
    tok = check_tokenizer(params)
    v = abl.variants[variant]
    name = item_name(variant, seed)
    paths = RunPaths.in_folder(Path(abl.scratch_dir) / name, tok.tokens_dir, tok.dir)
    t0 = time.perf_counter()
    try:
        metrics = train(cfg, name, paths, tracker, progress=sys.stderr.isatty())
    except NonFiniteLoss as e:
        print(f"ablate: {e}", file=sys.stderr)
        metrics = diverged_record(name, str(e), device_name())
    if v.eval.attn_settle_steps is not None and "diverged" not in metrics:
        # the trained model, evaluated again with test-time settling on the same val batches
        model, _ = load_model(paths.model_dir, {"attention": {"settle_steps": v.eval.attn_settle_steps}})
        shards = load_shards(paths.tokens_dir, model.config.block_size)
        val = val_batches(shards.val, n_batches=cfg.train.eval_batches, batch_size=cfg.train.micro_batch,
                          block_size=model.config.block_size)
        ev = evaluate(model, val, Runtime(), nullcontext(), shards.bytes_per_token_val)
        metrics.update(ev)
        tracker.log_metrics(ev, step=metrics["step"])
    out = item_record({**metrics, "wall_s": round(time.perf_counter() - t0, 3)}, abl, variant, seed)
    write_run_metrics(abl.metrics_path(variant, seed), out)
    return out


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see stages/pretrain/__main__.py
    ap = argparse.ArgumentParser(prog="python -m stages.ablate", description=__doc__.splitlines()[0])
    ap.add_argument("variant", help="a key of params.yaml `ablation.variants`")
    ap.add_argument("seed", type=int, help="one of `seeds`")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    from pipeline import tracking
    from pipeline.params import load_section
    from stages import data_config
    from stages.pretrain import config
    from stages.pretrain.trainer import TrainingInterrupted

    try:
        params = read_params(args.params)
        validate(params, [check_seed, check_seeds, config.check_params, check_params,
                          data_config.check_tokenizer, tracking.check_params])
        abl = load_ablation(params)
        cfg = item_config(params, abl, args.variant, args.seed)
        if args.seed not in check_seeds(params):
            raise ParamsError(f"seed {args.seed}: not in seeds {check_seeds(params)}")
        tcfg = load_section(tracking.TrackingConfig, "tracking", params=params)
    except ParamsError as e:
        fail("ablate", e)
    v = abl.variants[args.variant]
    tags = {"ablation.variant": args.variant, "ablation.seed": args.seed,
            "ablation.question": v.question, "pc.algorithm": cfg.pc.algorithm}
    try:
        with tracking.stage_run(f"ablate@{item_name(args.variant, args.seed)}", params=cfg.to_params(),
                                config=tcfg, tags=tags) as tracker:
            out = run_item(params, args.variant, args.seed, tracker)
    except TrainingInterrupted as e:
        print(f"ablate: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    print(f"ablate@{args.variant}-{args.seed}: val/loss {out['val/loss']:.4f}, "
          f"val/bpb {out['val/bpb']:.3f}, {out['wall_s']:.1f}s")


if __name__ == "__main__":
    main()
