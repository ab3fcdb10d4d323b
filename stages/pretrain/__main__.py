"""`python -m stages.pretrain <run>` (and `torchrun ... -m stages.pretrain <run>`): see __init__.py."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from contextlib import nullcontext

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared CPU
# box spinning threads fight every other process: a 4x64 model's step measured 76 ms with
# PASSIVE vs 0.5-5.8 s without, 2 threads, load 5-10 on 2 cores (README, "The pipeline").
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch.distributed as dist  # noqa: E402

from pipeline import tracking  # noqa: E402
from pipeline.io import write_json  # noqa: E402
from pipeline.metrics import seed_mean  # noqa: E402
from pipeline.params import (ParamsError, check_seed, check_seeds, fail, load_section, read_params,  # noqa: E402
                             validate)
from stages import data_config  # noqa: E402
from stages.pretrain import config  # noqa: E402
from stages.pretrain.config import RunPaths, load_config, run_metrics  # noqa: E402
from stages.pretrain.trainer import NonFiniteLoss, TrainingInterrupted, train  # noqa: E402

EXIT_NONFINITE = 3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.pretrain",
                                 description="Train one named run of params.yaml `runs`.")
    ap.add_argument("run", help="a key of params.yaml `runs` (baseline, pcgpt, ...); positional, "
                    "because torchrun would take a --run option for its own --run-path")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    try:
        params = read_params(args.params)
        validate(params, [check_seed, check_seeds, config.check_params, data_config.check_tokenizer,
                          tracking.check_params])
        cfg = load_config(args.run, params)
        seeds = check_seeds(params)
        tok = data_config.check_tokenizer(params)
        tcfg = load_section(tracking.TrackingConfig, "tracking", params=params)
    except ParamsError as e:
        fail("pretrain", e)
    manifest = None  # provenance only (tagged on the MLflow run), not a DVC param
    if "data" in params:
        try:
            manifest = data_config.check_data(params).manifest_path
        except ParamsError:
            pass  # the download stage names that error; training does not need it
    rank = int(os.environ.get("RANK", "0"))
    # One process trains every seed in turn (one start-up, not one per seed: on 2 CPU cores a
    # start-up costs ~5 s, a small run ~15 s); each seed is its own MLflow run and resumes alone.
    results = []
    try:
        for i, seed in enumerate(seeds):
            results.append(train_seed(args.run, cfg, seed, i == 0, tok, tcfg, manifest, rank))
    except NonFiniteLoss as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        sys.exit(EXIT_NONFINITE)
    except TrainingInterrupted as e:
        print(f"pretrain: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    except (ParamsError, FileNotFoundError) as e:
        fail("pretrain", e)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        write_json(run_metrics(cfg.train, args.run), seed_mean(results))


def train_seed(run: str, cfg, seed: int, first: bool, tok, tcfg, manifest, rank: int) -> dict:
    """Train seed `seed` of `run` as its own MLflow run (the first seed's model is registered)."""
    cfg = dataclasses.replace(cfg, seed=seed)
    paths = RunPaths.for_run(run, cfg.train, tok.tokens_dir, tok.dir, seed, first=first)
    tags = {"pcgpt.run": run, "pcgpt.seed": seed, "pc.algorithm": cfg.pc.algorithm,
            "attention.kernel": cfg.model.attention.kernel}
    tracked = (tracking.stage_run(f"pretrain@{run}", params=cfg.to_params(), config=tcfg, manifest=manifest,
                                  tags=tags)
               if rank == 0 else nullcontext(tracking.NullTracker()))
    with tracked as tracker:
        metrics = train(cfg, run, paths, tracker,
                        register=(f"{tcfg.registered_model}-{run}", tcfg.model_alias) if first else None)
    if rank == 0:
        print(f"pretrain@{run} seed {seed}: step {metrics['step']}, val/bpb {metrics['val/bpb']:.3f} "
              f"(unigram {metrics['val/unigram_bpb']:.3f}), {metrics['perf/tok_per_s']:,.0f} tok/s, "
              f"{metrics['wall_s']:.0f}s")
    return metrics


if __name__ == "__main__":
    main()
