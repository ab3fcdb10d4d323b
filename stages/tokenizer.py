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

`kind: bpe` trains a byte-level BPE with rustbpe (GPT-4 split pattern) to
`vocab_size - 3` ids and appends the specials `<|bos|>`, `<|eos|>`, `<|pad|>`,
so `vocab_size` is the model's embedding size. tokenizer.json holds `pat_str`,
`mergeable_ranks` (base64 token bytes -> rank) and `special_tokens`: exactly
the arguments of `tiktoken.Encoding`, which is how `load_tokenizer` rebuilds it.
`kind: char` has one id per character seen in the training split, then 256
byte ids (a character outside the vocabulary is encoded as its UTF-8 bytes, so
every string round-trips), then the three specials.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import pyarrow.parquet as pq
import tiktoken
from tqdm import tqdm

from pipeline.io import sha256_file, write_json
from pipeline.params import ParamsError, fail, load_section, read_params, validate
from stages import data_config
from stages.data_config import DataConfig

SECTIONS = ("tokenizer",)
SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
SPLIT_PATTERNS = {
    # GPT-4's cl100k_base pattern (tiktoken).
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    # nanochat's variant: numbers in pieces of at most 2 digits, fewer number
    # tokens for small vocabularies.
    "gpt4-digits2": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}
FORMAT = "pcgpt-tokenizer/1"
ROUNDTRIP_PROBE = "Grüße, 世界! naïve café — ŝ 🎭\u200b\r\n\tα≠β 12345 <|bos|>"
ENCODE_BATCH_BYTES = 8 << 20


class TokenizerError(RuntimeError):
    """The corpus cannot be tokenized as asked, or a sanity check failed."""


@dataclass
class TokenizerConfig:
    """The `tokenizer` section."""

    kind: Literal["bpe", "char"] = "bpe"
    vocab_size: int = 2048
    """bpe: ids in total, the 3 specials included (the model's embedding size).
    Fewer are made when the corpus runs out of pairs to merge. char: unused."""
    split_pattern: Literal["gpt4", "gpt4-digits2"] = "gpt4"
    dir: str = "data/tokenizer"
    tokens_dir: str = "data/tokens"
    metrics_file: str = "metrics/tokenizer.json"
    sanity_docs: int = 8
    """Val documents read back from val.bin and decoded after writing."""

    def __post_init__(self) -> None:
        if self.kind == "bpe" and not 256 + len(SPECIALS) <= self.vocab_size <= 2**31:
            raise ValueError(f"vocab_size: must be in [{256 + len(SPECIALS)}, 2**31] for bpe, "
                             f"got {self.vocab_size}")
        if self.sanity_docs < 0:
            raise ValueError(f"sanity_docs: must be >= 0, got {self.sanity_docs}")


@dataclass
class TokenizerStage:
    """What the stage reads from params.yaml: the `data` and `tokenizer` sections."""

    data: DataConfig
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


# --- the two tokenizers ----------------------------------------------------------

class BpeTokenizer:
    """A `tiktoken.Encoding` (as `.encoding`) with the interface the stages use."""

    kind = "bpe"

    def __init__(self, encoding: tiktoken.Encoding):
        self.encoding = encoding
        self.bos_id, self.eos_id, self.pad_id = (encoding.encode_single_token(s) for s in SPECIALS)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; special-token text in it is encoded as ordinary text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        """`encode` of each text, in parallel threads (tiktoken's batch encoder)."""
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.encoding.decode(list(ids))


class CharTokenizer:
    """Characters, then 256 byte-fallback ids, then the specials (see module docstring)."""

    kind = "char"

    def __init__(self, chars: list[str]):
        self.chars = list(chars)
        self.index = {c: i for i, c in enumerate(self.chars)}
        self.byte0 = len(self.chars)
        self.bos_id, self.eos_id, self.pad_id = range(self.byte0 + 256, self.byte0 + 256 + len(SPECIALS))
        self.n_vocab = self.byte0 + 256 + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        out = []
        for ch in text:
            i = self.index.get(ch)
            if i is None:
                out.extend(self.byte0 + b for b in ch.encode("utf-8"))
            else:
                out.append(i)
        return out

    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        buf = bytearray()
        for i in ids:
            i = int(i)
            if i < self.byte0:
                buf += self.chars[i].encode("utf-8")
            elif i < self.byte0 + 256:
                buf.append(i - self.byte0)
            elif i < self.n_vocab:
                buf += SPECIALS[i - self.byte0 - 256].encode("utf-8")
            else:
                raise ValueError(f"token id {i} is outside the vocabulary ({self.n_vocab})")
        return buf.decode("utf-8", errors="replace")


Tokenizer = BpeTokenizer | CharTokenizer


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str, name: str) -> BpeTokenizer:
    """A rustbpe byte-level BPE of `vocab_size - 3` ids + the specials, as tiktoken."""
    import rustbpe  # here, not at the top: a char-tokenizer run never needs it

    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIALS), pattern=pattern)
    ranks = {bytes(b): r for b, r in trainer.get_mergeable_ranks()}
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
    return BpeTokenizer(tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks,
                                          special_tokens=specials))


def train_char(texts: Iterable[str]) -> CharTokenizer:
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    return CharTokenizer(sorted(chars))


def tokenizer_to_json(tok: Tokenizer) -> dict:
    """The self-contained file form (see module docstring)."""
    if isinstance(tok, BpeTokenizer):
        enc = tok.encoding
        return {"format": FORMAT, "kind": "bpe", "name": enc.name, "pat_str": enc._pat_str,
                "mergeable_ranks": {base64.b64encode(b).decode("ascii"): r
                                    for b, r in sorted(enc._mergeable_ranks.items(), key=lambda kv: kv[1])},
                "special_tokens": dict(enc._special_tokens)}
    return {"format": FORMAT, "kind": "char", "chars": tok.chars,
            "special_tokens": {s: i for s, i in zip(SPECIALS, (tok.bos_id, tok.eos_id, tok.pad_id))}}


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved in folder `path` (e.g. data/tokenizer) or file `path`."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    d = json.loads(path.read_text(encoding="utf-8"))
    if d.get("format") != FORMAT:
        raise TokenizerError(f"{path}: not a {FORMAT} file (format={d.get('format')!r})")
    if d["kind"] == "char":
        return CharTokenizer(d["chars"])
    return BpeTokenizer(tiktoken.Encoding(
        name=d["name"], pat_str=d["pat_str"],
        mergeable_ranks={base64.b64decode(k): v for k, v in d["mergeable_ranks"].items()},
        special_tokens=d["special_tokens"]))


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


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def run(cfg: TokenizerStage, seed: int, progress: bool = True) -> dict:
    """Split, train, encode, write, check; write and return the stage metrics.

    `seed` is accepted for the common stage interface; nothing here is random
    (rustbpe training is deterministic and the split depends on doc_ids only).
    """
    t_start = time.perf_counter()
    data, tc = cfg.data, cfg.tokenizer
    docs_path = Path(data.raw_dir) / data.source / "docs.parquet"
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

    tok_dir, tokens_dir = Path(tc.dir), Path(tc.tokens_dir)
    for d in (tok_dir, tokens_dir):
        d.parent.mkdir(parents=True, exist_ok=True)
    tmp_tok = Path(tempfile.mkdtemp(prefix=f".tmp-{tok_dir.name}-", dir=tok_dir.parent))
    tmp_tokens = Path(tempfile.mkdtemp(prefix=f".tmp-{tokens_dir.name}-", dir=tokens_dir.parent))
    try:
        write_json(tmp_tok / "tokenizer.json", tokenizer_to_json(tok))
        tok_sha = sha256_file(tmp_tok / "tokenizer.json")
        train_tokens, train_enc_s, train_cpu_s = write_shard(tok, train_texts, tmp_tokens / "train.bin",
                                                             dtype, progress)
        val_tokens, val_enc_s, val_cpu_s = write_shard(tok, val_texts, tmp_tokens / "val.bin", dtype, progress)
        text_bytes = sum(len(t.encode("utf-8")) for t in texts)
        val_bytes = sum(len(t.encode("utf-8")) for t in val_texts)
        common = {"kind": tok.kind, "vocab_size": tok.n_vocab, "bos_id": tok.bos_id,
                  "eos_id": tok.eos_id, "pad_id": tok.pad_id, "tokenizer_sha256": tok_sha}
        write_json(tmp_tok / "meta.json", {
            **common, "format": FORMAT, "vocab_size_requested": tc.vocab_size,
            "split_pattern": tc.split_pattern if tc.kind == "bpe" else None,
            "source": data.source, "trained_on_docs": len(train_texts),
            "trained_on_bytes": text_bytes - val_bytes, "train_s": round(train_s, 3)})
        write_json(tmp_tokens / "meta.json", {
            **common, "dtype": dtype, "train_tokens": train_tokens, "val_tokens": val_tokens,
            "val_bytes": val_bytes, "bytes_per_token_val": val_bytes / val_tokens,
            "layout": "flat ids; each document is preceded by bos_id",
            "source": data.source, "docs_sha256": sha256_file(docs_path),
            "split": {"method": "first max(1, round(val_fraction*n)) documents by sha256(doc_id)",
                      "val_fraction": data.val_fraction, "train_docs": len(train_texts),
                      "val_docs": len(val_texts), "val_doc_ids": val_ids}})
        sanity_check(tmp_tok, tmp_tokens, dtype, val_texts, tc.sanity_docs)
        _swap_into_place(tmp_tok, tok_dir)
        _swap_into_place(tmp_tokens, tokens_dir)
    finally:
        for d in (tmp_tok, tmp_tokens):
            if d.exists():
                shutil.rmtree(d)

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


def check_params(params: dict) -> TokenizerConfig:
    """The `tokenizer` section (pipeline.params.check_file, and the stages that read it)."""
    return load_section(TokenizerConfig, "tokenizer", params=params)


def main() -> None:
    from pipeline import tracking

    try:
        params = read_params()
        validate(params, [data_config.check_params, check_params, tracking.check_params])
        cfg = TokenizerStage(data=data_config.check_params(params), tokenizer=check_params(params))
        seed = params.get("seed", 0)
        tcfg = load_section(tracking.TrackingConfig, "tracking", params=params)
        manifest = Path(cfg.data.raw_dir) / cfg.data.source / "manifest.json"
        with tracking.stage_run("tokenizer", params=cfg, config=tcfg,
                                manifest=manifest if manifest.exists() else None) as tracker:
            metrics = run(cfg, seed)
            tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))
                                 and not isinstance(v, bool)}, step=0)
            for name in ("tokenizer.json", "meta.json"):
                tracker.log_artifact(Path(cfg.tokenizer.dir) / name, artifact_path="tokenizer")
            tracker.log_artifact(Path(cfg.tokenizer.tokens_dir) / "meta.json", artifact_path="tokens")
    except (ParamsError, TokenizerError) as e:
        fail("tokenizer", e)
    print(f"tokenizer: {metrics['kind']} vocab {metrics['vocab_size']}, "
          f"{metrics['train_tokens']:,} train / {metrics['val_tokens']:,} val tokens, "
          f"{metrics['bytes_per_token_val']:.2f} bytes/token on val, "
          f"encode {metrics['encode_mb_per_s']:.1f} MB/s, {metrics['wall_s']:.1f}s")


__all__ = ["TokenizerConfig", "TokenizerStage", "BpeTokenizer", "CharTokenizer", "load_tokenizer",
           "train_bpe", "train_char", "split_val", "run"]

if __name__ == "__main__":
    main()
