"""Where and how a training process runs: device and DDP placement, seeding and RNG
states, timing on the device's timeline, the hand-written DDP collectives and the
SIGTERM/SIGINT flag. Nothing here knows about models or metrics.
"""

from __future__ import annotations

import os
import random
import resource
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model.utils import PEAK_FLOPS
from pipeline.params import ParamsError
from stages.pretrain.config import TrainConfig


@dataclass
class Runtime:
    """Process placement: rank, world size and device (DDP when launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(train: TrainConfig) -> Runtime:
    """Pick the device; join the process group when torchrun set WORLD_SIZE > 1
    (nccl on CUDA, gloo on CPU). Sets threads, TF32 and determinism."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    name = train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ParamsError(f"train.device: {train.device!r} but CUDA is not available")
    # a bare "cuda" means this process's GPU: the local rank's (0 without torchrun)
    device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for the fp32 matmuls outside autocast
        torch.backends.cudnn.allow_tf32 = True
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    # Flush denormals to zero, before set_num_threads creates the worker threads (they
    # inherit the flag; threads made earlier do not): on this x86 CPU, subnormal floats
    # in the backward made CPU steps up to 30x slower. Values below ~1e-38 do not
    # matter to training; CUDA kernels are unaffected.
    torch.set_flush_denormal(True)
    threads = train.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    if train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return Runtime(rank, world, local_rank, device)


def seed_of(*ints: int) -> int:
    """A 63-bit seed that is a pure function of the integers (e.g. seed, step, rank)."""
    return int(np.random.SeedSequence(list(ints)).generate_state(1, dtype=np.uint64)[0] >> 1)


def seed_step(seed: int, device: torch.device) -> None:
    """`torch.manual_seed(seed)` for the generators this process draws from: the CPU's and
    its own GPU's (the same states). torch.manual_seed also seeds every other device and,
    while CUDA is not initialised (CPU runs), records a stack trace for a deferred CUDA
    seeding: about 0.1 ms of host time, paid every step."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index].manual_seed(seed)


def rng_states() -> dict[str, Any]:
    """Every RNG state this process has (what a checkpoint restores)."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def peak_flops(device: torch.device) -> float:
    """Dense bf16 peak FLOP/s of one device (model/utils.py PEAK_FLOPS); 0 where unknown:
    CPUs (no peak is meaningful across hosts) and unlisted GPUs, whose MFU is then 0."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device).lower()
    return next((v for k, v in PEAK_FLOPS.items() if k in name), 0.0)


def peak_memory_gib(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def mark(device: torch.device) -> torch.cuda.Event | float:
    """A point on the device's timeline: a timing event on the current CUDA stream (the
    host does not wait for it), or the host clock on CPU, where every op is done when it
    returns."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def seconds(start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
    """Seconds between two marks; waits until the device has reached `end`."""
    if isinstance(end, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


# --------------------------------------------------------------------------- DDP

def broadcast_model(model: torch.nn.Module, rt: Runtime) -> None:
    """Every rank starts from rank 0's weights (fresh or resumed)."""
    if rt.world > 1:
        for p in model.state_dict().values():
            dist.broadcast(p, 0)


def any_rank(flag: bool, rt: Runtime) -> bool:
    """True on every rank if `flag` is true on any."""
    if rt.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=rt.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


# --------------------------------------------------------------------------- signals

class StopSignals:
    """SIGTERM/SIGINT set `signum` (the loop stops at its next log step, checkpointed); a
    second one stops at once. Handlers are restored on exit."""

    def __init__(self) -> None:
        self.signum = 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if self.signum:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __enter__(self) -> StopSignals:
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
