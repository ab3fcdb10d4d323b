"""Token shards for the `pretrain` stage: a seeded, stateless batch sampler and fixed val batches.

Reads what the `tokenizer` stage wrote: `<tokens_dir>/{train,val}.bin` (flat
uint16 or uint32 token ids) and `<tokens_dir>/meta.json` (vocab_size, dtype,
bytes_per_token_val, ...). Nothing here writes files.

The training sampler keeps no state: the batch of optimizer step `s`,
micro-step `m`, rank `r` is drawn from `numpy.random.default_rng([seed, s, m, r])`.
Resuming at step `s` therefore needs nothing but `s`, and a run resumed after a
kill sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


@dataclass
class TokenShards:
    """The memory-mapped train/val shards and their meta.json."""

    train: np.ndarray
    val: np.ndarray
    meta: dict

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def bytes_per_token_val(self) -> float:
        """UTF-8 bytes per token on the val split: converts nats/token into bits/byte."""
        return float(self.meta["bytes_per_token_val"])


def load_shards(tokens_dir: str | Path, block_size: int) -> TokenShards:
    """Open `train.bin`/`val.bin` read-only as memmaps; check both hold more than one context."""
    tokens_dir = Path(tokens_dir)
    meta_path = tokens_dir / "meta.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path}: missing (run the tokenizer stage first: dvc repro tokenizer)")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    for key in ("vocab_size", "bytes_per_token_val"):
        if key not in meta:
            raise ValueError(f"{meta_path}: key {key!r} missing")
    dtype_name = meta.get("dtype", "uint16" if meta["vocab_size"] <= 65536 else "uint32")
    if dtype_name not in DTYPES:
        raise ValueError(f"{meta_path}: dtype {dtype_name!r} not one of {', '.join(DTYPES)}")
    shards = {}
    for split in ("train", "val"):
        path = tokens_dir / f"{split}.bin"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run the tokenizer stage first)")
        arr = np.memmap(path, dtype=DTYPES[dtype_name], mode="r")
        if len(arr) <= block_size + 1:
            raise ValueError(f"{path}: {len(arr)} tokens, need more than block_size+1={block_size + 1}")
        shards[split] = arr
    return TokenShards(shards["train"], shards["val"], meta)


def _windows(data: np.ndarray, starts: np.ndarray, block_size: int,
             pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs data[s:s+T] and targets data[s+1:s+T+1] for every start s: (B, T) int64 each.

    One vectorised gather from the memmap (a Python loop over the B windows cost ~3x
    more host time per batch), written straight into the returned tensors; with
    `pin_memory` those are page-locked, so that `.to(cuda, non_blocking=True)` is a true
    asynchronous copy (from pageable memory the copy is staged and can block the host
    until the GPU has drained its queue)."""
    rows = data[starts[:, None] + np.arange(block_size + 1)]  # (B, T+1), the shard's dtype
    shape = (len(starts), block_size)
    x = torch.empty(shape, dtype=torch.int64, pin_memory=pin_memory)
    y = torch.empty(shape, dtype=torch.int64, pin_memory=pin_memory)
    np.copyto(x.numpy(), rows[:, :-1])
    np.copyto(y.numpy(), rows[:, 1:])
    return x, y


def train_batch(data: np.ndarray, *, seed: int, step: int, micro_step: int, rank: int,
                batch_size: int, block_size: int,
                pin_memory: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The (x, y) micro-batch of (step, micro_step, rank): uniformly random windows, a pure
    function of its arguments (see the module docstring). `pin_memory`: page-locked host
    tensors (for CUDA runs; the values are the same)."""
    rng = np.random.default_rng([seed, step, micro_step, rank])
    starts = rng.integers(0, len(data) - block_size - 1, size=batch_size)
    return _windows(data, starts, block_size, pin_memory)


def val_batches(data: np.ndarray, *, n_batches: int, batch_size: int, block_size: int,
                rank: int = 0, world_size: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed evaluation set: n_batches*batch_size windows spread evenly over the val
    shard (the same at every evaluation and in every run); under DDP each rank takes every
    world_size-th batch."""
    n = n_batches * batch_size
    starts = np.linspace(0, len(data) - block_size - 1, num=n).astype(np.int64)
    batches = [_windows(data, starts[i:i + batch_size], block_size) for i in range(0, n, batch_size)]
    return batches[rank::world_size]


def unigram_bpb(train: np.ndarray, val: np.ndarray, vocab_size: int, bytes_per_token: float) -> float:
    """Bits per UTF-8 byte of the val shard under the train shard's unigram distribution
    (add-one smoothed, so a token unseen in train costs finite bits): the reference line a
    language model must beat."""
    counts = np.bincount(np.asarray(train), minlength=vocab_size).astype(np.float64) + 1.0
    log2_p = np.log2(counts) - math.log2(counts.sum())
    val_counts = np.bincount(np.asarray(val), minlength=vocab_size).astype(np.float64)
    bits_per_token = -(val_counts * log2_p[:len(val_counts)]).sum() / val_counts.sum()
    return float(bits_per_token / bytes_per_token)
