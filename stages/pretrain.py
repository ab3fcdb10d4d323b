"""Stage `pretrain@<run>`: train one named model config on the token shards.

Reads:  data/tokens/{train,val}.bin + meta.json, data/tokenizer/ (paths from the
        `tokenizer` section); params.yaml `seed`, `model`, `pc`, `train`, and
        `runs.<run>` (an override of model/pc/train, deep-merged over them); every
        run and the `tokenizer` and `tracking` sections are checked before any work.
Writes: models/<run>/model.safetensors + meta.json (model config, stage config,
        step, tokens seen, git commit, tokenizer sha256)
        metrics/pretrain/<run>.json              headline metrics (a DVC metric)
        metrics/pretrain/<run>_details.json      the rest: diagnostics, device, ... (pipeline/metrics.py)
        metrics/pretrain/<run>_curve.tsv         one row per evaluation (`dvc plots`)
        metrics/pretrain/<run>_samples.json      seeded samples from fixed prompts
        metrics/pretrain/<run>_attention.json    one head's attention on a val window
        checkpoints/<run>/                       resumable state (scratch, not a DVC out)
        an MLflow stage run (pipeline/tracking.py) with the final model registered
        as `<tracking.registered_model>-<run>` (alias `tracking.model_alias`).
Run:    python -m stages.pretrain baseline          (or `dvc repro pretrain@baseline`)
        torchrun --nproc_per_node=N -m stages.pretrain baseline   (DDP)

The core is `train(cfg, run, paths, tracker)`, importable so that the `ablate`
stage reuses this loop with a modified config and a short schedule.

The loop (per optimizer step `s`):
  lr(s) -> for each micro-step: seeded batch, `GPT.training_step` (the one entry
  point for bp and every PC algorithm; the loop never branches on the algorithm)
  -> all-reduce grads (DDP) -> clip -> optimizer step -> log / eval / checkpoint.
Everything random is a pure function of (seed, step, micro-step, rank): the
batch sampler and the torch RNG (dropout) are re-seeded each step, so resuming
needs only the step; RNG states are still saved and restored.

Exact resume: with `train.resume: auto` a run continues from the newest intact
checkpoint written by the same config (model, optimizer, step, tokens, best val,
curve, RNG states). A run SIGKILLed at any point and resumed ends with weights
bit-identical to an uninterrupted run (on CPU; tests/stages/test_pretrain.py).
SIGTERM/SIGINT save a checkpoint, then exit with 128+signal.

A NaN/inf loss stops the run (exit 3) naming the step and the last good
checkpoint; nothing is written. The loop never waits for the device at a plain
log step: each log step's losses are copied to host memory asynchronously and
checked (and logged) at the next log step, so a NaN is reported up to
2*log_every-1 steps after it happened, still naming the step it happened at.
Eval, checkpoint and stop steps, and the last step, check every loss first: no
checkpoint is ever written after a bad loss. perf/step_ms comes from CUDA events
on the device's timeline (the host clock on CPU), eval and checkpoint time left
out. Test-only: env var PCGPT_DEBUG_NAN_AT_STEP=<s>
poisons one weight so that the loss of step s (1-based, as in the logs) is NaN.

DDP: gradients are all-reduced by hand in one flat buffer after the micro-steps
(with the loss, so every rank agrees on a NaN); a SIGTERM/SIGINT flag is
all-reduced at log steps, so every rank stops at the same step.
DDP's module wrapper is not used because the loop calls `training_step`, not
`forward`, and the PC algorithms run several forwards per step.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from model.gpt import GPT
from model.pc import build_model
from model.utils import PEAK_FLOPS, flops_per_token, make_optimizer, mfu
from pipeline.io import atomic_path, write_json, write_text
from pipeline.metrics import CURVE_COLUMNS, details_path, is_number, write_run_metrics
from pipeline.params import ParamsError, check_seed, fail, load_section, read_params, to_dict, validate
from stages import pretrain_ckpt as ckpt
from stages.pretrain_config import PretrainConfig, TrainConfig, config_hash, load_config
from stages.pretrain_data import load_shards, train_batch, unigram_bpb, val_batches

ENV_DEBUG_NAN = "PCGPT_DEBUG_NAN_AT_STEP"
EXIT_NONFINITE = 3
PYFUNC_CODE = Path(__file__).with_name("pretrain_pyfunc.py")  # the logged model's code


# --------------------------------------------------------------------------- paths

@dataclass
class RunPaths:
    """Every file a run reads or writes (the one place paths are derived)."""

    tokens_dir: Path
    tokenizer_dir: Path
    model_dir: Path
    metrics: Path
    curve: Path
    samples: Path
    attention: Path
    checkpoints: Path

    @classmethod
    def for_run(cls, run: str, train: TrainConfig, tokens_dir: str | Path,
                tokenizer_dir: str | Path) -> RunPaths:
        m = Path(train.metrics_dir)
        return cls(Path(tokens_dir), Path(tokenizer_dir), Path(train.models_dir) / run,
                   m / f"{run}.json", m / f"{run}_curve.tsv", m / f"{run}_samples.json",
                   m / f"{run}_attention.json", Path(train.checkpoints_dir) / run)


# --------------------------------------------------------------------------- runtime

class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf."""


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint: {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


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


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine or linear decay to lr*min_lr_frac."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if t.decay == "cosine" else 1 - progress
    return t.lr * (t.min_lr_frac + (1 - t.min_lr_frac) * shape)


def _seed_of(*ints: int) -> int:
    return int(np.random.SeedSequence(list(ints)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _seed_torch(seed: int, device: torch.device) -> None:
    """`torch.manual_seed(seed)` for the generators this process draws from: the CPU's and
    its own GPU's (the same states). torch.manual_seed also seeds every other device and,
    while CUDA is not initialised (CPU runs), records a stack trace for a deferred CUDA
    seeding: about 0.1 ms of host time, paid every step."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index].manual_seed(seed)


def rng_states() -> dict[str, Any]:
    import random
    states = {"python": random.getstate(), "numpy": np.random.get_state(),
              "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import random
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


def _mark(device: torch.device) -> torch.cuda.Event | float:
    """A point on the device's timeline: a timing event on the current CUDA stream (the
    host does not wait for it), or the host clock on CPU, where every op is done when it
    returns."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _seconds(start: torch.cuda.Event | float, end: torch.cuda.Event | float) -> float:
    """Seconds between two marks; waits until the device has reached `end`."""
    if isinstance(end, float):
        return end - start
    end.synchronize()
    return start.elapsed_time(end) / 1e3


@dataclass
class _LogRecord:
    """One log step's numbers on their way from the device (see train()'s loop)."""

    step: int
    steps: list[int]
    """The optimizer steps whose losses `values` starts with (the log interval)."""
    values: torch.Tensor
    """Host copy (page-locked on CUDA, filled asynchronously): the losses of `steps`, then
    the diagnostics named by `keys`; complete once the device has reached `end`."""
    keys: list[str]
    lr: float
    tokens: int
    start: torch.cuda.Event | float
    end: torch.cuda.Event | float
    """The interval's marks (_mark): `end` is recorded after the copy of `values`."""
    timed: bool
    """False for a session's first interval (compilation and warm-up)."""


# --------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model: GPT, batches, rt: Runtime, autocast, bytes_per_token: float) -> dict[str, float]:
    """val/loss, val/ppl, val/bpb, val/acc over the fixed val batches (summed over ranks)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=rt.device)  # loss*n, correct, n
    for x, y in batches:
        x, y = x.to(rt.device), y.to(rt.device)
        with autocast:
            logits, loss = model(x, y)
        n = y.numel()
        sums += torch.tensor([loss.item() * n, (logits.argmax(-1) == y).sum().item(), n],
                             dtype=torch.float64, device=rt.device)
    if rt.world > 1:
        dist.all_reduce(sums)
    model.train()
    loss = (sums[0] / sums[2]).item()
    return {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)),
            "val/bpb": loss / math.log(2) / bytes_per_token, "val/acc": (sums[1] / sums[2]).item()}


@torch.no_grad()
def attention_map(model: GPT, x: torch.Tensor, layer: int = 0, head: int = 0) -> list[list[float]]:
    """Attention probabilities (query rows) of one head on one window, for any kernel.

    Captures the arguments of the attention call of block `layer` (model/attention.py's
    `attention(q, k, v, params, mask=...)`) and calls it again with v = identity:
    the output Σ_j p_ij v_j is then exactly the probability row p_i.
    """
    attention_module = importlib.import_module("model.attention")  # the package re-exports
    original = attention_module.attention
    calls: list[tuple] = []

    def spy(q, k, v, p, **kw):
        if not kw.get("settle"):
            calls.append((q, k, p, kw))
        return original(q, k, v, p, **kw)

    was_training = model.training
    model.eval()
    attention_module.attention = spy
    try:
        model(x)
    finally:
        attention_module.attention = original
        model.train(was_training)
    q, k, p, kw = calls[layer]
    S = k.shape[-2]
    eye = torch.eye(S, dtype=q.dtype, device=q.device).expand(k.shape[0], k.shape[1], S, S)
    probs = original(q, k, eye.contiguous(), p, **{**kw, "impl": "reference"})  # (B, H, T, S), exact
    return probs[0, head].float().tolist()


def generate_samples(model: GPT, tokenizer, t: TrainConfig, seed: int, device) -> list[dict[str, str]]:
    """Completions of the fixed prompts, sampled with a seeded generator (same seed, same text)."""
    from model.generate import generate

    prompts = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in t.sample_prompts]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, prompts, t.sample_tokens, temperature=t.sample_temperature,
                   top_k=t.sample_top_k or None, generator=gen)
    return [{"prompt": p, "completion": tokenizer.decode(ids)} for p, ids in zip(t.sample_prompts, out)]


# --------------------------------------------------------------------------- outputs

def save_model(model: GPT, meta: dict[str, Any], model_dir: Path) -> None:
    """model.safetensors + meta.json, each written atomically."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(model_dir / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(model_dir / "meta.json", meta)


def write_curve(path: Path, rows: list[dict[str, float]]) -> None:
    lines = ["\t".join(CURVE_COLUMNS)]
    for r in rows:
        lines.append("\t".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c])
                               for c in CURVE_COLUMNS))
    write_text(path, "\n".join(lines) + "\n")


def diagnostics_metrics(diag: dict[str, torch.Tensor]) -> dict[str, float]:
    """training_step diagnostics as flat floats: 0-d tensors as-is, 1-d as `<key>/<i>`,
    2-d as `<key>/<i>/<j>` (e.g. attn/precision/<layer>/<head>)."""
    out: dict[str, float] = {}
    for k, v in diag.items():
        v = torch.as_tensor(v).detach().float().cpu()
        if v.dim() == 0:
            out[k] = v.item()
        elif v.dim() == 1:
            out.update({f"{k}/{i}": x for i, x in enumerate(v.tolist())})
        elif v.dim() == 2:
            out.update({f"{k}/{i}/{j}": x for i, row in enumerate(v.tolist()) for j, x in enumerate(row)})
    return out


# --------------------------------------------------------------------------- training

def train(cfg: PretrainConfig, run: str, paths: RunPaths, tracker=None, *,
          register: tuple[str, str] | None = None, tokenizer=None,
          progress: bool = True) -> dict[str, Any]:
    """Train `cfg` as run `run`, write every output in `paths`, return the final metrics.

    tracker: a pipeline.tracking Tracker (None: the null tracker). Only rank 0
    logs and writes. register: (registered model name, alias) to log the final
    model as an MLflow pyfunc model under; None logs no model (ablation items). Raises NonFiniteLoss on a NaN/inf loss and
    TrainingInterrupted after SIGTERM/SIGINT (a checkpoint saved first).
    """
    from pipeline.tracking import NullTracker

    tracker = tracker or NullTracker()
    t = cfg.train
    rt = setup_runtime(t)
    shards = load_shards(paths.tokens_dir, cfg.model.block_size)
    gcfg = cfg.gpt_config(shards.vocab_size)
    T = gcfg.block_size
    per_micro = t.micro_batch * T * rt.world
    if t.batch_tokens % per_micro:
        raise ParamsError(f"train.batch_tokens={t.batch_tokens}: must be a multiple of "
                          f"micro_batch*block_size*world_size={per_micro}")
    accum = max(1, t.batch_tokens // per_micro)
    step_tokens = accum * per_micro
    if tokenizer is None and rt.is_main:
        from stages.tokenizer import load_tokenizer
        tokenizer = load_tokenizer(paths.tokenizer_dir)

    torch.manual_seed(cfg.seed)
    model = build_model(gcfg).to(rt.device)
    optimizer = make_optimizer(model, kind=t.optimizer, lr=t.lr, weight_decay=t.weight_decay,
                               betas=(t.beta1, t.beta2))
    chash = config_hash(cfg)
    state = {"step": 0, "tokens": 0, "best_val": float("inf"), "curve": [], "wall_s": 0.0,
             "last": {}}
    last_ckpt: Path | None = None  # the newest checkpoint on disk: named if the loss goes NaN
    if t.resume == "never":
        if rt.is_main:
            ckpt.clear(paths.checkpoints)
    else:
        info = ckpt.latest(paths.checkpoints, chash)
        if info is not None:
            saved = ckpt.load(info)
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            set_rng_states(saved["rng"])
            state = saved["state"]
            last_ckpt = info.path
            if rt.is_main:
                print(f"pretrain@{run}: resumed from {info.path} (step {state['step']})",
                      file=sys.stderr)
    if rt.world > 1:
        for p in model.state_dict().values():
            dist.broadcast(p, 0)
    if rt.device.type == "cuda" and t.compile:
        model.compile()
    amp_dtype = {"auto": torch.bfloat16 if rt.device.type == "cuda" else None,
                 "float32": None, "bfloat16": torch.bfloat16}[t.dtype]
    autocast = (torch.autocast(rt.device.type, dtype=amp_dtype) if amp_dtype else nullcontext())
    val = val_batches(shards.val, n_batches=t.eval_batches, batch_size=t.micro_batch,
                      block_size=T, rank=rt.rank, world_size=rt.world)
    unigram = unigram_bpb(shards.train, shards.val, shards.vocab_size, shards.bytes_per_token_val)
    n_params = model.num_params()
    fpt = flops_per_token(gcfg)
    peak = peak_flops(rt.device) * rt.world
    params_list = [p for p in model.parameters() if p.requires_grad]
    debug_nan = int(os.environ.get(ENV_DEBUG_NAN, "-1"))
    device_name = torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda" else "cpu"

    stop = {"signum": 0}
    def on_signal(signum, _frame):
        if stop["signum"]:  # second signal: stop now
            raise KeyboardInterrupt
        stop["signum"] = signum
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    def checkpoint(val_loss: float | None) -> Path | None:
        if not rt.is_main:
            return None
        path = ckpt.save(paths.checkpoints, state["step"], {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": rng_states(), "state": state, "config": cfg.to_params()},
            val_loss=val_loss, config_hash=chash)
        ckpt.rotate(paths.checkpoints, t.keep_last)
        return path

    pending: list[tuple[int, torch.Tensor]] = []  # (step, loss) since the last log step
    logged: collections.deque[_LogRecord] = collections.deque()  # not yet read back
    timed = {"s": 0.0, "steps": 0}  # train time of logged intervals after the first
    interval = {"start": _mark(rt.device), "first": True}
    pin = rt.device.type == "cuda"  # page-locked batches: truly asynchronous copies
    diag: dict[str, torch.Tensor] = {}
    last_val = state["last"].get("val/loss")
    bar = None
    if rt.is_main and progress:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=state["step"], desc=f"pretrain@{run}", unit="step",
                   dynamic_ncols=True, mininterval=1.0)
    session_t0 = time.perf_counter()
    wall_before = state["wall_s"]

    def read_back(r: _LogRecord) -> float:
        """Check and log record `r` once the device has reached it; return its mean loss.
        Raises NonFiniteLoss naming the first step whose loss is NaN/inf."""
        dt = _seconds(r.start, r.end)  # waits for r.end: r.values is complete
        n = len(r.steps)
        losses = r.values[:n]
        bad = (~torch.isfinite(losses)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLoss(f"pretrain@{run}: loss is {losses[i].item()} at step {r.steps[i]} "
                                f"(read back at step {state['step']}); stopped, nothing written. "
                                f"Last good checkpoint: {last_ckpt or 'none'} (resume from it "
                                "with train.resume: auto after lowering train.lr or raising warmup)")
        train_loss = losses.mean().item()
        if r.timed:
            timed["s"] += dt
            timed["steps"] += n
        step_s = dt / max(n, 1)
        tok_s = step_tokens / step_s
        metrics = {"train/loss": train_loss, "lr": r.lr, "perf/step_ms": step_s * 1e3,
                   "perf/tok_per_s": tok_s,
                   "perf/mfu_pct": 100 * mfu(tok_s, fpt, peak) if peak else 0.0,
                   "tokens": r.tokens}
        state["last"].update(metrics)
        if rt.is_main:
            tracker.log_metrics({**metrics, **dict(zip(r.keys, r.values[n:].tolist()))},
                                step=r.step)
        if bar is not None:
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tok_s:,.0f}", refresh=False)
        return train_loss

    try:
        model.train()
        while state["step"] < t.steps:
            step = state["step"]
            lr = lr_at(step, t)
            for g in optimizer.param_groups:
                g["lr"] = lr * g.get("lr_scale", 1.0)
            _seed_torch(_seed_of(cfg.seed, step, rt.rank), rt.device)  # dropout etc.: a function of the step
            if step + 1 == debug_nan:  # test-only: poison a weight so step `debug_nan`'s loss is NaN
                with torch.no_grad():
                    model.lm_head.weight.view(-1)[0] = float("nan")
            for micro in range(accum):
                x, y = train_batch(shards.train, seed=cfg.seed, step=step, micro_step=micro,
                                   rank=rt.rank, batch_size=t.micro_batch, block_size=T,
                                   pin_memory=pin)
                x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
                with autocast:
                    loss, diag = model.training_step(x, y, grad_scale=1.0 / accum,
                                                     label_smoothing=t.label_smoothing,
                                                     optimizer=optimizer)
                loss_sum = loss.float() if micro == 0 else loss_sum + loss.float()
            loss = loss_sum / accum if accum > 1 else loss_sum
            if rt.world > 1:
                loss = _all_reduce_grads(params_list, loss, rt)
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params_list, t.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] = step = step + 1
            state["tokens"] += step_tokens
            pending.append((step, loss.detach()))

            is_last = step == t.steps
            do_eval = step % t.eval_every == 0 or is_last
            do_save = step % t.save_every == 0 or is_last
            if step % t.log_every == 0 or do_eval or do_save:
                # A signal is honoured here (within log_every steps), where every rank
                # stops at the same step: no per-step sync for the flag.
                stop_now = _any_rank(bool(stop["signum"]), rt)
                do_save = do_save or stop_now
                # No host sync here: the losses (and 0-d diagnostics) go to host memory by
                # an asynchronous copy and are checked and logged at the next log step,
                # when the device is long past them; eval/save/stop steps (and the last)
                # wait for them, so no checkpoint follows an unchecked loss.
                scalars = _scalar_diag(diag)
                values = torch.stack([l for _, l in pending] + [v.float() for v in scalars.values()])
                values = values.to("cpu", non_blocking=True)  # pinned destination on CUDA
                end = _mark(rt.device)
                logged.append(_LogRecord(step, [s for s, _ in pending], values, list(scalars), lr,
                                         state["tokens"], interval["start"], end,
                                         timed=not interval["first"]))
                interval["first"] = False
                pending.clear()
                state["wall_s"] = wall_before + (time.perf_counter() - session_t0)
                wait_all = do_eval or do_save or stop_now
                while logged and (wait_all or len(logged) > 1):
                    train_loss = read_back(logged.popleft())
                if bar is not None:
                    bar.update(step - bar.n)
                if do_eval:
                    ev = evaluate(model, val, rt, autocast, shards.bytes_per_token_val)
                    last_val = ev["val/loss"]
                    state["best_val"] = min(state["best_val"], last_val)
                    state["last"].update(ev)
                    state["curve"].append({"step": step, "tokens": state["tokens"],
                                           "wall_s": round(state["wall_s"], 3),
                                           "train_loss": train_loss, "val_loss": last_val, "lr": lr})
                    if rt.is_main:
                        tracker.log_metrics(ev, step=step)
                        if bar is not None:
                            bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{last_val:.3f}",
                                            tok_s=f"{state['last']['perf/tok_per_s']:,.0f}",
                                            refresh=False)
                if do_save:
                    last_ckpt = checkpoint(last_val) or last_ckpt
                if stop_now:
                    raise TrainingInterrupted(stop["signum"] or signal.SIGTERM, last_ckpt)
                # the next interval starts here; eval and checkpoint time stay out of it
                interval["start"] = _mark(rt.device) if do_eval or do_save else end
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if bar is not None:
            bar.close()

    # ---- final outputs (rank 0) -----------------------------------------------------
    if "val/loss" not in state["last"]:  # resumed at the very end of a finished run
        state["last"].update(evaluate(model, val, rt, autocast, shards.bytes_per_token_val))
    last = state["last"]
    if timed["steps"]:
        step_s = timed["s"] / timed["steps"]
        last.update({"perf/step_ms": step_s * 1e3, "perf/tok_per_s": step_tokens / step_s,
                     "perf/mfu_pct": 100 * mfu(step_tokens / step_s, fpt, peak) if peak else 0.0})
    final = {"run": run, "step": state["step"], "tokens": state["tokens"],
             "wall_s": round(wall_before + time.perf_counter() - session_t0, 3),
             **{k: last[k] for k in ("train/loss", "val/loss", "val/ppl", "val/bpb", "val/acc",
                                     "perf/tok_per_s", "perf/mfu_pct", "perf/step_ms") if k in last},
             "val/unigram_bpb": unigram, "mem/peak_gib": peak_memory_gib(rt.device),
             "device": device_name, "n_params": n_params,
             **attention_precisions(model), **diagnostics_metrics(diag)}
    if rt.is_main:
        with torch.compiler.set_stance("force_eager"):  # generation: varying shapes, run eager
            _write_outputs(model, cfg, gcfg, run, paths, tracker, tokenizer, shards, state, final,
                           val, register)
    if rt.world > 1:
        dist.barrier()
    return final


def attention_precisions(model: GPT) -> dict[str, float]:
    """`attn/precision/<layer>/<head>`: each head's learned attention precision λ (none for
    `dot`/`fixed`). PC algorithms report them in their diagnostics too; bp runs get them here."""
    out = {}
    for l, block in enumerate(model.blocks):
        fn = getattr(block.attn, "precision", None)
        lam = fn() if callable(fn) else None
        if lam is not None:
            out.update({f"attn/precision/{l}/{h}": float(v) for h, v in enumerate(lam.flatten().tolist())})
    return out


def _scalar_diag(diag: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """0-d diagnostics only, left as tensors: the tracker converts them off the hot path."""
    return {k: v for k, v in diag.items() if torch.is_tensor(v) and v.dim() == 0}


def _all_reduce_grads(params: list[torch.Tensor], loss: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Average grads and the loss over ranks in one flat all-reduce (no host sync)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads] + [loss.reshape(1).float()])
    dist.all_reduce(flat)
    flat /= rt.world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
        offset += n
    return flat[-1]


def _any_rank(flag: bool, rt: Runtime) -> bool:
    """True on every rank if `flag` is true on any."""
    if rt.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=rt.device)
    dist.all_reduce(t)
    return bool(t.item() > 0)


def _write_outputs(model, cfg, gcfg, run, paths: RunPaths, tracker, tokenizer, shards,
                   state, final, val, register) -> None:
    from pipeline.provenance import git_state
    from pipeline.tracking import default_pip_requirements

    git = git_state()
    meta = {"run": run, "model": to_dict(gcfg), "stage": cfg.to_params(), "step": state["step"],
            "tokens": state["tokens"], "git_commit": git["commit"], "git_dirty": git["dirty"],
            "tokenizer_sha256": shards.meta.get("tokenizer_sha256"),
            "vocab_size_data": shards.vocab_size, "n_params": final["n_params"]}
    save_model(model, meta, paths.model_dir)
    write_curve(paths.curve, state["curve"])
    samples = generate_samples(model, tokenizer, cfg.train, cfg.seed, model.lm_head.weight.device)
    write_json(paths.samples, samples)
    x = val[0][0][:1].to(model.lm_head.weight.device)
    write_json(paths.attention, {
        "layer": 0, "head": 0, "kernel": gcfg.attention.kernel,
        "tokens": [tokenizer.decode([i]) for i in x[0].tolist()],
        "weights": attention_map(model, x)})
    write_run_metrics(paths.metrics, final)
    logged_in_loop = ("step", "tokens", "train/loss", "val/loss", "val/ppl", "val/bpb", "val/acc")
    tracker.log_metrics({k: v for k, v in final.items() if is_number(v) and k not in logged_in_loop},
                        step=state["step"])
    for p in (paths.model_dir / "meta.json", paths.metrics, details_path(paths.metrics), paths.curve,
              paths.samples, paths.attention):
        tracker.log_artifact(p)
    if register is not None:
        tracker.log_pyfunc_model(
            str(PYFUNC_CODE), artifacts={"model_dir": str(paths.model_dir),
                                         "tokenizer_dir": str(paths.tokenizer_dir)},
            name="model", registered_name=register[0], alias=register[1],
            code_paths=_code_paths(), pip_requirements=default_pip_requirements(),
            signature=_pyfunc_signature)


def _pyfunc_signature():
    """Built only when a model is really logged (it imports MLflow)."""
    from stages.pretrain_pyfunc import signature

    return signature()


# --------------------------------------------------------------------------- main

def _code_paths() -> list[str]:
    """The packages the logged model imports (model/, stages/ for the tokenizer and the wrapper, pipeline/)."""
    root = Path(__file__).resolve().parents[1]
    return [str(root / "model"), str(root / "stages"), str(root / "pipeline")]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.pretrain", description=__doc__.splitlines()[0])
    ap.add_argument("run", help="a key of params.yaml `runs` (baseline, pcgpt, ...); positional, "
                    "because torchrun would take a --run option for its own --run-path")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    from pipeline import tracking
    from stages import pretrain_config, tokenizer
    try:
        params = read_params(args.params)
        validate(params, [check_seed, pretrain_config.check_params, tokenizer.check_params,
                          tracking.check_params])
        cfg = load_config(args.run, params)
        tok = load_section(tokenizer.TokenizerConfig, "tokenizer", params=params)
        tcfg = load_section(tracking.TrackingConfig, "tracking", params=params)
    except ParamsError as e:
        fail("pretrain", e)
    paths = RunPaths.for_run(args.run, cfg.train, tok.tokens_dir, tok.dir)
    manifest = None  # provenance only (tagged on the MLflow run), not a DVC param
    if "data" in params:
        from stages.data_config import DataConfig
        try:
            data = load_section(DataConfig, "data", params=params)
            manifest = Path(data.raw_dir) / data.source / "manifest.json"
        except ParamsError:
            pass  # the download stage names that error; training does not need it
    rank = int(os.environ.get("RANK", "0"))
    stage = f"pretrain@{args.run}"
    tracked = (tracking.stage_run(stage, params=cfg.to_params(), config=tcfg, manifest=manifest,
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
