"""The tokenizer stage on small corpora written here (tinyshakespeare slices, Unicode)."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
import yaml

from pipeline.params import ParamsError, build
from pipeline import tokenizer as lib
from stages import tokenizer as T
from stages.data_config import DataConfig, TokenizerConfig
from tests.conftest import ROOT, SHAKESPEARE
from tests.stages.test_download import run_main


def random_unicode(rng: random.Random, n: int) -> str:
    """Mixed scripts, emoji, combining marks, controls, lone whitespace runs."""
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x0300, 0x036F),
              (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x0, 0x1F), (0xAC00, 0xAC50)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)))
    return "".join(out)


def write_docs(raw_dir: Path, source: str, docs: list[tuple[str, str]]) -> None:
    (raw_dir / source).mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"doc_id": [d for d, _ in docs], "text": [t for _, t in docs],
                             "source": [source] * len(docs)}), raw_dir / source / "docs.parquet")


@pytest.fixture(scope="module")
def speeches() -> list[tuple[str, str]]:
    """~200 KB of Shakespeare (tests/data) as 40 documents."""
    text = SHAKESPEARE.read_text()
    parts = text.split("\n\n")
    k = len(parts) // 40
    return [(f"part{i:02d}", "\n\n".join(parts[i * k:(i + 1) * k])) for i in range(40)]


def stage_cfg(tmp_path: Path, source: str = "corpus", **tok) -> T.TokenizerStage:
    data = build(DataConfig, {"source": source, "raw_dir": str(tmp_path / "raw"), "val_fraction": 0.1,
                              "catalog": {source: {"kind": "local", "path": "unused"}}}, "data")
    tc = build(TokenizerConfig, {"dir": str(tmp_path / "tokenizer"), "tokens_dir": str(tmp_path / "tokens"),
                                   "metrics_file": str(tmp_path / "metrics" / "tokenizer.json"), **tok},
               "tokenizer")
    return T.TokenizerStage(data=data, tokenizer=tc)


def read_shard(tokens_dir: Path, split: str) -> np.ndarray:
    meta = json.loads((tokens_dir / "meta.json").read_text())
    return np.fromfile(tokens_dir / f"{split}.bin", dtype=meta["dtype"])


def test_bpe_stage_outputs_and_meta(tmp_path, speeches):
    write_docs(tmp_path / "raw", "corpus", speeches)
    cfg = stage_cfg(tmp_path, vocab_size=512)
    metrics = T.run(cfg, seed=0, progress=False)
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    tok = lib.load_tokenizer(tmp_path / "tokenizer")
    assert tok.n_vocab == meta["vocab_size"] == metrics["vocab_size"] == 512
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (509, 510, 511) == (meta["bos_id"], meta["eos_id"], meta["pad_id"])
    assert meta["dtype"] == "uint16" and meta["kind"] == "bpe"
    assert meta["split"]["val_docs"] == 4 and meta["split"]["train_docs"] == 36
    val_ids = set(meta["split"]["val_doc_ids"])
    by_id = dict(speeches)
    for split, ids in (("train", [d for d, _ in speeches if d not in val_ids]),
                       ("val", [d for d, _ in speeches if d in val_ids])):
        arr = read_shard(tmp_path / "tokens", split)
        assert len(arr) == meta[f"{split}_tokens"]
        starts = list(np.flatnonzero(arr == tok.bos_id)) + [len(arr)]
        assert starts[0] == 0 and len(starts) - 1 == len(ids)  # bos before every document
        decoded = [tok.decode(arr[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
        assert decoded == [by_id[d] for d in ids]
    val_bytes = sum(len(by_id[d].encode()) for d in val_ids)
    assert meta["bytes_per_token_val"] == pytest.approx(val_bytes / meta["val_tokens"])
    assert 2.0 < meta["bytes_per_token_val"] < 4.0  # a 512-id BPE on English: real compression
    assert meta["tokenizer_sha256"] == T.sha256_file(tmp_path / "tokenizer" / "tokenizer.json")
    assert set(metrics) >= {"vocab_size", "bytes_per_token_val", "train_s", "encode_s",
                            "encode_mb_per_s", "wall_s"}
    assert json.loads((tmp_path / "metrics" / "tokenizer.json").read_text()) == metrics


def test_bpe_round_trips_random_unicode(tmp_path, speeches):
    write_docs(tmp_path / "raw", "corpus", speeches)
    T.run(stage_cfg(tmp_path, vocab_size=400), seed=0, progress=False)
    tok = lib.load_tokenizer(tmp_path / "tokenizer")
    rng = random.Random(0)
    for _ in range(50):
        s = random_unicode(rng, rng.randint(0, 200))
        assert tok.decode(tok.encode(s)) == s
    batch = [random_unicode(rng, 100) for _ in range(20)]
    assert tok.encode_batch(batch) == [tok.encode(s) for s in batch]


def test_same_inputs_give_identical_files(tmp_path, speeches):
    write_docs(tmp_path / "raw", "corpus", speeches)
    files = ["tokenizer/tokenizer.json", "tokens/train.bin", "tokens/val.bin", "tokens/meta.json"]
    T.run(stage_cfg(tmp_path, vocab_size=600), seed=7, progress=False)
    first = {f: (tmp_path / f).read_bytes() for f in files}
    T.run(stage_cfg(tmp_path, vocab_size=600), seed=7, progress=False)
    assert {f: (tmp_path / f).read_bytes() for f in files} == first
    T.run(stage_cfg(tmp_path, vocab_size=700), seed=7, progress=False)
    assert (tmp_path / "tokens/train.bin").read_bytes() != first["tokens/train.bin"]


def test_tiktoken_rebuilt_from_the_file_alone_encodes_identically(tmp_path, speeches):
    write_docs(tmp_path / "raw", "corpus", speeches)
    T.run(stage_cfg(tmp_path, vocab_size=512), seed=0, progress=False)
    # Only json + base64 + tiktoken: nothing from this project.
    d = json.loads((tmp_path / "tokenizer" / "tokenizer.json").read_text())
    enc = tiktoken.Encoding(name=d["name"], pat_str=d["pat_str"], special_tokens=d["special_tokens"],
                            mergeable_ranks={base64.b64decode(k): v for k, v in d["mergeable_ranks"].items()})
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    by_id = dict(speeches)
    val_texts = [by_id[i] for i in meta["split"]["val_doc_ids"]]
    expected = []
    for t in val_texts:
        expected += [enc.encode_single_token("<|bos|>")] + enc.encode_ordinary(t)
    assert read_shard(tmp_path / "tokens", "val").tolist() == expected
    # and a freshly trained tokenizer (same inputs) agrees with the one from disk
    train_texts = [t for i, t in speeches if i not in set(meta["split"]["val_doc_ids"])]
    fresh = lib.train_bpe(train_texts, 512, lib.SPLIT_PATTERNS["gpt4"], "fresh")
    probe = val_texts[0] + random_unicode(random.Random(1), 300)
    assert fresh.encode(probe) == enc.encode_ordinary(probe) == lib.load_tokenizer(tmp_path / "tokenizer").encode(probe)


def test_char_tokenizer_with_byte_fallback(tmp_path):
    # every document has one character of its own, so the val ones are unseen in training
    docs = [(f"d{i}", "abc ünï\r\n" * (i + 1) + chr(0x4E00 + i)) for i in range(10)]
    write_docs(tmp_path / "raw", "corpus", docs)
    T.run(stage_cfg(tmp_path, kind="char"), seed=0, progress=False)
    tok = lib.load_tokenizer(tmp_path / "tokenizer")
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert tok.kind == "char" and meta["kind"] == "char" and meta["vocab_size"] == tok.n_vocab
    assert tok.n_vocab == len(set("abc ünï\r\n")) + 9 + 256 + 3  # 9 train docs, 1 val doc
    (val_id,) = meta["split"]["val_doc_ids"]
    unseen = chr(0x4E00 + int(val_id[1:]))
    assert unseen not in tok.chars and len(tok.encode(unseen)) == 3  # its 3 UTF-8 bytes
    val = read_shard(tmp_path / "tokens", "val")
    assert tok.decode(val[1:].tolist()) == dict(docs)[val_id]
    rng = random.Random(3)
    for _ in range(30):
        s = random_unicode(rng, 80)
        assert tok.decode(tok.encode(s)) == s


def test_uint32_shards_past_65536_ids(tmp_path):
    # A char vocabulary of ~72k CJK/Hangul characters: ids no longer fit uint16.
    chars = [chr(c) for c in range(0x4E00, 0x9FFF)] + [chr(c) for c in range(0xAC00, 0xD7A3)]
    chars = "".join(chars + [chr(c) for c in range(0x20000, 0x20000 + 40_000)])  # 72k distinct
    docs = [(f"d{i}", chars[i:] + chars[:i]) for i in range(4)]
    write_docs(tmp_path / "raw", "corpus", docs)
    T.run(stage_cfg(tmp_path, kind="char"), seed=0, progress=False)
    meta = json.loads((tmp_path / "tokens" / "meta.json").read_text())
    assert meta["vocab_size"] > 65536 and meta["dtype"] == "uint32"
    arr = read_shard(tmp_path / "tokens", "train")
    assert arr.dtype == np.uint32 and arr.max() > 65535


def test_split_is_deterministic_and_by_doc_id():
    ids = [f"doc{i}" for i in range(42)]
    mask = T.split_val(ids, 0.1)
    assert mask.sum() == 4
    shuffled = ids[::-1]
    assert {d for d, v in zip(shuffled, T.split_val(shuffled, 0.1)) if v} == {d for d, v in zip(ids, mask) if v}
    assert T.split_val(["a", "b"], 0.01).sum() == 1  # at least one val document
    with pytest.raises(lib.TokenizerError, match="at least 2"):
        T.split_val(["only"], 0.1)


def test_bad_tokenizer_params(tmp_path):
    with pytest.raises(ParamsError, match="tokenizer.vocab_sise: unknown key"):
        build(TokenizerConfig, {"vocab_sise": 100}, "tokenizer")
    with pytest.raises(ParamsError, match="tokenizer.kind: 'wordpiece' is not allowed"):
        build(TokenizerConfig, {"kind": "wordpiece"}, "tokenizer")
    with pytest.raises(ParamsError, match=r"tokenizer.vocab_size: must be in \[259"):
        build(TokenizerConfig, {"vocab_size": 100}, "tokenizer")


@pytest.mark.slow
def test_bad_tokenizer_params_through_the_entry_point(tmp_path):
    """One line, nothing written."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tokenizer"]["vocab_size"] = "2048"
    proc = run_main(tmp_path, params, module="stages.tokenizer")
    assert proc.returncode != 0 and "tokenizer.vocab_size: expected an integer" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


@pytest.mark.slow
def test_char_stage_never_imports_rustbpe(tmp_path, speeches):
    write_docs(tmp_path / "data/raw", "corpus", speeches[:6])
    params = {"data": {"source": "corpus", "catalog": {"corpus": {"kind": "local", "path": "unused"}}},
              "tokenizer": {"kind": "char"}, "tracking": {"enabled": False}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    code = ("import sys\nfrom stages.tokenizer import main\nmain()\n"
            "assert 'rustbpe' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "data/tokens/meta.json").read_text())["kind"] == "char"
