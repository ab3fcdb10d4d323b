"""The training losses and step times on their way from the device to the logs.

The loop never waits for the device at a plain log step: the losses of a log
interval (and the last step's 0-d diagnostics) are copied to host memory
asynchronously and read back - checked for NaN/inf, timed, logged - at the next
log step, when the device is long past them, so a NaN is reported up to
2*log_every-1 steps after it happened, still naming the step it happened at.
Eval, checkpoint and stop steps read every interval back first (`drain(wait_all=
True)`): no checkpoint follows an unchecked loss. Step times come from marks on
the device's timeline (runtime.mark), eval and checkpoint time left out; a
session's first interval (compilation, warm-up) is not timed.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.utils import mfu
from stages.pretrain.runtime import mark, seconds


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf."""


@dataclass
class Interval:
    """One log interval's numbers on their way from the device."""

    step: int
    steps: list[int]
    """The optimizer steps whose losses `values` starts with."""
    values: torch.Tensor
    """Host copy (page-locked on CUDA, filled asynchronously): the losses of `steps`, then
    the diagnostics named by `keys`; complete once the device has reached `end`."""
    keys: list[str]
    lr: float
    tokens: int
    start: torch.cuda.Event | float
    end: torch.cuda.Event | float
    """The interval's marks: `end` is recorded after the copy of `values`."""
    timed: bool
    """False for a session's first interval (compilation and warm-up)."""


class LossLog:
    """Collects each step's loss (a device tensor), closes an interval at every log step,
    reads intervals back a log step later (see the module docstring)."""

    def __init__(self, run: str, device: torch.device, step_tokens: int, flops_per_token: float,
                 peak_flops: float, tracker: Any, bar: Any = None):
        self.run, self.device, self.step_tokens = run, device, step_tokens
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.tracker, self.bar = tracker, bar  # the null tracker and no bar on ranks > 0
        self.pending: list[tuple[int, torch.Tensor]] = []
        self.intervals: collections.deque[Interval] = collections.deque()
        self.timed_s, self.timed_steps = 0.0, 0
        self.start, self.end, self.first = mark(device), None, True
        self.train_loss: float | None = None  # mean loss of the latest interval read back

    def add(self, step: int, loss: torch.Tensor) -> None:
        self.pending.append((step, loss.detach()))

    def close_interval(self, step: int, diag: dict[str, torch.Tensor], lr: float, tokens: int) -> None:
        """Start the asynchronous copy of the interval's losses and 0-d diagnostics."""
        scalars = {k: v for k, v in diag.items() if torch.is_tensor(v) and v.dim() == 0}
        values = torch.stack([l for _, l in self.pending] + [v.float() for v in scalars.values()])
        values = values.to("cpu", non_blocking=True)  # pinned destination on CUDA
        self.end = mark(self.device)
        self.intervals.append(Interval(step, [s for s, _ in self.pending], values, list(scalars), lr,
                                       tokens, self.start, self.end, timed=not self.first))
        self.first = False
        self.pending.clear()

    def restart(self, paused: bool) -> None:
        """The next interval starts now (after an eval or checkpoint: their time stays out)."""
        self.start = mark(self.device) if paused else self.end

    def drain(self, wait_all: bool, last: dict[str, Any], now: int, last_ckpt: Path | None) -> None:
        """Read back every interval but the newest (all with `wait_all`), updating `last` with
        their metrics and `train_loss`. `now` and `last_ckpt` go into a NaN's message."""
        while self.intervals and (wait_all or len(self.intervals) > 1):
            self.train_loss = self._read(self.intervals.popleft(), last, now, last_ckpt)

    @property
    def step_s(self) -> float | None:
        """Mean seconds per step over the timed intervals."""
        return self.timed_s / self.timed_steps if self.timed_steps else None

    def _read(self, r: Interval, last: dict[str, Any], now: int, last_ckpt: Path | None) -> float:
        dt = seconds(r.start, r.end)  # waits for r.end: r.values is complete
        n = len(r.steps)
        losses = r.values[:n]
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLoss(f"pretrain@{self.run}: loss is {losses[i].item()} at step {r.steps[i]} "
                                f"(read back at step {now}); stopped, nothing written. "
                                f"Last good checkpoint: {last_ckpt or 'none'} (resume from it "
                                "with train.resume: auto after lowering train.lr or raising warmup)")
        train_loss = losses.mean().item()
        if r.timed:
            self.timed_s += dt
            self.timed_steps += n
        tok_s = self.step_tokens / (dt / max(n, 1))
        metrics = {"train/loss": train_loss, "lr": r.lr, "perf/step_ms": dt / max(n, 1) * 1e3,
                   "perf/tok_per_s": tok_s, "perf/mfu_pct": self.mfu_pct(tok_s), "tokens": r.tokens}
        last.update(metrics)
        self.tracker.log_metrics({**metrics, **dict(zip(r.keys, r.values[n:].tolist()))}, step=r.step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        return train_loss

    def mfu_pct(self, tok_s: float) -> float:
        return 100 * mfu(tok_s, self.flops_per_token, self.peak_flops) if self.peak_flops else 0.0
