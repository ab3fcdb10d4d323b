"""Registers, spills and shared memory of every Triton attention kernel and autotune config,
compiled for sm_90 (H100/H200) on a machine without a GPU: what costs no device time.

Run: python tests/bench/triton_resources.py [--kernels student_t mixture] [--sass]

Compiles through triton's own pipeline with a stand-in driver that reports an sm_90 target
(nothing is launched), then reads the cubin's resource usage with the cuobjdump that ships
in the triton wheel. `stack` > 0 means spills to local memory; `--sass` also counts the
special-function (MUFU) and tensor-core (HGMMA) instructions of each kernel.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


class Sm90Driver:
    """Just enough of a triton driver to compile (JITFunction.warmup) for sm_90."""

    def is_active(self):
        return True

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def resources(compiled, sass: bool) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        Path(path).write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([CUOBJDUMP, "-res-usage", path], capture_output=True, text=True).stdout
        text = ""
        if sass:
            code = subprocess.run([CUOBJDUMP, "-sass", path], capture_output=True, text=True).stdout
            text = f" MUFU={len(re.findall(r'MUFU', code))} HGMMA={len(re.findall(r'HGMMA', code))}"
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return (f"regs={regs.group(1) if regs else '?'} stack={stack.group(1) if stack else '?'} "
            f"smem={compiled.metadata.shared}{text}")


def main(argv=None) -> None:
    driver.set_active(Sm90Driver())
    from model import triton_attention as ta

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="+", default=list(ta.KERNELS), choices=list(ta.KERNELS))
    ap.add_argument("--group", type=int, default=1, help="query heads per kv head (GQA)")
    ap.add_argument("--sass", action="store_true")
    args = ap.parse_args(argv)
    B, H, T, D = 1, 4, 1024, 64
    Hkv = H // args.group
    f32 = dict(dtype=torch.float32)
    for kernel in args.kernels:
        C = 2 if kernel == "mixture" else 1
        q = torch.empty(B, H, T, D, dtype=torch.bfloat16)
        k, v = torch.empty(B, Hkv, T, D, dtype=torch.bfloat16), torch.empty(B, Hkv, T, D, dtype=torch.bfloat16)
        o = ta._new_output(q)
        rows, kn = torch.empty(B, H, T, **f32), torch.empty(B, Hkv, T, **f32)
        p, d = torch.empty(1, H, 1, C, **f32), torch.empty(B, H, T, C, **f32)
        ps = ta._param_strides(p, p)
        st = ta._strides
        common = [H, H // Hkv, T, 1e-6]
        launches = {
            "fwd": (ta._fwd, [q, k, v, o, rows, rows, kn, p, p, *st(q, k, v, o), *ps, *common]),
            "dq": (ta._bwd_dq, [q, k, v, o, o, q, rows, kn, rows, p, p, d, d, *st(q, k, v, o, o, q), *ps, *common]),
            "dkdv": (ta._bwd_dkdv, [q, k, v, o, k, v, rows, rows, rows, p, p, *st(q, k, v, o, k, v), *ps, *common]),
        }
        for settle in (False, True) if kernel == "laplace" else (False,):
            meta = ta._meta(kernel, settle, C, D, T % ta._ALIGN == 0, q.dtype)
            for name, (autotuned, launch) in launches.items():
                for cfg in autotuned.configs:
                    label = (f"{kernel}{' settle' if settle else ''} {name} BLOCK_M={cfg.kwargs['BLOCK_M']} "
                             f"BLOCK_N={cfg.kwargs['BLOCK_N']} warps={cfg.num_warps} stages={cfg.num_stages}")
                    compiled = autotuned.fn.warmup(*launch, grid=(1,), **meta, **cfg.all_kwargs())
                    print(f"{label}: {resources(compiled, args.sass)}", flush=True)


if __name__ == "__main__":
    main()
