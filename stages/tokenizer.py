"""Stage `tokenizer`: train a tokenizer on the training split and write token shards.

Reads:  data/raw/<data.source>/docs.parquet; params.yaml `data.source`,
        `data.raw_dir`, `data.val_fraction` and the `tokenizer` section (the `data`,
        `tokenizer` and `tracking` sections are checked whole before any work).
Writes: data/tokenizer/tokenizer.json   the tokenizer, self-contained (below)
        data/tokenizer/meta.json        what it was trained on, its sha256
        data/tokens/train.bin, val.bin  flat token ids, uint16 (uint32 past 65,536
                                        ids); every document is preceded by bos
        data/tokens/meta.json           vocab size, dtype, counts, special ids,
                                        tokenizer_sha256, bytes_per_token_val, split
        metrics/tokenizer.json          vocab size, bytes/token on val, seconds, MB/s
        an MLflow stage run (pipeline/tracking.py): metrics, tokenizer + shard meta
Run:    python -m stages.tokenizer      (or `dvc repro tokenizer`)

Split: documents are ranked by sha256(doc_id) and the first
max(1, round(val_fraction * n)) go to val. It depends on the doc_ids only (not
on the seed), so every seed of an experiment is scored on the same val set.

`kind: bpe` trains a byte-level BPE with rustbpe (the `split_pattern` regex) to
`vocab_size - 3` ids plus three specials, `kind: char` one id per character seen
(with byte fallback); both are the tokenizer library's (pipeline/tokenizer.py),
which also reads tokenizer.json back for training and for the MLflow model.
"""

from __future__ import annotations

import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from pipeline.io import atomic_dir, sha256_file, write_json
from pipeline.metrics import numeric
from pipeline.params import ParamsError, fail, load_section, read_params, validate
from pipeline.tokenizer import (FORMAT, SPLIT_PATTERNS, Tokenizer, TokenizerError, load_tokenizer,
                                tokenizer_to_json, train_bpe, train_char)
from stages import data_config
from stages.data_config import DataConfig, TokenizerConfig

ROUNDTRIP_PROBE = "Grüße, 世界! naïve café — ŝ 🎭\u200b\r\n\tα≠β 12345 <|bos|>"
ENCODE_BATCH_BYTES = 8 << 20


@dataclass
class TokenizerStage:
    """What the stage reads from params.yaml: the `data` and `tokenizer` sections."""

    data: DataConfig
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


# --- split and shards --------------------------------------------------------------

def split_val(doc_ids: list[str], val_fraction: float) -> np.ndarray:
    """Boolean mask of val documents: the first round(f*n) (>= 1) by sha256(doc_id)."""
    n = len(doc_ids)
    if n < 2:
        raise TokenizerError(f"the corpus has {n} document(s); a train/val split needs at least 2")
    keys = [hashlib.sha256(d.encode("utf-8")).digest() for d in doc_ids]
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    mask = np.zeros(n, dtype=bool)
    mask[sorted(range(n), key=keys.__getitem__)[:n_val]] = True
    return mask


def _batches(texts: list[str], max_bytes: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for t in texts:
        batch.append(t)
        size += len(t)
        if size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def write_shard(tok: Tokenizer, texts: list[str], dest: Path, dtype: str,
                progress: bool = True) -> tuple[int, float, float]:
    """Encode `texts` (bos before each) into the flat binary `dest`.

    Returns (tokens, encode wall seconds, encode CPU seconds summed over threads).
    """
    n_tokens, encode_s, encode_cpu_s = 0, 0.0, 0.0
    with open(dest, "wb") as f, tqdm(total=len(texts), unit="doc", desc=dest.name, leave=False,
                                     disable=not progress) as bar:
        for batch in _batches(texts, ENCODE_BATCH_BYTES):
            t0, c0 = time.perf_counter(), time.process_time()
            ids = tok.encode_batch(batch)
            encode_s += time.perf_counter() - t0
            encode_cpu_s += time.process_time() - c0
            flat: list[int] = []
            for doc in ids:
                flat.append(tok.bos_id)
                flat.extend(doc)
            np.asarray(flat, dtype=dtype).tofile(f)
            n_tokens += len(flat)
            bar.update(len(batch))
    return n_tokens, encode_s, encode_cpu_s


def sanity_check(tok_dir: Path, tokens_dir: Path, dtype: str, val_texts: list[str], n_docs: int) -> None:
    """Reload the written tokenizer; round-trip a Unicode probe and the first val documents."""
    tok = load_tokenizer(tok_dir)
    if tok.decode(tok.encode(ROUNDTRIP_PROBE)) != ROUNDTRIP_PROBE:
        raise TokenizerError("sanity check: the Unicode probe does not round-trip")
    ids = np.fromfile(tokens_dir / "val.bin", dtype=dtype)
    starts = np.flatnonzero(ids == tok.bos_id)
    if len(starts) != len(val_texts):
        raise TokenizerError(f"sanity check: val.bin has {len(starts)} documents, expected {len(val_texts)}")
    ends = list(starts[1:]) + [len(ids)]
    for k in range(min(n_docs, len(val_texts))):
        if tok.decode(ids[starts[k] + 1:ends[k]].tolist()) != val_texts[k]:
            raise TokenizerError(f"sanity check: val document {k} does not decode to its text")


def run(cfg: TokenizerStage, seed: int, progress: bool = True) -> dict:
    """Split, train, encode, write, check; write and return the stage metrics.

    `seed` is accepted for the common stage interface; nothing here is random
    (rustbpe training is deterministic and the split depends on doc_ids only).
    """
    t_start = time.perf_counter()
    data, tc = cfg.data, cfg.tokenizer
    import pyarrow.parquet as pq  # here: the params check imports this module, and needs no pyarrow

    docs_path = data.docs_path
    if not docs_path.is_file():
        raise TokenizerError(f"{docs_path}: not found (run the download stage first: dvc repro download)")
    table = pq.read_table(docs_path, columns=["doc_id", "text"])
    doc_ids = table.column("doc_id").to_pylist()
    texts = table.column("text").to_pylist()
    is_val = split_val(doc_ids, data.val_fraction)
    train_texts = [t for t, v in zip(texts, is_val) if not v]
    val_texts = [t for t, v in zip(texts, is_val) if v]
    val_ids = [d for d, v in zip(doc_ids, is_val) if v]

    t0 = time.perf_counter()
    if tc.kind == "bpe":
        tok = train_bpe(train_texts, tc.vocab_size, SPLIT_PATTERNS[tc.split_pattern],
                        name=f"pcgpt-{data.source}-bpe{tc.vocab_size}")
        if tok.n_vocab < tc.vocab_size:
            print(f"tokenizer: warning: the corpus allowed only {tok.n_vocab} ids of the "
                  f"{tc.vocab_size} asked for", file=sys.stderr)
    else:
        tok = train_char(train_texts)
    train_s = time.perf_counter() - t0
    dtype = "uint16" if tok.n_vocab <= 2**16 else "uint32"

    with atomic_dir(tc.dir) as tok_dir, atomic_dir(tc.tokens_dir) as tokens_dir:
        write_json(tok_dir / "tokenizer.json", tokenizer_to_json(tok))
        tok_sha = sha256_file(tok_dir / "tokenizer.json")
        train_tokens, train_enc_s, train_cpu_s = write_shard(tok, train_texts, tokens_dir / "train.bin",
                                                             dtype, progress)
        val_tokens, val_enc_s, val_cpu_s = write_shard(tok, val_texts, tokens_dir / "val.bin", dtype, progress)
        text_bytes = sum(len(t.encode("utf-8")) for t in texts)
        val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
        common = {"kind": tok.kind, "vocab_size": tok.n_vocab, "bos_id": tok.bos_id,
                  "eos_id": tok.eos_id, "pad_id": tok.pad_id, "tokenizer_sha256": tok_sha}
        write_json(tok_dir / "meta.json", {
            **common, "format": FORMAT, "vocab_size_requested": tc.vocab_size,
            "split_pattern": tc.split_pattern if tc.kind == "bpe" else None,
            "source": data.source, "trained_on_docs": len(train_texts),
            "trained_on_bytes": text_bytes - val_bytes, "train_s": round(train_s, 3)})
        write_json(tokens_dir / "meta.json", {
            **common, "dtype": dtype, "train_tokens": train_tokens, "val_tokens": val_tokens,
            "val_bytes": val_bytes, "bytes_per_token_val": val_bytes / val_tokens,
            "layout": "flat ids; each document is preceded by bos_id",
            "source": data.source, "docs_sha256": sha256_file(docs_path),
            "split": {"method": "first max(1, round(val_fraction*n)) documents by sha256(doc_id)",
                      "val_fraction": data.val_fraction, "train_docs": len(train_texts),
                      "val_docs": len(val_texts), "val_doc_ids": val_ids}})
        sanity_check(tok_dir, tokens_dir, dtype, val_texts, tc.sanity_docs)  # before either is in place

    encode_s, encode_cpu_s = train_enc_s + val_enc_s, train_cpu_s + val_cpu_s
    metrics = {
        "kind": tok.kind, "vocab_size": tok.n_vocab, "train_tokens": train_tokens,
        "val_tokens": val_tokens, "bytes_per_token_val": round(val_bytes / val_tokens, 4),
        "train_s": round(train_s, 3), "encode_s": round(encode_s, 3),
        "encode_mb_per_s": round(text_bytes / 1e6 / max(encode_s, 1e-9), 2),
        # per CPU-second (all threads): the per-core rate, robust to a busy machine
        "encode_mb_per_core_s": round(text_bytes / 1e6 / max(encode_cpu_s, 1e-9), 2),
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    write_json(tc.metrics_file, metrics)
    return metrics


def main() -> None:
    from pipeline import tracking

    try:
        params = read_params()
        validate(params, [data_config.check_data, data_config.check_tokenizer, tracking.check_params])
        cfg = TokenizerStage(data_config.check_data(params), data_config.check_tokenizer(params))
        seed = params.get("seed", 0)
        tcfg = load_section(tracking.TrackingConfig, "tracking", params=params)
        manifest = cfg.data.manifest_path
        with tracking.stage_run("tokenizer", params=cfg, config=tcfg,
                                manifest=manifest if manifest.exists() else None) as tracker:
            metrics = run(cfg, seed)
            tracker.log_metrics(numeric(metrics), step=0)
            for name in ("tokenizer.json", "meta.json"):
                tracker.log_artifact(Path(cfg.tokenizer.dir) / name, artifact_path="tokenizer")
            tracker.log_artifact(cfg.tokenizer.tokens_meta, artifact_path="tokens")
    except (ParamsError, TokenizerError) as e:
        fail("tokenizer", e)
    print(f"tokenizer: {metrics['kind']} vocab {metrics['vocab_size']}, "
          f"{metrics['train_tokens']:,} train / {metrics['val_tokens']:,} val tokens, "
          f"{metrics['bytes_per_token_val']:.2f} bytes/token on val, "
          f"encode {metrics['encode_mb_per_s']:.1f} MB/s, {metrics['wall_s']:.1f}s")


__all__ = ["TokenizerStage", "split_val", "write_shard", "sanity_check", "run"]

if __name__ == "__main__":
    main()
