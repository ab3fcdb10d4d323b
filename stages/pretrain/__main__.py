"""`python -m stages.pretrain <run>` (and `torchrun ... -m stages.pretrain <run>`): see __init__.py."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import nullcontext

import torch.distributed as dist

from pipeline import tracking
from pipeline.params import ParamsError, check_seed, fail, load_section, read_params, validate
from stages import data_config
from stages.pretrain import config
from stages.pretrain.config import RunPaths, load_config
from stages.pretrain.trainer import NonFiniteLoss, TrainingInterrupted, train

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
        validate(params, [check_seed, config.check_params, data_config.check_tokenizer,
                          tracking.check_params])
        cfg = load_config(args.run, params)
        tok = data_config.check_tokenizer(params)
        tcfg = load_section(tracking.TrackingConfig, "tracking", params=params)
    except ParamsError as e:
        fail("pretrain", e)
    paths = RunPaths.for_run(args.run, cfg.train, tok.tokens_dir, tok.dir)
    manifest = None  # provenance only (tagged on the MLflow run), not a DVC param
    if "data" in params:
        try:
            manifest = data_config.check_data(params).manifest_path
        except ParamsError:
            pass  # the download stage names that error; training does not need it
    rank = int(os.environ.get("RANK", "0"))
    tracked = (tracking.stage_run(f"pretrain@{args.run}", params=cfg.to_params(), config=tcfg,
                                  manifest=manifest,
                                  tags={"pcgpt.run": args.run, "pc.algorithm": cfg.pc.algorithm,
                                        "attention.kernel": cfg.model.attention.kernel})
               if rank == 0 else nullcontext(tracking.NullTracker()))
    try:
        with tracked as tracker:
            metrics = train(cfg, args.run, paths, tracker,
                            register=(f"{tcfg.registered_model}-{args.run}", tcfg.model_alias))
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
        print(f"pretrain@{args.run}: step {metrics['step']}, val/bpb {metrics['val/bpb']:.3f} "
              f"(unigram {metrics['val/unigram_bpb']:.3f}), {metrics['perf/tok_per_s']:,.0f} tok/s, "
              f"{metrics['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
