"""Host time of one eager Triton-attention forward + backward, on a machine without a GPU: what
the GPU waits for outside CUDA graphs at short lengths.

Run: python tests/bench/attention_host.py [--kernels gaussian student_t] [--calls 2000]

Times `attention(..., impl="triton")` and `torch.autograd.grad` on tiny CPU tensors, through
model.attention, model/triton_attention.py, torch's autograd and triton's own launch path
(autotuner, argument binding, kernel-cache lookup), with the kernels compiled for sm_90
(a stand-in driver, as triton_resources.py) and only the final driver launch replaced by a
no-op. The autotuner's choice is stubbed (the first config; nothing is benchmarked). Not seen:
the driver's launch itself (a few µs per kernel, unchanged by the wrapper) and the GPU. Also
counts the device work of one call: Triton launches and the torch ops that run a kernel
(views and allocations excluded). The first call per kernel compiles (tens of seconds).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from triton_resources import Sm90Driver  # noqa: E402

KERNELS = ["gaussian", "student_t", "laplace", "mixture"]
NO_KERNEL = {"alias", "detach", "view", "transpose", "expand", "slice", "select", "unsqueeze", "squeeze", "t",
             "as_strided", "empty", "empty_like", "new_empty", "flash_attention_fwd", "flash_attention_bwd"}
"""Ops that run no device kernel: views, allocations, and the custom ops (their Triton launches
are counted as such)."""


class NoLaunch(Sm90Driver):
    """The sm_90 stand-in driver, with a launcher that does nothing and a loaded-binary stub."""

    class utils:  # noqa: N801 (the attribute name triton's driver interface uses)
        @staticmethod
        def load_binary(name, kernel, shared, device):
            return name, name, 0, 0, 1024  # module, function (any non-None), registers, spills, max threads

        @staticmethod
        def get_device_properties(device):
            return {"max_shared_mem": 232448}  # sm_90

    def __init__(self):
        self.launches = Counter()

    def launcher_cls(self, src, metadata):
        def launch(*args):
            self.launches[metadata.name] += 1
        return launch


class DeviceOps(TorchDispatchMode):
    """Counts the torch ops that run a device kernel."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def step(kernel: str, t: dict, dy: torch.Tensor):
    """One forward + backward over q, k, v and the kernel's parameters (`head` λ)."""
    from model.attention import KernelParams, attention
    nu = F.softplus(t["nu_raw"]) if kernel == "student_t" else None
    log_mix = t["mix"].log_softmax(-1) if kernel == "mixture" else None
    y = attention(t["q"], t["k"], t["v"], KernelParams(kernel, t["log_lam"].exp(), nu, log_mix, 1e-6), impl="triton")
    wrt = ["q", "k", "v", "log_lam"] + {"student_t": ["nu_raw"], "mixture": ["mix"]}.get(kernel, [])
    return torch.autograd.grad(y, [t[n] for n in wrt], dy)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernels", nargs="+", default=KERNELS, choices=KERNELS)
    ap.add_argument("--calls", type=int, default=2000, help="calls per timing (best of 5 timings)")
    args = ap.parse_args(argv)
    stand_in = NoLaunch()
    driver.set_active(stand_in)
    Autotuner._bench = lambda self, *a, config, **kw: [float(self.configs.index(config))]
    torch.set_num_threads(1)  # tiny tensors: the intra-op thread pool's wake-ups would dominate
    B, H, T, D = 1, 2, 16, 64
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_(True)

    dy = torch.randn(B, H, T, D, generator=g).bfloat16()
    for kernel in args.kernels:
        C = 2 if kernel == "mixture" else 1
        t = dict(q=leaf(B, H, T, D), k=leaf(B, H, T, D), v=leaf(B, H, T, D),
                 log_lam=leaf(1, H, 1, C, dtype=torch.float32), nu_raw=leaf(H, dtype=torch.float32),
                 mix=leaf(H, C, dtype=torch.float32))
        start = time.perf_counter()
        step(kernel, t, dy)  # compiles
        print(f"{kernel}: compiled in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        for _ in range(100):
            step(kernel, t, dy)
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(args.calls):
                step(kernel, t, dy)
            best = min(best, (time.perf_counter() - start) / args.calls)
        stand_in.launches.clear()
        with DeviceOps() as counted:
            step(kernel, t, dy)
        ops = ", ".join(f"{n}×{m}" for n, m in sorted(counted.ops.items()))
        print(f"{kernel:10s} fwd+bwd host {best * 1e6:6.1f} µs; triton launches {sum(stand_in.launches.values())}, "
              f"torch ops with a kernel {sum(counted.ops.values())} ({ops})", flush=True)


if __name__ == "__main__":
    main()
