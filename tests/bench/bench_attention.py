"""Forward+backward time of each attention kernel and path vs flash SDPA `dot`, on one CUDA GPU (BENCHMARKS.md).

Run: python tests/bench/bench_attention.py [--quick] [--shapes 8,12,1024,64 4,12,4096,64]
     [--kernels dot gaussian ...] [--impls triton legacy reference] [--out DIR]

For each (B, H, L, D[, Hkv]) in bf16, causal, `head` precision (a learned λ per head, so
its gradient is computed too), student_t ν learned, mixture C = 2 with learned weights, and
each path (`impl`): `triton` (model/triton_attention.py), `legacy` (SDPA: flash for dot, the
baseline every row is divided by; on augmented inputs for gaussian/mixture, their path for
cached decoding and masks; none for student_t/laplace) and `reference` (the explicit O(L²)
definition): the median time of forward + backward over q, k, v and the kernel parameters by
triton.testing.do_bench (CUDA events, L2 flushed; compile and autotuning happen in warm-up
runs first), eagerly (host time included: tests/bench/attention_host.py times the Triton
path's on a CPU) and as a captured CUDA graph (no launch gaps: the kernels' own time), the
peak memory, and ‖x − x_ref‖/‖x_ref‖ of y, dq, dk, dv, dλ
(the log-precision's gradient) and dν (student_t) against the reference in fp32 on the
same bf16 inputs (computed one batch element at a time, so it fits at L = 4096).
`dot` here is the plain 1/√D baseline, so n/a for dλ; its `triton` row is the same Triton
code with λ·q·k, to tell the kernels' math cost from the Triton implementation's.

Floors (printed per shape): matmul FLOPs over the measured bf16 matmul rate, special-function
(MUFU: exp2, log2, rsqrt, rcp) ops over SMs × 16/clock × the max SM clock, and the HBM bytes
every implementation must move (q, k, v, o, dO read, o, dq, dk, dv written) over the
measured copy bandwidth; the largest is the floor. Counts per causal score (B·H·L(L+1)/2):
flash SDPA does 7 matmuls of 2D FLOPs (2 forward, 5 backward) and 2 exp2; the Triton
kernels 9 matmuls (their backward is two kernels, dq and dk/dv, each recomputing q·k and
dO·v) and the MUFU ops of MUFU_PER_SCORE.

Each kernel runs in its own process (a fault cannot take the others down); --quick runs one
process, one small GQA shape of odd length, the Triton path and the reference only, the first
autotune config only: a ~30 s check for compile errors and wrong results before the full run.
Prints a Markdown table last; with --out also writes bench_attention.json there.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.attention import KernelParams, attention  # noqa: E402

KERNELS = ["dot", "gaussian", "student_t", "laplace", "mixture"]
IMPLS = ["triton", "legacy", "reference"]
N_COMPONENTS = 2
LEGACY = {"dot": "sdpa", "gaussian": "sdpa", "mixture": "sdpa"}
"""The `legacy` path per kernel (model.attention's impl); student_t and laplace have none."""
PATH = {("dot", "legacy"): "SDPA (flash)", ("gaussian", "legacy"): "SDPA, augmented q/k",
        ("mixture", "legacy"): f"SDPA over {N_COMPONENTS}×keys"}
MUFU_PER_SCORE = {"dot": (1, 1, 1), "gaussian": (1, 1, 1), "student_t": (2, 3, 3), "laplace": (2, 2, 2),
                  "mixture": (N_COMPONENTS,) * 3}
"""Special-function ops per causal score in the Triton kernels: (forward, dq kernel, dk/dv kernel)."""
QUICK_SHAPES = ["2,8,333,64,2"]
DEVICE, DTYPE = "cuda", torch.bfloat16
GRADS = ["q", "k", "v", "log_lam", "nu_raw"]


def parse_shape(s: str) -> tuple[int, ...]:
    dims = tuple(int(x) for x in s.split(","))
    return dims if len(dims) == 5 else (*dims, dims[1])  # (B, H, L, D, Hkv)


def make_inputs(kernel: str, shape, dtype, seed: int = 0) -> dict:
    B, H, L, D, Hkv = shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    C = N_COMPONENTS if kernel == "mixture" else 1

    def rnd(*s, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*s, generator=g, device=DEVICE) * scale + shift).to(dt).requires_grad_(True)

    return dict(q=rnd(B, H, L, D), k=rnd(B, Hkv, L, D), v=rnd(B, Hkv, L, D),
                log_lam=rnd(1, H, 1, C, scale=0.1, shift=-0.5 * math.log(D), dt=torch.float32),
                nu_raw=rnd(H, shift=4.0, dt=torch.float32), mix=rnd(H, C, scale=0.1, dt=torch.float32))


def params(kernel: str, t: dict) -> KernelParams:
    if kernel == "dot":  # the baseline: plain attention, scale 1/√D (SDPA's own scaling)
        scale = t["q"].shape[-1] ** -0.5
        return KernelParams("dot", torch.full((1, 1, 1, 1), scale, device=t["q"].device), fixed_scale=scale)
    nu = F.softplus(t["nu_raw"]) if kernel == "student_t" else None
    log_mix = t["mix"].log_softmax(-1) if kernel == "mixture" else None
    return KernelParams(kernel, t["log_lam"].exp(), nu, log_mix, 1e-6)


def wrt(kernel: str, t: dict) -> list[str]:
    names = ["q", "k", "v"]
    if kernel != "dot":
        names.append("log_lam")
    if kernel == "student_t":
        names.append("nu_raw")
    if kernel == "mixture":
        names.append("mix")
    return names


def fwd_bwd(kernel: str, t: dict, dy: torch.Tensor, impl: str) -> list[torch.Tensor]:
    """[y, grads…] of one forward + backward (torch.autograd.grad: no .grad state, graph-capturable)."""
    y = attention(t["q"], t["k"], t["v"], params(kernel, t), impl=impl)
    names = wrt(kernel, t)
    return [y, *torch.autograd.grad(y, [t[n] for n in names], dy)]


def reference(kernel: str, t: dict, dy: torch.Tensor) -> dict:
    """fp32 reference outputs and gradients on the bf16 inputs, one batch element at a time
    (attention is per batch element; the per-head parameters' gradients add up)."""
    names = wrt(kernel, t)
    out = {n: [] for n in ["y", "q", "k", "v"]}
    shared = {n: 0.0 for n in names if n not in ("q", "k", "v")}
    for b in range(t["q"].shape[0]):
        tb = {n: (x[b:b + 1] if n in ("q", "k", "v") else x).detach().float().requires_grad_(True) for n, x in t.items()}
        y = attention(tb["q"], tb["k"], tb["v"], params(kernel, tb), impl="reference")
        grads = torch.autograd.grad(y, [tb[n] for n in names], dy[b:b + 1].float())
        out["y"].append(y.detach())
        for n, g in zip(names, grads):
            if n in out:
                out[n].append(g)
            else:
                shared[n] = shared[n] + g
        del y, grads, tb
    return {**{n: torch.cat(v) for n, v in out.items()}, **shared}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def time_impl(kernel: str, t: dict, dy: torch.Tensor, impl: str) -> dict:
    from triton.testing import do_bench
    path = LEGACY[kernel] if impl == "legacy" else impl
    run = lambda: fwd_bwd(kernel, t, dy, path)  # noqa: E731
    row = dict(kernel=kernel, impl=impl, path=PATH.get((kernel, impl), impl))
    try:
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile / autotune / allocator warm-up, as graph capture wants
            for _ in range(2):
                outs = run()
        torch.cuda.current_stream().wait_stream(side)
        del outs
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        outs = [x.detach() for x in run()]
        torch.cuda.synchronize()
        row["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        row["extra_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["ms"] = do_bench(run, warmup=25, rep=100, return_mode="median")
    except torch.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    try:
        if impl == "reference":  # its time is not the question, and a graph would hold its memory twice
            raise RuntimeError("not captured")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        row["graph_ms"] = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
        del graph
    except Exception as err:  # noqa: BLE001 (a path that cannot be captured still has its eager time)
        row["graph_error"] = f"{type(err).__name__}: {str(err)[:80]}"
    row["outs"] = outs
    return row


def paths(kernel: str, impls: list[str]) -> list[str]:
    """The requested impls this kernel has."""
    return [i for i in impls if i != "legacy" or kernel in LEGACY]


def bench_kernel(kernel: str, shapes: list[str], impls: list[str]):
    """Yields one row per path, shape by shape."""
    for s in shapes:
        shape = parse_shape(s)
        t = make_inputs(kernel, shape, DTYPE)
        dy = torch.randn(*shape[:3], shape[3], device=DEVICE, dtype=DTYPE)
        timed = []
        for impl in paths(kernel, impls):
            try:
                timed.append(time_impl(kernel, t, dy, impl))
            except Exception as err:  # noqa: BLE001 (report, go on with the next path)
                timed.append(dict(kernel=kernel, impl=impl, path=impl, error=f"{type(err).__name__}: {err}"[:200]))
            gc.collect()
            torch.cuda.empty_cache()
        try:
            ref = reference(kernel, t, dy)
        except torch.OutOfMemoryError:
            ref = None
        for row in timed:
            outs = row.pop("outs", None)
            if outs is not None and ref is not None:
                names = ["y", *wrt(kernel, t)]
                for n, x in zip(names, outs):
                    row[f"err_{n}"] = rel(x, ref[n])
            yield {**row, "shape": list(shape)}
        del ref, timed
        gc.collect()
        torch.cuda.empty_cache()


# -- floors ---------------------------------------------------------------------------------------

def ceilings() -> dict:
    """Measured bf16 matmul rate and copy bandwidth; the SFU rate from SMs × 16/clock × max clock."""
    from triton.testing import do_bench
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * n**3 / do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median") / 1e9
    x = torch.randn(2**28, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    tbs = 2 * x.numel() * 4 / do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median") / 1e9
    del a, b, x, y
    clock = 1.98
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout.split()
        clock = float(out[0]) / 1000 if out else clock
    except (OSError, ValueError, subprocess.TimeoutExpired):
        pass
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return dict(tflops=tflops, tbs=tbs, sfu_tops=sms * 16 * clock / 1e3, clock_ghz=clock, sms=sms)


def floors(kernel: str, shape, ceil: dict) -> dict:
    """µs floors of the Triton kernels (and of flash SDPA for `dot`) at this shape."""
    B, H, L, D, Hkv = shape
    scores = B * H * L * (L + 1) / 2
    mm = 9 * 2 * D * scores
    sfu = sum(MUFU_PER_SCORE[kernel]) * scores
    hbm = 6 * B * (H + Hkv) * L * D * 2  # q: 2 reads + dq, o: write + read, dO; k, v: 2 reads + dk, dv
    us = dict(mm=mm / ceil["tflops"] / 1e6, sfu=sfu / ceil["sfu_tops"] / 1e6, hbm=hbm / ceil["tbs"] / 1e6)
    flash = dict(mm=7 * 2 * D * scores / ceil["tflops"] / 1e6, sfu=2 * scores / ceil["sfu_tops"] / 1e6, hbm=us["hbm"])
    return dict(gflop=mm / 1e9, sfu_gop=sfu / 1e9, hbm_mb=hbm / 1e6, us=us, floor_us=max(us.values()),
                bound=max(us, key=us.get), flash_floor_us=max(flash.values()))


# -- driver ---------------------------------------------------------------------------------------

def fmt(x, spec=".1e") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(rows: list[dict], ceil: dict, device: str) -> str:
    base = {tuple(r["shape"]): r for r in rows if r["kernel"] == "dot" and r["impl"] == "legacy" and "ms" in r}
    lines = [f"Device: {device}",
             f"Ceilings: bf16 matmul {ceil['tflops']:.0f} TFLOP/s, copy {ceil['tbs']:.2f} TB/s (measured); "
             f"SFU {ceil['sfu_tops']:.2f} Top/s ({ceil['sms']} SMs × 16/clk × {ceil['clock_ghz']:.2f} GHz)", ""]
    shapes = sorted({tuple(r["shape"]) for r in rows}, key=lambda s: s[2])
    lines += ["| (B,H,L,D,Hkv) | kernel | matmul GFLOP | SFU Gop | HBM MB | floor µs (mm / sfu / hbm) | bound |",
              "|---|---|---:|---:|---:|---|---|"]
    for shape in shapes:
        for kernel in KERNELS:
            if not any(r["kernel"] == kernel and tuple(r["shape"]) == shape for r in rows):
                continue
            f = floors(kernel, shape, ceil)
            u = f["us"]
            lines.append(f"| {shape} | {kernel} | {f['gflop']:.1f} | {f['sfu_gop']:.2f} | {f['hbm_mb']:.0f} | "
                         f"{f['floor_us']:.0f} ({u['mm']:.0f} / {u['sfu']:.0f} / {u['hbm']:.0f}) | {f['bound']} |")
        lines.append(f"| {shape} | dot (flash SDPA: 7 matmuls, 2 exp2) | | | | {floors('dot', shape, ceil)['flash_floor_us']:.0f} | |")
    lines += ["", "| (B,H,L,D,Hkv) | kernel | impl | path | fwd+bwd ms | × dot | graph ms | × dot (graph) | × floor "
              "(graph) | peak MiB | rel err y | dq | dk | dv | dλ | dν / dπ |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for r in (r for r in rows if tuple(r["shape"]) == shape):
            head = f"| {shape} | {r['kernel']} | {r['impl']} | {r['path']} |"
            if "ms" not in r:
                lines.append(f"{head} failed: {r.get('error', '?')[:80]} | | | | | | | | | | | |")
                continue
            b = base.get(shape)
            x = r["ms"] / b["ms"] if b else None
            g = r.get("graph_ms")
            xg = g / b["graph_ms"] if (g and b and b.get("graph_ms")) else None
            fl = floors(r["kernel"], shape, ceil)
            floor_us = {"triton": fl["floor_us"], "legacy": fl["flash_floor_us"] if r["kernel"] == "dot" else None}
            xf = g * 1e3 / floor_us[r["impl"]] if g and floor_us.get(r["impl"]) else None
            lines.append(f"{head} {r['ms']:.3f} | {fmt(x, '.2f')} | {fmt(g, '.3f')} | {fmt(xg, '.2f')} | "
                         f"{fmt(xf, '.1f')} | {r['peak_mib']:.0f} | {fmt(r.get('err_y'))} | {fmt(r.get('err_q'))} | "
                         f"{fmt(r.get('err_k'))} | {fmt(r.get('err_v'))} | {fmt(r.get('err_log_lam'))} | "
                         f"{fmt(r.get('err_nu_raw', r.get('err_mix')))} |")
    return "\n".join(lines)


def first_configs_only() -> None:
    """--quick: one autotune config per kernel (compile time, not speed, is what --quick checks)."""
    from model import triton_attention as ta
    for kern in (ta._fwd, ta._bwd_dq, ta._bwd_dkdv):
        kern.configs = kern.configs[:1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["8,12,1024,64", "4,12,4096,64"])
    ap.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    ap.add_argument("--quick", action="store_true", help="one small GQA shape, triton + reference, in one process")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    if args.case:  # one kernel, every shape and path, in its own process
        for row in bench_kernel(args.case, args.shapes, args.impls):
            print("RESULT " + json.dumps(row), flush=True)
        return
    import triton
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    ceil = ceilings()
    rows = []
    if args.quick:
        first_configs_only()
        shapes = args.shapes if args.shapes != ap.get_default("shapes") else QUICK_SHAPES
        for kernel in args.kernels:
            start = time.perf_counter()
            impls = args.impls if args.impls != IMPLS else ["legacy"] * (kernel == "dot") + ["triton", "reference"]
            for r in bench_kernel(kernel, shapes, impls):
                rows.append(r)
                print(json.dumps(r), flush=True)
            print(f"{kernel}: {time.perf_counter() - start:.0f} s", flush=True)
    else:
        for kernel in args.kernels:
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--case", kernel, "--shapes", *args.shapes, "--impls", *args.impls]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            got = [json.loads(x[len("RESULT "):]) for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            for r in got:
                print(json.dumps(r), flush=True)
            rows += got
            done = {(tuple(r["shape"]), r["impl"]) for r in got}
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{kernel}: FAILED (exit {proc.returncode}): {err}", flush=True)
                rows += [dict(kernel=kernel, impl=i, path=i, shape=list(parse_shape(s)), error=err)
                         for s in args.shapes for i in paths(kernel, args.impls) if (parse_shape(s), i) not in done]
            print(f"{kernel}: {time.perf_counter() - start:.0f} s", flush=True)
    print()
    print(table(rows, ceil, device))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_attention.json").write_text(json.dumps({"device": device, "ceilings": ceil, "rows": rows},
                                                                  indent=1))


if __name__ == "__main__":
    main()
