"""What a run measures besides its training loss: validation metrics on fixed batches, the
PC diagnostics on one fixed training batch, the majority-token reference, seeded samples
from fixed prompts, and one head's attention map."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from model.gpt import GPT
from pipeline.tokenizer import Tokenizer
from stages.pretrain.config import TrainConfig
from stages.pretrain.runtime import Runtime


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


def pc_probe(model: GPT, batch: tuple[torch.Tensor, torch.Tensor], rt: Runtime, autocast) -> dict[str, float]:
    """`PCGPT.pc_diagnostics` on one fixed training batch, as flat floats (pipeline/metrics.py
    names); {} for a backprop model. Every rank calls it (the `variance` precision all-reduces
    under DDP). Buffers are restored afterwards: the probe's settling must not move the
    `variance` precision's running mean, or evaluating would change training."""
    from stages.pretrain.outputs import diagnostics_metrics

    if not hasattr(model, "pc_diagnostics"):
        return {}
    x, y = batch[0].to(rt.device), batch[1].to(rt.device)
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with autocast:
            diag = model.pc_diagnostics(x, y)
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
    out = diagnostics_metrics(diag)
    layers = [v for k, v in out.items() if k.startswith("pc/precision/")]
    out["pc/precision_mean"] = sum(layers) / len(layers) if layers else 1.0
    return out


def majority_acc(train, batches, vocab_size: int) -> float:
    """Accuracy of always predicting the most frequent training token, on the targets of the
    fixed val batches (those val/acc is measured on): the accuracy a model that learned only
    the unigram mode reaches."""
    import numpy as np

    mode = int(np.bincount(np.asarray(train), minlength=vocab_size).argmax())
    hits = sum(int((y == mode).sum()) for _, y in batches)
    return hits / sum(y.numel() for _, y in batches)


def generate_samples(model: GPT, tokenizer: Tokenizer, t: TrainConfig, seed: int,
                     device: torch.device) -> list[dict[str, str]]:
    """Completions of the fixed prompts, sampled with a seeded generator (same seed, same text)."""
    from model.generate import generate

    prompts = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in t.sample_prompts]
    gen = torch.Generator(device=device).manual_seed(seed)
    out = generate(model, prompts, t.sample_tokens, temperature=t.sample_temperature,
                   top_k=t.sample_top_k or None, generator=gen)
    return [{"prompt": p, "completion": tokenizer.decode(ids)} for p, ids in zip(t.sample_prompts, out)]


def attention_record(model: GPT, x: torch.Tensor, tokenizer: Tokenizer, layer: int = 0,
                     head: int = 0) -> dict[str, Any]:
    """One head's attention probabilities on window x (1, T) (any kernel: the model's own
    `attention_probs`), with the tokens: the `<run>_attention.json` the report draws."""
    was_training = model.training
    model.eval()
    try:
        probs = model.attention_probs(x, layer)  # (1, H, T, T)
    finally:
        model.train(was_training)
    return {"layer": layer, "head": head, "kernel": model.config.attention.kernel,
            "tokens": [tokenizer.decode([i]) for i in x[0].tolist()],
            "weights": probs[0, head].tolist()}
