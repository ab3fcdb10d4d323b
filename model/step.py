"""One optimizer step as one callable: micro-steps, gradient averaging, clipping, the optimizer.

    step = TrainStep(model, optimizer, accum=2, grad_clip=1.0, capture=True)
    loss, grad_norm, diag = step(x, y, lr)      # x, y: (accum, B, T) token ids on the device

A training loop calls only this (the Trainer in stages/pretrain does). Each call
is exactly one optimizer step: for each micro-batch `model.training_step` (bp or
any PC algorithm; ipc's inner steps included) adds grad/accum to `.grad`; under
DDP the gradients and the loss are averaged over ranks in one flat all-reduce;
the global gradient norm is clipped; the optimizer steps; nothing waits for the
host.

`capture=True` (CUDA only) records the whole step in one CUDA graph after three
eager warm-up steps (they are real steps: optimizer state, cuBLAS/NCCL handles
and the compiled kernels come into being there) and then replays it. A small
model's step is a few thousand kernel launches: replayed, they cost the host
one launch, so the step is bound by the GPU rather than by Python (issue 10
measured the eager bp step at the char config host-bound: enqueue time = wall
time). What capture requires, the model provides: static shapes, no host
synchronisation (no `.item()`, PC's `tol` = 0), device-resident diagnostics.
The optimizer's learning rate becomes a device tensor (AdamW with
`capturable=True`), written before each replay.

The returned tensors belong to the step: a replay overwrites them, so keep a
copy (`.clone()`, or a copy to the host) of anything needed after the next call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class TrainStep:
    def __init__(self, model: torch.nn.Module, optimizer, *, accum: int = 1, grad_clip: float = 0.0,
                 label_smoothing: float = 0.0, capture: bool = False, warmup: int = 3):
        if accum < 1:
            raise ValueError(f"accum={accum}: must be >= 1")
        self.model, self.optimizer, self.accum = model, optimizer, accum
        self.grad_clip, self.label_smoothing = grad_clip, label_smoothing
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.capture = capture
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        if capture:
            device = self.params[0].device
            if device.type != "cuda":
                raise ValueError("TrainStep(capture=True) needs the model on a CUDA device")
            if model.config.pc.tol > 0:
                raise ValueError("pc.tol > 0 stops settling on a host check of the residual: "
                                 "not capturable in a CUDA graph (set pc.tol: 0 or capture off)")
            self.lr = torch.zeros((), device=device)
            for opt in getattr(optimizer, "optimizers", [optimizer]):
                if not isinstance(opt, torch.optim.AdamW):
                    raise ValueError(f"capture=True steps AdamW only (got {type(opt).__name__}): "
                                     "use train.optimizer adamw, or capture off")
                for group in opt.param_groups:
                    group["capturable"] = True
                    group["lr"] = self.lr  # one device scalar, written before each replay

    # -- the step itself ---------------------------------------------------------------------
    def _step(self, x: torch.Tensor, y: torch.Tensor):
        loss = None
        diag: dict[str, torch.Tensor] = {}
        for i in range(self.accum):
            l, diag = self.model.training_step(x[i], y[i], grad_scale=1.0 / self.accum,
                                               label_smoothing=self.label_smoothing, optimizer=self.optimizer)
            loss = l.float() if loss is None else loss + l.float()
        loss = loss / self.accum
        if self.world > 1:
            loss = self._all_reduce(loss)
        norm = (torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip) if self.grad_clip > 0
                else torch.zeros((), device=loss.device))
        self.optimizer.step()
        return loss, norm, diag

    def _all_reduce(self, loss: torch.Tensor) -> torch.Tensor:
        """Average grads and the loss over ranks in one flat all-reduce, in place (the gradient
        tensors keep their storage: a captured optimizer step reads them there)."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1)])
        dist.all_reduce(flat)
        flat /= self.world
        torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat[:-1].split([g.numel() for g in grads]),
                                                                   grads)])
        return flat[-1]

    # -- calling -----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor, lr: float):
        """One optimizer step on micro-batches x, y (accum, B, T) at learning rate `lr`.
        Returns (mean loss, gradient norm before clipping, the last micro-step's diagnostics)."""
        if x.shape[0] != self.accum or y.shape != x.shape:
            raise ValueError(f"x, y: expected ({self.accum}, B, T) each, got {tuple(x.shape)}, {tuple(y.shape)}")
        self.calls += 1
        if not self.capture:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            out = self._step(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            return out
        self.lr.fill_(lr)  # every group of a captured AdamW has lr_scale 1 (make_optimizer)
        if self.graph is None and self.calls <= self.warmup:
            # eager warm-up on a side stream, as torch.cuda.graphs asks: handles, optimizer
            # state and compiled kernels are created here, outside any capture
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                out = self._step(x, y)
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(stream)
            return out
        if self.graph is None:
            self._x, self._y = x.clone(), y.clone()
            self.graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)  # captured: the first micro-step writes fresh grads
            with torch.cuda.graph(self.graph):
                self._out = self._step(self._x, self._y)
        else:
            self._x.copy_(x, non_blocking=True)
            self._y.copy_(y, non_blocking=True)
        self.graph.replay()
        return self._out
