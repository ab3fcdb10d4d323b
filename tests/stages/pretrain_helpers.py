"""A throwaway pretrain workspace: a char tokenizer, token shards and params.yaml in a temp dir.

Used by the pretrain tests and the pretrain benchmark, so neither depends on the
download/tokenizer stages having run.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.io import sha256_file, write_json
from pipeline.tokenizer import tokenizer_to_json, train_char

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("the king and queen of love hath sworn to speak no more than truth my lord "
         "what say you good sir I pray thee come hither now").split()

TINY_MODEL = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}
TINY_TRAIN = {"steps": 30, "micro_batch": 4, "warmup_steps": 5, "lr": 3e-3, "eval_every": 10,
              "eval_batches": 2, "log_every": 5, "save_every": 5, "keep_last": 2,
              "threads": 1, "sample_tokens": 8, "sample_prompts": ["the king"]}


def corpus(n_lines: int, seed: int = 0) -> str:
    """Seeded pseudo-English lines: enough structure that a tiny model beats unigram quickly."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))).capitalize() + ".")
    return "\n".join(lines) + "\n"


def write_data(root: Path, n_lines: int = 3000) -> None:
    """data/tokenizer/tokenizer.json and data/tokens/{train,val}.bin + meta.json under root."""
    text_train, text_val = corpus(n_lines, 1), corpus(max(n_lines // 10, 200), 2)
    tok = train_char([text_train])
    tok_dir, tokens_dir = root / "data" / "tokenizer", root / "data" / "tokens"
    write_json(tok_dir / "tokenizer.json", tokenizer_to_json(tok))
    tokens_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, text in (("train", text_train), ("val", text_val)):
        ids = np.array([tok.bos_id, *tok.encode(text)], dtype=np.uint16)
        ids.tofile(tokens_dir / f"{split}.bin")
        counts[split] = len(ids)
    write_json(tokens_dir / "meta.json", {
        "kind": "char", "vocab_size": tok.n_vocab, "dtype": "uint16", "bos_id": tok.bos_id,
        "eos_id": tok.eos_id, "pad_id": tok.pad_id,
        "tokenizer_sha256": sha256_file(tok_dir / "tokenizer.json"),
        "train_tokens": counts["train"], "val_tokens": counts["val"],
        "bytes_per_token_val": len(text_val.encode()) / counts["val"]})


def write_params(root: Path, train: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
                 runs: dict[str, Any] | None = None, tracking: bool = False, seed: int = 7) -> None:
    params = {
        "seed": seed,
        "tokenizer": {"kind": "char", "dir": "data/tokenizer", "tokens_dir": "data/tokens"},
        "tracking": {"enabled": tracking, "experiment": "pcgpt-test"},
        "model": {**TINY_MODEL, **(model or {})},
        "pc": {"algorithm": "bp"},
        "train": {**TINY_TRAIN, "device": "cpu", **(train or {})},
        "runs": runs or {"baseline": {}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def workspace(root: Path, **params: Any) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_data(root)
    write_params(root, **params)
    return root


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT)
    e.pop("DVC_STAGE", None)
    e.pop("WORLD_SIZE", None)
    e.update(extra)
    return e


def run_stage(root: Path, *args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.pretrain", *args], cwd=root,
                          env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
