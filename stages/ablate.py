"""Stage `ablate@<variant>-<seed>`: one item of the PC ablation grid.

The grid is a DVC `matrix` over `ablation.variants` x `ablation.seeds`. A variant
is a name, the research question it answers and a small override of the PC-GPT
base run (`runs.<ablation.base>`), one factor changed; a user adds a variant by
editing params.yaml only. Every item is a short pretrain run through the same
`stages.pretrain.train` loop (no second training loop), at the grid's own scale
(`ablation.scale`: a smaller model and a shorter schedule, applied to every item
before its variant's override, so all items differ from the base in one factor).

Reads:  data/tokens/, data/tokenizer/; params.yaml `model`, `pc`, `train`,
        `runs.<base>`, `ablation.base`, `ablation.scale`, `ablation.variants.<variant>`,
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
attention-settling steps, the only factor that differs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.metrics import write_run_metrics
from pipeline.params import (ParamsError, attempt, build, check_seed, deep_merge, fail, flatten,
                             read_params, validate)

SECTIONS = ("ablation",)
QUESTIONS = ("control", "precision", "distribution", "pathway", "settling")


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
    question: Literal["control", "precision", "distribution", "pathway", "settling"]
    """Which research question the variant answers (groups the report's tables)."""
    description: str = ""
    """A short human label for the report."""
    override: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Sections `model`, `pc`, `train`, deep-merged over the base run (like `runs.<run>`)."""
    eval: EvalOverride = field(default_factory=EvalOverride)


@dataclass
class AblationConfig:
    base: str = "pcgpt"
    """The run in `runs` every variant modifies."""
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    """Each variant is trained once per seed (the report's intervals are over seeds)."""
    scale: dict[str, dict[str, Any]] = field(default_factory=dict)
    """`model` / `train` overrides that size every item of the grid (applied before the
    variant's own override)."""
    variants: dict[str, Variant] = field(default_factory=dict)
    metrics_dir: str = "metrics/ablate"
    scratch_dir: str = "checkpoints/ablate"

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("seeds: must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds}: must not repeat")
        for section in self.scale:
            if section not in ("model", "train"):
                raise ValueError(f"scale.{section}: unknown section (allowed: model, train)")
        for name, v in self.variants.items():
            if not name.replace("_", "").isalnum():
                raise ValueError(f"variants.{name}: names may hold letters, digits and '_' only "
                                 "(they become DVC stage names and file names)")
            for section in v.override:
                if section not in ("model", "pc", "train"):
                    raise ValueError(f"variants.{name}.override.{section}: unknown section "
                                     "(allowed: model, pc, train)")


def item_name(variant: str, seed: int) -> str:
    """The matrix item's name: DVC calls the stage `ablate@<variant>-<seed>`."""
    return f"{variant}-{seed}"


def load_ablation(params: dict[str, Any]) -> AblationConfig:
    """The `ablation` section on its own (its base run must exist)."""
    if "ablation" not in params:
        raise ParamsError("ablation: section missing from params.yaml")
    cfg = build(AblationConfig, params["ablation"], "ablation")
    runs = params.get("runs") or {}
    if cfg.base not in runs:
        raise ParamsError(f"ablation.base={cfg.base!r}: no such run in `runs` "
                          f"(known: {', '.join(sorted(runs))})")
    return cfg


def item_config(params: dict[str, Any], abl: AblationConfig, variant: str, seed: int):
    """The PretrainConfig of one grid item: base run <- grid scale <- variant override, seed."""
    if variant not in abl.variants:
        raise ParamsError(f"ablation.variants.{variant}: no such variant "
                          f"(known: {', '.join(sorted(abl.variants))})")
    from stages.pretrain_config import check_override, merge_config

    # a base run of the wrong shape fails as itself: one line, not one per variant
    check_override(params["runs"].get(abl.base) or {}, f"runs.{abl.base}")
    override = deep_merge(params["runs"].get(abl.base) or {}, abl.scale)
    override = deep_merge(override, abl.variants[variant].override)
    cfg = merge_config(params, override, f"ablation.variants.{variant}")
    return dataclasses.replace(cfg, seed=seed)


def check_params(params: dict[str, Any]) -> None:
    """The `ablation` section on its own, then every variant merged over the base run: a
    broken variant fails every item's start, not only its own (after hours of the others)."""
    found: list[str] = []
    abl = attempt(found, load_ablation, params)
    if abl is not None:
        for variant in abl.variants:
            attempt(found, item_config, params, abl, variant, abl.seeds[0])
    if found:
        raise ParamsError(*found)


def evaluate_with(model_dir: Path, tokens_dir: Path, cfg, eval_override: EvalOverride) -> dict[str, float]:
    """Re-evaluate the item's saved model with test-time overrides (same fixed val batches)."""
    import json

    import torch
    from safetensors.torch import load_file

    from model.config import GPTConfig
    from model.pc import build_model
    from stages.pretrain import Runtime, evaluate
    from stages.pretrain_data import load_shards, val_batches

    meta = json.loads((model_dir / "meta.json").read_text(encoding="utf-8"))
    mcfg = meta["model"]
    if eval_override.attn_settle_steps is not None:
        mcfg = deep_merge(mcfg, {"attention": {"settle_steps": eval_override.attn_settle_steps}})
    model = build_model(GPTConfig(**mcfg))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    shards = load_shards(tokens_dir, model.config.block_size)
    t = cfg.train
    val = val_batches(shards.val, n_batches=t.eval_batches, batch_size=t.micro_batch,
                      block_size=model.config.block_size, rank=0, world_size=1)
    return evaluate(model, val, Runtime(device=torch.device("cpu")), nullcontext(),
                    shards.bytes_per_token_val)


def run_item(params: dict[str, Any], variant: str, seed: int, tracker=None) -> dict[str, Any]:
    """Train one grid item, write its metrics JSON, return it."""
    from stages.pretrain import NonFiniteLoss, RunPaths, train
    from stages.tokenizer import TokenizerConfig
    from pipeline.params import load_section

    abl = load_ablation(params)
    cfg = item_config(params, abl, variant, seed)
    tok = load_section(TokenizerConfig, "tokenizer", params=params)
    v = abl.variants[variant]
    name = item_name(variant, seed)
    scratch = Path(abl.scratch_dir) / name
    paths = RunPaths(tokens_dir=Path(tok.tokens_dir), tokenizer_dir=Path(tok.dir),
                     model_dir=scratch / "model", metrics=scratch / "train.json",
                     curve=scratch / "curve.tsv", samples=scratch / "samples.json",
                     attention=scratch / "attention.json", checkpoints=scratch / "checkpoints")
    t0 = time.perf_counter()
    try:
        metrics = train(cfg, name, paths, tracker, progress=sys.stderr.isatty())
    except NonFiniteLoss as e:
        # A diverged item is a result of the grid, not a crash of the pipeline: it is
        # recorded with NaN metrics (the report shows it as "not computable").
        print(f"ablate: {e}", file=sys.stderr)
        metrics = {"run": name, "diverged": str(e),
                   **{k: float("nan") for k in ("train/loss", "val/loss", "val/ppl", "val/bpb",
                                                "val/acc", "perf/tok_per_s", "perf/step_ms",
                                                "mem/peak_gib")}}
    if v.eval.attn_settle_steps is not None and "diverged" not in metrics:
        ev = evaluate_with(paths.model_dir, paths.tokens_dir, cfg, v.eval)
        metrics.update(ev)
        if tracker is not None:
            tracker.log_metrics(ev, step=metrics["step"])
    override = flatten(v.override)
    override.update({f"eval.{k}": val for k, val in dataclasses.asdict(v.eval).items() if val is not None})
    out = {**metrics, "variant": variant, "seed": seed, "question": v.question,
           "description": v.description or variant, "override": override,
           "wall_s": round(time.perf_counter() - t0, 3)}
    write_run_metrics(Path(abl.metrics_dir) / f"{name}.json", out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.ablate", description=__doc__.splitlines()[0])
    ap.add_argument("variant", help="a key of params.yaml `ablation.variants`")
    ap.add_argument("seed", type=int, help="one of `ablation.seeds`")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    from pipeline import tracking
    from pipeline.params import load_section
    from stages import pretrain_config, tokenizer
    from stages.pretrain import TrainingInterrupted

    try:
        params = read_params(args.params)
        validate(params, [check_seed, pretrain_config.check_params, check_params,
                          tokenizer.check_params, tracking.check_params])
        abl = load_ablation(params)
        cfg = item_config(params, abl, args.variant, args.seed)
        if args.seed not in abl.seeds:
            raise ParamsError(f"seed {args.seed}: not in ablation.seeds {abl.seeds}")
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
