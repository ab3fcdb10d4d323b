"""Stage `pretrain@<run>`: train one named model config on the token shards.

Reads:  data/tokens/{train,val}.bin + meta.json, data/tokenizer/ (paths from the
        `tokenizer` section); params.yaml `seeds`, `model`, `pc`, `train`, and
        `runs.<run>` (an override of model/pc/train, deep-merged over them); every
        run and the `tokenizer` and `tracking` sections are checked before any work.
Writes: for every seed s of `seeds`, trained in turn in this one process:
        metrics/pretrain/<run>/<s>.json          headline metrics
        metrics/pretrain/<run>/<s>_details.json  the rest: diagnostics, device, ... (pipeline/metrics.py)
        metrics/pretrain/<run>/<s>_curve.tsv     one row per evaluation, with the PC probe's scalars
        metrics/pretrain/<run>/<s>_diagnostics.tsv  the probe's per-layer series (long format)
        checkpoints/<run>/seed<s>/               resumable state (scratch, not a DVC out)
        an MLflow stage run (pipeline/tracking.py), tagged pcgpt.seed
        and once per run:
        metrics/pretrain/<run>.json              the headline averaged over seeds (the DVC metric)
        models/<run>/model.safetensors + meta.json  the first seed's model (pipeline/model_dir.py),
                                                 registered as `<tracking.registered_model>-<run>`
                                                 (alias `tracking.model_alias`); the other seeds'
                                                 models stay in checkpoints/<run>/
        metrics/pretrain/<run>_samples.json      the first seed's samples from fixed prompts
        metrics/pretrain/<run>_attention.json    one head's attention on a val window
Run:    python -m stages.pretrain baseline          (or `dvc repro pretrain@baseline`)
        torchrun --nproc_per_node=N -m stages.pretrain baseline   (DDP)

The package, in the order a run uses it:
  config.py       the params (typed once, checked whole) and the paths of a run's files
  data.py         token shards, the seeded stateless batch sampler, fixed val batches
  runtime.py      device and DDP placement, seeding and RNG states, timing, signals
  trainer.py      `Trainer` (model, optimizer, progress; `step()`, `state_dict()`) and
                  `train()`, the loop, top to bottom; `stages.ablate` reuses it
  progress.py     losses and step times read back from the device a log step late
  evaluation.py   val metrics, samples, the attention map
  checkpoints.py  resumable checkpoints, verified by sha256
  outputs.py      the files of a finished run, MLflow logging, model registration
  pyfunc.py       the registered MLflow model's code (prompts in, completions out)
  __main__.py     the command line

Exact resume: with `train.resume: auto` a run continues from the newest intact
checkpoint written by the same config (model, optimizer, step, tokens, best val,
curve, RNG states). A run SIGKILLed at any point and resumed ends with weights
bit-identical to an uninterrupted run (on CPU; tests/stages/test_pretrain.py).
SIGTERM/SIGINT save a checkpoint, then exit with 128+signal.

A NaN/inf loss stops the run (exit 3) naming the step and the last good
checkpoint; nothing is written (progress.py says when it is noticed). Test-only:
env var PCGPT_DEBUG_NAN_AT_STEP=<s> poisons one weight so that the loss of step s
(1-based, as in the logs) is NaN.

DDP: gradients are all-reduced by hand in one flat buffer after the micro-steps
(with the loss, so every rank agrees on a NaN); a SIGTERM/SIGINT flag is
all-reduced at log steps, so every rank stops at the same step. DDP's module
wrapper is not used because the loop calls `training_step`, not `forward`, and
the PC algorithms run several forwards per step.

This file imports nothing: `python -m pipeline.params check` reads config.py
without paying for torch.
"""
