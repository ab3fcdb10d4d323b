"""The training loop: a `Trainer` (model, optimizer, progress; what a checkpoint holds) and
`train()`, which runs it from the config to the written outputs, top to bottom.

One optimizer step (`Trainer.step`): set the lr, seed the step's RNG, then
`Trainer.update` - every micro-batch's `training_step` (the one entry point for bp
and every PC algorithm: the loop never branches on the algorithm), the DDP
all-reduce, clipping and the optimizer step - all of the step's device work in one
callable, so that it can be compiled or captured as a unit. Everything random is a
pure function of (seed, step, micro-step, rank), so resuming needs only the step;
RNG states are still saved and restored.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from model.config import GPTConfig
from model.pc import build_model
from model.step import TrainStep
from model.utils import flops_per_token, make_optimizer
from stages.pretrain import checkpoints as ckpt
from stages.pretrain.config import PretrainConfig, RunPaths, config_hash
from stages.pretrain.data import load_shards, train_batch, unigram_bpb, val_batches
from stages.pretrain.evaluation import attention_record, evaluate, generate_samples, majority_acc, pc_probe
from stages.pretrain.outputs import (attention_precisions, diagnostics_metrics, final_metrics,
                                     model_meta, register_model, write_outputs)
from stages.pretrain.progress import LossLog, NonFiniteLoss
from stages.pretrain.runtime import (Runtime, StopSignals, any_rank, broadcast_model, device_name,
                                     peak_flops, peak_memory_gib, rng_states, seed_of, seed_step,
                                     set_rng_states, setup_runtime)

ENV_DEBUG_NAN = "PCGPT_DEBUG_NAN_AT_STEP"  # test-only: the loss of this step (1-based) is NaN


class TrainingInterrupted(Exception):
    """SIGTERM/SIGINT arrived; a checkpoint was saved."""

    def __init__(self, signum: int, checkpoint: Path | None):
        super().__init__(f"stopped by {signal.Signals(signum).name}; checkpoint: {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


class Trainer:
    """One run's model, optimizer and progress, and the step that advances them."""

    def __init__(self, cfg: PretrainConfig, gcfg: GPTConfig, rt: Runtime, accum: int):
        t = cfg.train
        self.cfg, self.rt, self.accum = cfg, rt, accum
        self.step_tokens = accum * t.micro_batch * gcfg.block_size * rt.world
        torch.manual_seed(cfg.seed)
        self.model = build_model(gcfg).to(rt.device)
        self.optimizer = make_optimizer(self.model, kind=t.optimizer, lr=t.lr,
                                        weight_decay=t.weight_decay, betas=(t.beta1, t.beta2))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        amp = {"auto": torch.bfloat16 if rt.device.type == "cuda" else None,
               "float32": None, "bfloat16": torch.bfloat16}[t.dtype]
        self.autocast = torch.autocast(rt.device.type, dtype=amp) if amp else nullcontext()
        self.diag: dict[str, torch.Tensor] = {}  # the last micro-step's diagnostics
        self.train_step: TrainStep | None = None  # made by prepare(), after resume and compile
        # progress: what a checkpoint holds besides the weights and the optimizer
        self.iter_num = 0  # optimizer steps done
        self.tokens = 0
        self.best_val = float("inf")
        self.curve: list[dict[str, float]] = []  # one row per evaluation
        self.wall_s = 0.0  # over every session of the run
        self.last: dict[str, float] = {}  # latest train/val/perf numbers

    # -- one optimizer step ------------------------------------------------------------
    def prepare(self) -> None:
        """Make the step callable (model/step.py), once the weights, the optimizer state and
        compilation are in place: captured in a CUDA graph where train.cuda_graph allows."""
        t, pc = self.cfg.train, self.cfg.pc
        capture = (t.cuda_graph == "auto" and self.rt.device.type == "cuda" and t.compile
                   and t.optimizer == "adamw" and pc.tol == 0)
        self.train_step = TrainStep(self.model, self.optimizer, accum=self.accum, grad_clip=t.grad_clip,
                                    label_smoothing=t.label_smoothing, capture=capture)

    def step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> torch.Tensor:
        """Advance one optimizer step on this step's micro-batches; return the mean loss (a
        device tensor, never read back here)."""
        seed_step(seed_of(self.cfg.seed, self.iter_num, self.rt.rank), self.rt.device)  # dropout etc.
        loss = self.update(batches, lr)
        self.iter_num += 1
        self.tokens += self.step_tokens
        return loss

    def update(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> torch.Tensor:
        """Forward + backward of every micro-batch, gradient all-reduce, clip, optimizer step:
        one call of the step callable on the micro-batches stacked (accum, B, T)."""
        if self.train_step is None:
            self.prepare()
        x, y = (b[0].unsqueeze(0) if len(b) == 1 else torch.stack(b) for b in zip(*batches))
        if self.rt.device.type == "cuda" and not x.is_pinned():
            x, y = x.pin_memory(), y.pin_memory()  # page-locked: truly asynchronous copies
        x, y = x.to(self.rt.device, non_blocking=True), y.to(self.rt.device, non_blocking=True)
        with self.autocast:
            loss, _, self.diag = self.train_step(x, y, lr)
        # a captured step's outputs are overwritten by its next replay: keep this step's loss
        return loss.clone() if self.train_step.capture else loss

    def record_eval(self, ev: dict[str, float], train_loss: float | None, lr: float,
                    probe: dict[str, float]) -> None:
        """One curve row: the val metrics and, for PC, the probe's diagnostics (pc_probe) with
        the running count of evaluations whose settling raised the true energy."""
        self.best_val = min(self.best_val, ev["val/loss"])
        self.last.update(ev)
        row = {"step": self.iter_num, "tokens": self.tokens, "wall_s": round(self.wall_s, 3),
               "train_loss": train_loss, "val_loss": ev["val/loss"], "val_bpb": ev["val/bpb"],
               "val_acc": ev["val/acc"], "lr": lr}
        if probe:
            before = self.curve[-1].get("pc/settle_diverged_count", 0.0) if self.curve else 0.0
            row.update(probe, **{"pc/settle_diverged_count": before + probe.get("pc/settle_diverged", 0.0)})
        self.curve.append(row)

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": rng_states(),
                "state": {"step": self.iter_num, "tokens": self.tokens, "best_val": self.best_val,
                          "curve": self.curve, "wall_s": self.wall_s, "last": self.last,
                          # the last step's diagnostics: a run resumed at its end reports them
                          "diag": {k: v.detach().cpu() for k, v in self.diag.items()}}}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        set_rng_states(saved["rng"])
        s = saved["state"]
        self.iter_num, self.tokens, self.best_val = s["step"], s["tokens"], s["best_val"]
        self.curve, self.wall_s, self.last = s["curve"], s["wall_s"], s["last"]
        self.diag = dict(s.get("diag", {}))

    def resume(self, folder: Path) -> Path | None:
        """Continue from the newest intact checkpoint of this config (`resume: auto`), or delete
        the run's checkpoints (`resume: never`); return the checkpoint resumed from."""
        if self.cfg.train.resume == "never":
            if self.rt.is_main:
                ckpt.clear(folder)
            return None
        info = ckpt.latest(folder, config_hash(self.cfg))
        if info is not None:
            self.load_state_dict(ckpt.load(info))
        return info.path if info else None

    def save(self, folder: Path, val_loss: float | None) -> Path | None:
        """Checkpoint now (rank 0 only) and rotate; return its path."""
        if not self.rt.is_main:
            return None
        path = ckpt.save(folder, self.iter_num, {**self.state_dict(), "config": self.cfg.to_params()},
                         val_loss=val_loss, config_hash=config_hash(self.cfg))
        ckpt.rotate(folder, self.cfg.train.keep_last)
        return path


def train(cfg: PretrainConfig, run: str, paths: RunPaths, tracker=None, *,
          register: tuple[str, str] | None = None, tokenizer=None, progress: bool = True) -> dict[str, Any]:
    """Train `cfg` as run `run`, write every output in `paths`, return the final metrics.

    tracker: a pipeline.tracking Tracker (None: the null tracker); only rank 0 logs and
    writes. register: (registered model name, alias) to log the final model under as an
    MLflow pyfunc model; None logs none (ablation items). Raises NonFiniteLoss on a NaN/inf
    loss and TrainingInterrupted after SIGTERM/SIGINT (a checkpoint saved first).
    """
    from pipeline.provenance import git_state
    from pipeline.tokenizer import load_tokenizer
    from pipeline.tracking import NullTracker

    tracker = tracker or NullTracker()
    t = cfg.train
    rt = setup_runtime(t)
    shards = load_shards(paths.tokens_dir, cfg.model.block_size)
    gcfg = cfg.gpt_config(shards.vocab_size)
    T = gcfg.block_size
    trainer = Trainer(cfg, gcfg, rt, t.accum_steps(T, rt.world))
    if tokenizer is None and rt.is_main:
        tokenizer = load_tokenizer(paths.tokenizer_dir)
    last_ckpt = trainer.resume(paths.checkpoints)  # named if the loss goes NaN
    if last_ckpt and rt.is_main:
        print(f"pretrain@{run}: resumed from {last_ckpt} (step {trainer.iter_num})", file=sys.stderr)
    broadcast_model(trainer.model, rt)
    if rt.device.type == "cuda" and t.compile:
        trainer.model.compile()
    trainer.prepare()
    model = trainer.model
    val = val_batches(shards.val, n_batches=t.eval_batches, batch_size=t.micro_batch, block_size=T,
                      rank=rt.rank, world_size=rt.world)
    unigram = unigram_bpb(shards.train, shards.val, shards.vocab_size, shards.bytes_per_token_val)
    majority = majority_acc(shards.train, val_batches(shards.val, n_batches=t.eval_batches, batch_size=t.micro_batch,
                                                      block_size=T), shards.vocab_size)
    # PC diagnostics at every evaluation, always on the same training batch (that of step 0),
    # so their change over training is the model's, not the batch's.
    probe_batch = train_batch(shards.train, seed=cfg.seed, step=0, micro_step=0, rank=0,
                              batch_size=t.micro_batch, block_size=T)
    n_params = model.num_params()
    debug_nan = int(os.environ.get(ENV_DEBUG_NAN, "-1"))
    bar = None
    if rt.is_main and progress:
        from tqdm import tqdm
        bar = tqdm(total=t.steps, initial=trainer.iter_num, desc=f"pretrain@{run}", unit="step",
                   dynamic_ncols=True, mininterval=1.0)
    log = LossLog(run, rt.device, trainer.step_tokens, flops_per_token(gcfg), peak_flops(rt.device) * rt.world,
                  tracker if rt.is_main else NullTracker(), bar)
    last_val = trainer.last.get("val/loss")
    session_t0, wall_before = time.perf_counter(), trainer.wall_s

    try:
        with StopSignals() as stop:
            model.train()
            while trainer.iter_num < t.steps:
                step = trainer.iter_num
                if step + 1 == debug_nan:  # test-only: poison a weight so this step's loss is NaN
                    with torch.no_grad():
                        model.lm_head.weight.view(-1)[0] = float("nan")
                batches = [train_batch(shards.train, seed=cfg.seed, step=step, micro_step=m, rank=rt.rank,
                                       batch_size=t.micro_batch, block_size=T,
                                       pin_memory=rt.device.type == "cuda")  # pinned: async copies
                           for m in range(trainer.accum)]
                lr = t.lr_at(step)
                loss = trainer.step(batches, lr)
                step += 1
                log.add(step, loss)

                is_last = step == t.steps
                do_eval = step % t.eval_every == 0 or is_last
                do_save = step % t.save_every == 0 or is_last
                if not (step % t.log_every == 0 or do_eval or do_save):
                    continue
                # A signal is honoured here (within log_every steps), where every rank stops
                # at the same step: no per-step sync for the flag.
                stop_now = any_rank(bool(stop.signum), rt)
                do_save = do_save or stop_now
                log.close_interval(step, trainer.diag, lr, trainer.tokens)
                trainer.wall_s = wall_before + (time.perf_counter() - session_t0)
                log.drain(wait_all=do_eval or do_save or stop_now, last=trainer.last, now=step,
                          last_ckpt=last_ckpt)
                if bar is not None:
                    bar.update(step - bar.n)
                if do_eval:
                    ev = evaluate(model, val, rt, trainer.autocast, shards.bytes_per_token_val)
                    probe = pc_probe(model, probe_batch, rt, trainer.autocast)
                    last_val = ev["val/loss"]
                    trainer.record_eval(ev, log.train_loss, lr, probe)
                    if rt.is_main:
                        # the probe's own numbers (the training step's diagnostics of the same
                        # names are logged at every log step already, from the training batch)
                        tracker.log_metrics({**ev, **{k: v for k, v in trainer.curve[-1].items()
                                                      if k.startswith("pc/") and k not in trainer.diag}},
                                            step=step)
                        if bar is not None:
                            bar.set_postfix(loss=f"{log.train_loss:.3f}", val=f"{last_val:.3f}",
                                            tok_s=f"{trainer.last['perf/tok_per_s']:,.0f}", refresh=False)
                if do_save:
                    last_ckpt = trainer.save(paths.checkpoints, last_val) or last_ckpt
                if stop_now:
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, last_ckpt)
                log.restart(paused=do_eval or do_save)
    finally:
        if bar is not None:
            bar.close()

    # -- final metrics and outputs (rank 0 writes) ----------------------------------------
    last = trainer.last
    if "val/loss" not in last:  # resumed at the very end of a finished run
        last.update(evaluate(model, val, rt, trainer.autocast, shards.bytes_per_token_val))
    if log.step_s:
        tok_s = trainer.step_tokens / log.step_s
        last.update({"perf/step_ms": log.step_s * 1e3, "perf/tok_per_s": tok_s,
                     "perf/mfu_pct": log.mfu_pct(tok_s)})
    step_diag = diagnostics_metrics(trainer.diag)
    probe = {k: v for k, v in (trainer.curve[-1] if trainer.curve else {}).items()  # the last probe's own
             if k.startswith("pc/") and k not in step_diag}
    final = final_metrics(run, trainer.iter_num, trainer.tokens,
                          wall_before + time.perf_counter() - session_t0, last, unigram,
                          peak_memory_gib(rt.device), device_name(rt.device), n_params,
                          {**attention_precisions(model), **step_diag, **probe}, majority_acc=majority)
    if rt.is_main:
        with torch.compiler.set_stance("force_eager"):  # generation: varying shapes, run eager
            device = model.lm_head.weight.device
            meta = model_meta(run, cfg, model, trainer.iter_num, trainer.tokens, shards.meta, git_state())
            samples = generate_samples(model, tokenizer, t, cfg.seed, device) if paths.samples else None
            attention = attention_record(model, val[0][0][:1].to(device), tokenizer) if paths.attention else None
            write_outputs(paths, model, meta, trainer.curve, samples, attention, final, tracker)
            if register is not None:
                register_model(tracker, paths, *register)
    if rt.world > 1:
        dist.barrier()
    return final


__all__ = ["Trainer", "train", "TrainingInterrupted", "NonFiniteLoss", "ENV_DEBUG_NAN"]
