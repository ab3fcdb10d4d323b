"""The tokenizer library: train, save as JSON, load back. No stage code, no params.

Two kinds behind one `Tokenizer` protocol (ids in, text out; `bos_id`, `eos_id`,
`pad_id`, `n_vocab`):

- `BpeTokenizer`: a byte-level BPE trained with rustbpe (`train_bpe`) and served by a
  `tiktoken.Encoding`, with the specials `<|bos|>`, `<|eos|>`, `<|pad|>` after the
  merges, so `n_vocab` is the model's embedding size.
- `CharTokenizer`: one id per character seen in training, then 256 byte ids (a
  character outside the vocabulary is encoded as its UTF-8 bytes, so every string
  round-trips), then the three specials.

`tokenizer_to_json` gives the self-contained file form (`pat_str`,
`mergeable_ranks` as base64 token bytes -> rank, `special_tokens`: exactly the
arguments of `tiktoken.Encoding`); `load_tokenizer` rebuilds the tokenizer from that
file alone. The `tokenizer` stage writes it, the `pretrain` stage and the MLflow
model (which ships this module) read it.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Iterable, Protocol

import tiktoken

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
SPLIT_PATTERNS = {
    # GPT-4's cl100k_base pattern (tiktoken).
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    # nanochat's variant: numbers in pieces of at most 2 digits, fewer number
    # tokens for small vocabularies.
    "gpt4-digits2": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}
FORMAT = "pcgpt-tokenizer/1"
FORMAT = "pcgpt-tokenizer/1"


class TokenizerError(RuntimeError):
    """The corpus cannot be tokenized as asked, or a sanity check failed."""


class Tokenizer(Protocol):
    """What the stages and the generator use of a tokenizer."""

    kind: str
    bos_id: int
    eos_id: int
    pad_id: int

    @property
    def n_vocab(self) -> int: ...
    def encode(self, text: str) -> list[int]: ...
    def encode_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]: ...
    def decode(self, ids: Iterable[int]) -> str: ...


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
