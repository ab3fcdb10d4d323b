"""Forward+backward time of each attention kernel vs SDPA dot, on one CUDA GPU (BENCHMARKS.md).

Run: python tests/bench/bench_attention.py [--shapes 8,12,1024,64 4,12,4096,64]
     [--kernels dot student_t laplace] [--out DIR]

For each (B, H, L, D) in bf16, causal, MHA, `head` precision (learned λ per head,
so its gradient is computed too): the median time of forward + backward over
q, k, v and the kernel parameters, by triton.testing.do_bench (CUDA events;
warm-up runs first, so torch.compile of the FlexAttention path is excluded).
Correctness: ‖y − y_ref‖/‖y_ref‖ and the same for dq, against the exact
reference (model.attention.reference_attention) in fp32 on the same
(bf16-rounded) inputs, also for dλ (the learned log-precision's gradient; dot
here is the plain 1/√D baseline, so n/a) and dν (student_t). Each case runs in
its own process; `--kernels` picks the cases (keep `dot` for the × dot column).
Prints a Markdown table; with --out also writes bench_attention.json there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from model.attention import KernelParams, attention  # noqa: E402

KERNELS = ["dot", "gaussian", "student_t", "laplace", "mixture"]
N_COMPONENTS = 2


def make_inputs(kernel: str, B: int, H: int, L: int, D: int, dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    C = N_COMPONENTS if kernel == "mixture" else 1

    def rnd(*shape, scale=1.0, shift=0.0, dt=dtype):
        return (torch.randn(*shape, generator=g, device="cuda") * scale + shift).to(dt).requires_grad_(True)

    return dict(q=rnd(B, H, L, D), k=rnd(B, H, L, D), v=rnd(B, H, L, D),
                log_lam=rnd(1, H, 1, C, scale=0.1, shift=-0.5 * torch.log(torch.tensor(float(D))).item(),
                            dt=torch.float32),
                nu_raw=rnd(H, shift=4.0, dt=torch.float32), mix=rnd(H, C, scale=0.1, dt=torch.float32))


def params(kernel: str, t: dict) -> KernelParams:
    if kernel == "dot":  # the baseline: plain SDPA, scale 1/√D
        scale = t["q"].shape[-1] ** -0.5
        return KernelParams("dot", torch.full((1, 1, 1, 1), scale, device="cuda"), fixed_scale=scale)
    nu = F.softplus(t["nu_raw"]) if kernel == "student_t" else None
    log_mix = t["mix"].log_softmax(-1) if kernel == "mixture" else None
    return KernelParams(kernel, t["log_lam"].exp(), nu, log_mix, 1e-6)


def fwd_bwd(kernel: str, t: dict, dy: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    y = attention(t["q"], t["k"], t["v"], params(kernel, t), impl=impl)
    y.backward(dy)
    return y


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bench(kernel: str, shape: tuple[int, int, int, int]) -> dict:
    from triton.testing import do_bench
    B, H, L, D = shape
    t = make_inputs(kernel, B, H, L, D, torch.bfloat16)
    dy = torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16)
    leaves = list(t.values())

    def step():
        for x in leaves:
            x.grad = None
        fwd_bwd(kernel, t, dy)

    step()  # compile / autotune outside the timing
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = do_bench(step, warmup=100, rep=500, return_mode="median")
    peak = torch.cuda.max_memory_allocated() / 2**20
    # correctness on the same bf16 inputs, reference in fp32
    step()
    y = attention(t["q"], t["k"], t["v"], params(kernel, t)).detach()
    dq = t["q"].grad.detach().clone()
    dlam = t["log_lam"].grad.detach().clone() if t["log_lam"].grad is not None else None
    dnu = t["nu_raw"].grad.detach().clone() if t["nu_raw"].grad is not None else None
    t32 = {n: x.detach().float().requires_grad_(True) for n, x in t.items()}
    err_y = err_dq = err_dlam = err_dnu = float("nan")
    try:
        y_ref = fwd_bwd(kernel, t32, dy.float(), impl="reference")
        err_y, err_dq = rel(y, y_ref), rel(dq, t32["q"].grad)
        if dlam is not None:
            err_dlam = rel(dlam, t32["log_lam"].grad)
        if dnu is not None:
            err_dnu = rel(dnu, t32["nu_raw"].grad)
    except torch.OutOfMemoryError:
        pass
    return dict(kernel=kernel, shape=list(shape), ms=ms, peak_mib=peak, rel_err_y=err_y,
                rel_err_dq=err_dq, rel_err_dlam=err_dlam, rel_err_dnu=err_dnu)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["8,12,1024,64", "4,12,4096,64"])
    ap.add_argument("--kernels", nargs="+", default=KERNELS)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--case", nargs=2, metavar=("KERNEL", "SHAPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU")
    if args.case:  # one measurement, in its own process (a fault cannot take the others down)
        shape = tuple(int(x) for x in args.case[1].split(","))
        print("RESULT " + json.dumps(bench(args.case[0], shape)))
        return
    import triton
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    rows = []
    for s in args.shapes:
        for kernel in args.kernels:
            proc = subprocess.run([sys.executable, __file__, "--case", kernel, s], capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                print(f"{kernel} {s}: FAILED: {err}", flush=True)
                rows.append(dict(kernel=kernel, shape=[int(x) for x in s.split(",")], error=err))
                continue
            rows.append(json.loads(line[len("RESULT "):]))
            print(json.dumps(rows[-1]), flush=True)
    base = {tuple(r["shape"]): r["ms"] for r in rows if r["kernel"] == "dot" and "ms" in r}
    print(f"\nDevice: {device}\n")
    print("| (B,H,L,D) | kernel | path | fwd+bwd ms | × dot | peak MiB | rel err y | rel err dq | rel err dλ "
          "| rel err dν |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    path = {"dot": "SDPA (flash)", "gaussian": "SDPA, augmented q/k",
            "student_t": "FlexAttention + score_mod", "laplace": "FlexAttention + score_mod",
            "mixture": f"SDPA over {N_COMPONENTS}×keys"}
    for r in rows:
        shape = tuple(r["shape"])
        name = path[r["kernel"]]
        if "ms" not in r:
            print(f"| {shape} | {r['kernel']} | {name} | failed: {r['error'][:60]} | | | | | | |")
            continue
        ratio = r["ms"] / base[shape] if shape in base else float("nan")
        print(f"| {shape} | {r['kernel']} | {name} | {r['ms']:.3f} | {ratio:.2f} | {r['peak_mib']:.0f} | "
              f"{r['rel_err_y']:.1e} | {r['rel_err_dq']:.1e} | {r['rel_err_dlam']:.1e} | {r['rel_err_dnu']:.1e} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_attention.json").write_text(json.dumps({"device": device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
