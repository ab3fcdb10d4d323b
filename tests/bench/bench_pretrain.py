"""Overhead of the pretrain loop over the bare model step, and of MLflow tracking (BENCHMARKS.md).

Run (CPU, tiny):   python tests/bench/bench_pretrain.py
Run (one GPU):     python tests/bench/bench_pretrain.py --device cuda --preset gpu

In one process, on the same config and a seeded char corpus written to a temp dir
(tests/stages/pretrain_helpers.py), three ways of training for --steps steps:

- `model-only`: GPT.training_step + clip + optimizer step + zero_grad on one
  device-resident batch, the same autocast and torch.compile as the stage; CUDA
  synchronised once at the end of the timed steps;
- `pretrain, null tracker`: stages.pretrain.train() (seeded batches from the
  memmap, lr schedule, loss checks, logging, progress bar) with the null tracker;
  its step time is the loop's own perf/step_ms (CUDA events on the device's
  timeline, so host stalls that leave the GPU idle are counted);
- `pretrain, mlflow tracker`: the same with an MLflow tracker on a SQLite store
  in the temp dir (pipeline/tracking.py: metrics queued, sent by a thread).

Timing excludes warm-up (the first --warmup model-only steps; the loop's first
log interval, which holds compilation) and evaluation/checkpoint time (the loop
pauses its clock for them; eval_every and save_every are set to --steps).
`--repeats` runs every row that many times, round-robin, and reports the median.
The Markdown table is printed last: step ms, tokens/s, MFU and the overhead of
each row against `model-only`, then the tracking overhead (mlflow vs null).

Presets: `cpu` (2 layers, 64 wide, context 64, batch 8: a smoke test) and `gpu`
(6 layers, 384 wide, context 256, batch 64: the issue's char config).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from model.pc import build_model  # noqa: E402
from model.utils import flops_per_token, make_optimizer, mfu  # noqa: E402
from pipeline import tracking  # noqa: E402
from stages.pretrain.config import PretrainConfig, RunPaths, merge_config  # noqa: E402
from stages.pretrain.data import load_shards, train_batch  # noqa: E402
from stages.pretrain.runtime import peak_flops, setup_runtime  # noqa: E402
from stages.pretrain.trainer import train  # noqa: E402
from tests.stages.pretrain_helpers import write_data  # noqa: E402

PRESETS = {
    "cpu": ({"block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64}, {"micro_batch": 8}),
    "gpu": ({"block_size": 256, "n_layer": 6, "n_head": 6, "n_embd": 384}, {"micro_batch": 64}),
}


def config(args) -> PretrainConfig:
    model, train_kw = PRESETS[args.preset]
    for key in ("n_layer", "n_embd", "n_head", "block_size"):
        if getattr(args, key) is not None:
            model[key] = getattr(args, key)
    if args.micro_batch is not None:
        train_kw["micro_batch"] = args.micro_batch
    train = {**train_kw, "steps": args.steps, "warmup_steps": min(10, args.steps),
             "eval_every": args.steps, "save_every": args.steps,
             "log_every": args.log_every, "eval_batches": 2, "resume": "never",
             "device": args.device, "dtype": args.dtype, "compile": args.compile,
             "sample_tokens": 4, "sample_prompts": ["the"]}
    params = {"seed": 1, "model": model, "pc": {"algorithm": args.algorithm, "settle_steps": args.T},
              "train": train}
    return merge_config(params, {}, "bench")


def model_only(cfg: PretrainConfig, data_dir: Path, args) -> tuple[float, float]:
    """Seconds per step of the bare training step (see the module docstring), and the
    host's seconds per step to enqueue it (before the final synchronisation): when the two
    are close, every microsecond of host work the loop adds shows in its step time."""
    t = cfg.train
    rt = setup_runtime(t)
    shards = load_shards(data_dir / "tokens", cfg.model.block_size)
    gcfg = cfg.gpt_config(shards.vocab_size)
    torch.manual_seed(cfg.seed)
    model = build_model(gcfg).to(rt.device)
    opt = make_optimizer(model, kind=t.optimizer, lr=t.lr, weight_decay=t.weight_decay)
    if rt.device.type == "cuda" and t.compile:
        model.compile()
    amp = torch.bfloat16 if (t.dtype == "bfloat16" or (t.dtype == "auto" and rt.device.type == "cuda")) else None
    autocast = torch.autocast(rt.device.type, dtype=amp) if amp else nullcontext()
    x, y = (b.to(rt.device) for b in train_batch(shards.train, seed=1, step=0, micro_step=0, rank=0,
                                                  batch_size=t.micro_batch, block_size=gcfg.block_size))
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with autocast:
            model.training_step(x, y, optimizer=opt)
        torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(t.steps - args.warmup):
        step()
    host = time.perf_counter() - t0
    sync()
    n = t.steps - args.warmup
    return (time.perf_counter() - t0) / n, host / n


def pretrain_loop(cfg: PretrainConfig, data_dir: Path, out: Path, tracked: bool) -> float:
    """Seconds per step measured by the stage's own loop (perf/step_ms)."""
    cfg.train.models_dir, cfg.train.metrics_dir, cfg.train.checkpoints_dir = (
        str(out / "models"), str(out / "metrics"), str(out / "checkpoints"))
    paths = RunPaths.for_run("bench", cfg.train, data_dir / "tokens", data_dir / "tokenizer")
    tracker = (tracking.open_stage_run("bench-pretrain", params=cfg.to_params(),
                                       config=tracking.TrackingConfig(experiment="pcgpt-bench"))
               if tracked else tracking.NullTracker())
    try:
        metrics = train(cfg, "bench", paths, tracker, progress=False)
    finally:
        tracker.end()
    if tracked and tracker.run_id is None:
        raise RuntimeError("MLflow tracker did not start (see the warning above)")
    return metrics["perf/step_ms"] / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, auto")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="default: gpu on CUDA, cpu otherwise")
    ap.add_argument("--steps", type=int, default=None, help="default: 300 on CUDA, 40 on CPU")
    ap.add_argument("--warmup", type=int, default=None, help="model-only steps not timed (default 10)")
    ap.add_argument("--log_every", type=int, default=10, help="the loop's logging interval")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--algorithm", default="bp", help="pc.algorithm (bp, settle, pc, ipc)")
    ap.add_argument("--T", type=int, default=0, help="pc.settle_steps")
    for key in ("n_layer", "n_embd", "n_head", "block_size", "micro_batch"):
        ap.add_argument(f"--{key}", type=int, default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    args.preset = args.preset or ("gpu" if cuda else "cpu")
    args.steps = args.steps or (300 if cuda else 40)
    args.warmup = min(args.warmup if args.warmup is not None else 10, args.steps - 1)
    os.environ.pop("WORLD_SIZE", None)

    with tempfile.TemporaryDirectory(prefix="bench-pretrain-") as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        print("writing the char corpus ...", file=sys.stderr)
        write_data(tmp, n_lines=40_000 if cuda else 3_000)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
        rows: dict[str, list[float]] = {"model-only": [], "pretrain, null tracker": [],
                                        "pretrain, mlflow tracker": []}
        host: list[float] = []  # model-only host enqueue time per step
        for r in range(args.repeats):
            for name in rows:
                print(f"[{r + 1}/{args.repeats}] {name} ...", file=sys.stderr)
                cfg = config(args)
                if name == "model-only":
                    s, h = model_only(cfg, data_dir, args)
                    host.append(h)
                else:
                    s = pretrain_loop(cfg, data_dir, tmp / f"run{r}-{len(rows[name])}",
                                      tracked="mlflow" in name)
                rows[name].append(s)
        cfg = config(args)
        gcfg = cfg.gpt_config(load_shards(data_dir / "tokens", cfg.model.block_size).vocab_size)
        rt = setup_runtime(cfg.train)

    tokens = cfg.train.micro_batch * gcfg.block_size
    fpt, peak = flops_per_token(gcfg), peak_flops(rt.device)
    device = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    base = statistics.median(rows["model-only"])
    print(f"\n{device}, torch {torch.__version__}; {gcfg.n_layer} layers, {gcfg.n_embd} wide, context {gcfg.block_size}, "
          f"batch {cfg.train.micro_batch}, vocab {gcfg.vocab_size}, pc.algorithm {args.algorithm}; "
          f"{args.steps} steps, median of {args.repeats}; compile={args.compile and rt.device.type == 'cuda'}\n")
    print("| variant | step ms | tokens/s | MFU % | overhead vs model-only |")
    print("|---|---:|---:|---:|---:|")
    for name, values in rows.items():
        s = statistics.median(values)
        m = f"{100 * mfu(tokens / s, fpt, peak):.1f}" if peak else "n/a"
        print(f"| {name} | {s * 1e3:.2f} | {tokens / s:,.0f} | {m} | {100 * (s / base - 1):+.1f}% |")
    null, ml = (statistics.median(rows[k]) for k in ("pretrain, null tracker", "pretrain, mlflow tracker"))
    print(f"\ntracking overhead (mlflow vs null): {100 * (ml / null - 1):+.2f}% of step time")
    print(f"model-only host enqueue time: {statistics.median(host) * 1e3:.2f} ms/step "
          f"(of {base * 1e3:.2f} ms/step wall)")


if __name__ == "__main__":
    main()
