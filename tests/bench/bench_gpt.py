"""pcgpt's training step against nanoGPT's, and the PC step against the bp step, on one GPU.

Run (one CUDA GPU; nanoGPT's model.py from a checkout of karpathy/nanoGPT, never
committed here):

    python tests/bench/bench_gpt.py --nanogpt path/to/nanoGPT --shapes char 124m
    python tests/bench/bench_gpt.py --pc-table --shapes char

Every row is one training step (forward, backward, clip to 1.0, fused AdamW
step, zero_grad) on a fixed random batch, bf16 autocast, timed in one process:
`--warmup` steps (compilation, CUDA-graph capture), then `--steps` steps each
between two CUDA events; the median is reported. Columns:
- ms: median GPU time of a step; tok/s; MFU (model FLOPs per token, PaLM's 6N +
  attention, of each model over the GPU's dense bf16 peak, PEAK_FLOPS);
- host ms: median host time to enqueue one step (no synchronisation): when it is
  as large as the GPU time, the step is bound by Python and launches, not the GPU;
- peak GiB: torch.cuda.max_memory_allocated over the case, model and optimizer
  state included;
- x nanoGPT: tokens/s over nanoGPT's default (compiled) row of the same shape,
  measured in the same process.

Cases per shape: `nanoGPT` (torch.compile, as its train.py), `nanoGPT ro`
(torch.compile mode="reduce-overhead"), `pcgpt` (GPT.compile + model/step.py's
TrainStep), `pcgpt graph` (the same step captured in one CUDA graph), `pcgpt ro`
(torch.compile mode="reduce-overhead" on the model, eager step).
Shapes: `char` (6 layers, 384 wide, 6 heads, context 256, batch 64, vocab 65:
nanoGPT's Shakespeare-char config), `124m` (GPT-2 small: 12/768/12, context 1024,
batch 12, vocab 50304).

`--pc-table`: the PC algorithms at T in --T against the captured bp step of the
same model (gaussian attention, head precision, as the PC-GPT default): `pc`
(free predictions), `pc fixed` (fixed predictions), `ipc`, `settle`; ms, the
ratio to bp and that ratio per (T+1), peak GiB (flat in T for pc and ipc).
The Markdown table is printed last; --out writes the rows as JSON.

`--profile` (with --pc-table): instead of timing, profile two uncaptured compiled
steps of each PC case with torch.profiler and print where the GPU time goes (the
top kernels by total CUDA time, kernel launches per step, GPU ms per step).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model import GPTConfig, build_model  # noqa: E402
from model.step import TrainStep  # noqa: E402
from model.utils import PEAK_FLOPS, flops_per_token, make_optimizer  # noqa: E402

SHAPES = {
    "char": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch=64, vocab=65),
    "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=12, vocab=50304),
}


def peak_flops() -> float:
    name = torch.cuda.get_device_name().lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def batch(shape: dict, accum: int = 1):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, shape["vocab"], (accum, shape["batch"], shape["block_size"] + 1), device="cuda", generator=g)
    return x[..., :-1].contiguous(), x[..., 1:].contiguous()


def time_steps(step, warmup: int, steps: int) -> tuple[float, float]:
    """(median GPU ms, median host enqueue ms) of `step()` after `warmup` calls."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    events, host = [], []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        step()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events), statistics.median(host)


def reset() -> None:
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


# -- nanoGPT ---------------------------------------------------------------------------------

def nanogpt_case(path: Path, shape: dict, mode: str | None, args) -> dict:
    spec = importlib.util.spec_from_file_location("nanogpt_model", path / "model.py")
    nano = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nano)
    reset()
    cfg = nano.GPTConfig(block_size=shape["block_size"], vocab_size=shape["vocab"], n_layer=shape["n_layer"],
                         n_head=shape["n_head"], n_embd=shape["n_embd"], dropout=0.0, bias=False)
    torch.manual_seed(0)
    model = nano.GPT(cfg).cuda()
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cuda")
    model = torch.compile(model, mode=mode)
    x, y = batch(shape)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x[0], y[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms, host = time_steps(step, args.warmup, args.steps)
    n = model.get_num_params()
    L, H, Q, T = shape["n_layer"], shape["n_head"], shape["n_embd"] // shape["n_head"], shape["block_size"]
    fpt = 6 * n + 12 * L * H * Q * T  # nanoGPT's own estimate_mfu formula
    return row(f"nanoGPT{' ' + 'ro' if mode else ''}", shape, ms, host, fpt)


# -- pcgpt -----------------------------------------------------------------------------------

def pcgpt_model(shape: dict, pc: dict | None = None, kernel: str = "dot"):
    cfg = GPTConfig(vocab_size=shape["vocab"], block_size=shape["block_size"], n_layer=shape["n_layer"],
                    n_head=shape["n_head"], n_embd=shape["n_embd"],
                    attention=dict(kernel=kernel, precision="fixed" if kernel == "dot" else "head"),
                    pc=pc or {})
    torch.manual_seed(0)
    return build_model(cfg).cuda()


def pcgpt_case(shape: dict, mode: str, args, pc: dict | None = None, kernel: str = "dot", name: str = "") -> dict:
    reset()
    model = pcgpt_model(shape, pc, kernel)
    opt = make_optimizer(model, "adamw", lr=1e-3, weight_decay=0.1)
    if mode == "ro":
        model.compile(mode="reduce-overhead")
    else:
        model.compile()
    train_step = TrainStep(model, opt, grad_clip=1.0, capture=mode == "graph")
    x, y = batch(shape)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            train_step(x, y, 1e-3)

    if args.profile:
        return profile(step, name, args.warmup)
    ms, host = time_steps(step, args.warmup, args.steps)
    return row(name or f"pcgpt{'' if mode == 'compile' else ' ' + mode}", shape, ms, host,
               flops_per_token(model.config))


def profile(step, name: str, warmup: int, steps: int = 2) -> None:
    """Print the kernels of `steps` uncaptured steps after `warmup` (where the GPU time goes)."""
    from torch.profiler import ProfilerActivity
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    stats = dict(torch._dynamo.utils.counters["stats"])
    print(f"\n# dynamo after {warmup + steps} steps: {stats}")
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time_total for e in events) / 1e3 / steps
    launches = sum(e.count for e in events) / steps
    print(f"\n## {name}: {total:.2f} GPU ms of kernels per step, {launches:.0f} kernels per step")
    print("| kernel | calls/step | ms/step | % |\n|---|---:|---:|---:|")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
        ms = e.device_time_total / 1e3 / steps
        print(f"| {e.key[:90]} | {e.count / steps:.0f} | {ms:.3f} | {100 * ms / total:.1f} |")
    sys.stdout.flush()


def row(name: str, shape: dict, ms: float, host: float, fpt: float) -> dict:
    tokens = shape["batch"] * shape["block_size"]
    tok_s = tokens / (ms / 1e3)
    peak = peak_flops()
    return {"case": name, "shape": shape_name(shape), "ms": ms, "host_ms": host, "tok_s": tok_s,
            "mfu_pct": 100 * tok_s * fpt / peak if peak else 0.0,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def shape_name(shape: dict) -> str:
    return next(k for k, v in SHAPES.items() if v == shape)


def guarded(fn, *a, **kw) -> dict | None:
    """One case; a failure is a row that says so (the table is still printed)."""
    try:
        return fn(*a, **kw)
    except Exception as err:  # noqa: BLE001 - report, do not hide: the error text is the row
        print(f"FAILED {fn.__name__}{a[1:2]}: {type(err).__name__}: {str(err)[:300]}", file=sys.stderr)
        return {"case": kw.get("name") or str(a[1:2]), "error": f"{type(err).__name__}: {str(err)[:120]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nanogpt", type=Path, help="a checkout of karpathy/nanoGPT (its model.py)")
    ap.add_argument("--shapes", nargs="+", default=["char"], choices=list(SHAPES))
    ap.add_argument("--cases", nargs="+", default=["nanogpt", "nanogpt_ro", "compile", "graph", "ro"])
    ap.add_argument("--pc-table", action="store_true")
    ap.add_argument("--T", nargs="+", type=int, default=[1, 2, 4, 6])
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--profile", action="store_true", help="with --pc-table: profile, do not time")
    ap.add_argument("--settle-max-T", type=int, default=1 << 30,
                    help="with --pc-table: skip `settle` above this T (its memory and time grow with T)")
    ap.add_argument("--labels", nargs="+", default=["pc", "pc fixed", "ipc", "settle"],
                    help="with --pc-table: which PC cases")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}", file=sys.stderr)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        if args.pc_table:
            rows.append(guarded(pcgpt_case, shape, "compile" if args.profile else "graph", args, None, "gaussian",
                                name="bp graph"))
            for T in args.T:
                for label, pc, mode in (
                        ("pc", dict(algorithm="pc", settle_steps=T, state_lr=1.0, precision="layer"), "graph"),
                        ("pc fixed", dict(algorithm="pc", settle_steps=T, state_lr=1.0, fixed_predictions=True,
                                          precision="layer"), "graph"),
                        ("ipc", dict(algorithm="ipc", settle_steps=T, state_lr=0.5), "graph"),
                        ("settle", dict(algorithm="settle", settle_steps=T, state_lr=0.5), "graph")):
                    if label not in args.labels or (label == "settle" and T > args.settle_max_T):
                        continue
                    r = guarded(pcgpt_case, shape, "compile" if args.profile else mode, args, pc, "gaussian",
                                name=f"{label} T={T}")
                    if r:
                        r["T"] = T
                    rows.append(r)
                    print(json.dumps(r), file=sys.stderr, flush=True)
            continue
        for case in args.cases:
            if case.startswith("nanogpt"):
                if args.nanogpt is None:
                    continue
                r = guarded(nanogpt_case, args.nanogpt, shape, "reduce-overhead" if case.endswith("ro") else None, args)
            else:
                r = guarded(pcgpt_case, shape, case, args)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))
    print_table(rows, args.pc_table)


def print_table(rows: list[dict], pc_table: bool) -> None:
    ok = [r for r in rows if r and "error" not in r]
    if pc_table:
        bp = {r["shape"]: r["ms"] for r in ok if r["case"] == "bp graph"}
        print("| shape | case | ms | x bp | x bp / (T+1) | host ms | peak GiB |\n|---|---|---:|---:|---:|---:|---:|")
        for r in ok:
            ratio = r["ms"] / bp[r["shape"]] if r["shape"] in bp else float("nan")
            per = ratio / (r["T"] + 1) if "T" in r else float("nan")
            print(f"| {r['shape']} | {r['case']} | {r['ms']:.2f} | {ratio:.2f} | {per:.2f} | {r['host_ms']:.2f} | "
                  f"{r['peak_gib']:.2f} |")
    else:
        ref = {r["shape"]: r["tok_s"] for r in ok if r["case"] == "nanoGPT"}
        print("| shape | case | ms | tok/s | MFU % | host ms | peak GiB | x nanoGPT |\n"
              "|---|---|---:|---:|---:|---:|---:|---:|")
        for r in ok:
            x = r["tok_s"] / ref[r["shape"]] if r["shape"] in ref else float("nan")
            print(f"| {r['shape']} | {r['case']} | {r['ms']:.2f} | {r['tok_s']:,.0f} | {r['mfu_pct']:.1f} | "
                  f"{r['host_ms']:.2f} | {r['peak_gib']:.2f} | {x:.2f} |")
    for r in rows:
        if r and "error" in r:
            print(f"| FAILED | {r['case']} | {r['error']} |")


if __name__ == "__main__":
    main()
