"""Helpers: parameter count, FLOPs per token, MFU, and the optimizer (AdamW or Muon + AdamW)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from .config import GPTConfig, PCConfig
from .gpt import GPT

PEAK_FLOPS = {"h100": 989e12, "h200": 989e12}
"""Dense bf16 peak FLOP/s (no sparsity) of one GPU, from the NVIDIA datasheets (SXM)."""


def count_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Number of parameters; `exclude_embedding` leaves out lookup tables (nn.Embedding),
    which are no matmul and so no FLOPs (Kaplan et al. 2020's N)."""
    n = sum(p.numel() for p in model.parameters())
    if exclude_embedding:
        n -= sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    return n


def attention_flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training (forward + backward) FLOPs per token of the attention score/value products.

    Per layer and head, a token's query meets T keys: q·k costs 2·Dqk·T and p·v
    2·D·T in the forward, ×3 with the backward, so 6·T·(Dqk + D) per head; PaLM's
    dot-product count (appendix B) is the Dqk = D case, 12·L·H·D·T. Per kernel
    (the mathematical augmented dims; the kernels add one column per norm for the
    bf16 hi/lo split and zero-pad to a multiple of 8/16, which this leaves out):
      dot        Dqk = D                       -> 12·L·H·D·T
      gaussian   Dqk = D+1 ([λq, −λ/2]·[k, ‖k‖²])
      student_t  Dqk = D+2 ([2βq, −β‖q‖², −β]·[k, 1, ‖k‖²]); + a pointwise score_mod
      laplace    Dqk = D+2, as student_t
      mixture    C×T keys, block-diagonal Dqk = C·(D+2), values repeated C×
                 -> 6·L·H·C·T·(C·(D+2) + D)
    Attention settling adds settle_steps more attentions (values = keys) per layer.
    T is the context length (block_size unless given); like PaLM, causal masking
    is not halved.
    """
    a = config.attention
    D, T = config.head_dim, seq_len or config.block_size
    keys, dqk = T, D
    if a.kernel == "gaussian":
        dqk = D + 1
    elif a.kernel in ("student_t", "laplace"):
        dqk = D + 2
    elif a.kernel == "mixture":
        keys, dqk = a.n_components * T, a.n_components * (D + 2)
    per_attention = 6 * config.n_layer * config.n_head * keys * (dqk + D)
    return float(per_attention * (1 + a.settle_steps))


def flops_per_token(config: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + attention, where N counts every
    non-embedding parameter (lm_head included: it is a matmul) and the attention term
    is `attention_flops_per_token` (12·L·H·D·T for `dot`). N is counted on a
    meta-device baseline (the PC precisions are no matmuls), so no memory is allocated."""
    with torch.device("meta"):
        n = count_params(GPT(dataclasses.replace(config, pc=PCConfig())), exclude_embedding=True)
    return 6.0 * n + attention_flops_per_token(config, seq_len)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation, a fraction in [0, 1]: achieved FLOP/s over the peak
    (e.g. PEAK_FLOPS["h100"] times the number of GPUs)."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops!r}: must be > 0")
    return tokens_per_s * flops_per_token / peak_flops


# -- optimizer --------------------------------------------------------------------------------

def param_groups(model: GPT) -> dict[str, list[nn.Parameter]]:
    """Every trainable parameter in exactly one group:

    - `matrices`: 2-D weights inside the blocks (q/k/v/proj, MLP) — Muon's domain;
    - `head`: other 2-D matmul weights (lm_head, any PC module's matrices) — AdamW with decay;
    - `no_decay`: embeddings, norm gains, scalars/vectors and the attention precision
      parameters (log λ, its projection, ν, mixture logits) — AdamW without decay
      (decay would pull λ toward exp(0) = 1 and embeddings toward 0 for no reason).
    """
    precision = {id(p) for m in model.modules() if hasattr(m, "precision_parameters")
                 for p in m.precision_parameters()}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    groups: dict[str, list[nn.Parameter]] = {"matrices": [], "head": [], "no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in precision or id(p) in embeddings or p.dim() < 2:
            groups["no_decay"].append(p)
        elif name.startswith("blocks.") and p.dim() == 2:
            groups["matrices"].append(p)
        else:
            groups["head"].append(p)
    return groups


class Optimizers:
    """Several torch optimizers driven as one: step(), zero_grad(), state_dict(),
    load_state_dict() and a flat `param_groups` list (the training loop sets
    `group["lr"] = lr * group["lr_scale"]` on each). make_optimizer always returns
    one, with one optimizer (AdamW) or two (Muon + AdamW), so the loop never branches."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers],
                "kinds": [type(opt).__name__ for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        kinds = [type(opt).__name__ for opt in self.optimizers]
        if state.get("kinds") != kinds:
            raise ValueError(f"optimizer state is for {state.get('kinds')}, this optimizer is {kinds}")
        for opt, s in zip(self.optimizers, state["optimizers"]):
            opt.load_state_dict(s)


def make_optimizer(model: GPT, kind: str = "adamw", lr: float = 3e-4, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), muon_momentum: float = 0.95) -> Optimizers:
    """`adamw`: AdamW for everything, weight decay on the matrices (blocks + lm_head) only.
    `muon`: torch.optim.Muon for the blocks' 2-D matrices, AdamW for the rest.

    Muon uses adjust_lr_fn="match_rms_adamw" (Liu et al. 2025, "Muon is scalable"):
    its update is rescaled to AdamW's RMS, so the same lr and weight decay serve both
    and every group has lr_scale 1. Fused AdamW where every parameter is on CUDA.
    """
    if kind not in ("adamw", "muon"):
        raise ValueError(f"kind={kind!r}: must be one of adamw, muon")
    g = param_groups(model)
    fused = all(p.is_cuda for p in model.parameters())
    adam_groups = [{"params": g["head"], "weight_decay": weight_decay, "lr_scale": 1.0},
                   {"params": g["no_decay"], "weight_decay": 0.0, "lr_scale": 1.0}]
    if kind == "adamw":
        adam_groups.insert(0, {"params": g["matrices"], "weight_decay": weight_decay, "lr_scale": 1.0})
    adam_groups = [grp for grp in adam_groups if grp["params"]]
    opts: list[torch.optim.Optimizer] = []
    if kind == "muon" and g["matrices"]:
        opts.append(torch.optim.Muon([{"params": g["matrices"], "lr_scale": 1.0}], lr=lr,
                                     weight_decay=weight_decay, momentum=muon_momentum,
                                     adjust_lr_fn="match_rms_adamw"))
    opts.append(torch.optim.AdamW(adam_groups, lr=lr, betas=betas, fused=fused))
    return Optimizers(opts)
