"""Verified HTTP downloads and the package index's simple API (PEP 503).

`fetch_verified(url, dest, sha256, cfg)` streams a file to `<dest>.part` with a
progress bar, resumes a partial file with an HTTP Range request, retries
connection errors, timeouts, 5xx, 408 and 429 with exponential backoff, and
moves the file to `dest` only after its sha256 matches the pinned one. A file
already at `dest` with the right hash is not fetched again (the cache).

`find_sdist_url(index_url, package, version)` reads the index's project page
(`<index>/<normalised name>/`, PEP 503) and returns the sdist's link;
`pip_index_url()` is the index pip is configured to use, so mirrors and
proxies work. Only the standard library's urllib is used (it also honours the
usual `http(s)_proxy` environment variables).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

from tqdm import tqdm

from pipeline.io import sha256_file
from stages.data_config import FetchConfig

DEFAULT_INDEX_URL = "https://pypi.org/simple"
USER_AGENT = "pcgpt-download/0.1"
CHUNK = 1 << 16
SDIST_EXTENSIONS = (".tar.gz", ".tgz", ".tar.bz2", ".zip")


class DownloadError(RuntimeError):
    """A download failed for good (after retries, or a hash mismatch)."""


class _RetryableError(Exception):
    """A failure worth another attempt (network, timeout, 5xx, short read)."""


# --- urllib with separate connect and read timeouts ---------------------------

class _ReadTimeout:
    """`timeout` bounds the connect; `read_timeout` then bounds every read."""

    def __init__(self, *args, read_timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout

    def connect(self) -> None:
        super().connect()
        self.sock.settimeout(self.read_timeout)


class _HTTPConnection(_ReadTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ReadTimeout, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self.read_timeout = read_timeout

    def http_open(self, req):
        return self.do_open(_HTTPConnection, req, read_timeout=self.read_timeout)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, read_timeout: float):
        super().__init__()
        self.read_timeout = read_timeout

    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context,
                            read_timeout=self.read_timeout)


def _open(url: str, cfg: FetchConfig, headers: dict[str, str] | None = None):
    opener = urllib.request.build_opener(_HTTPHandler(cfg.read_timeout_s),
                                         _HTTPSHandler(cfg.read_timeout_s))
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, **(headers or {})})
    return opener.open(req, timeout=cfg.connect_timeout_s)


def _classify(err: BaseException) -> BaseException:
    """Wrap retryable failures in _RetryableError; return others unchanged."""
    if isinstance(err, urllib.error.HTTPError):
        if err.code >= 500 or err.code in (408, 429):
            return _RetryableError(f"HTTP {err.code} {err.reason}")
        return err
    if isinstance(err, (urllib.error.URLError, http.client.HTTPException, socket.timeout,
                        TimeoutError, ConnectionError, OSError)):
        reason = getattr(err, "reason", None) or err
        return _RetryableError(f"{type(err).__name__}: {reason}")
    return err


def _with_retries(what: str, cfg: FetchConfig, attempt_fn):
    """Call attempt_fn() until it succeeds, sleeping backoff_s * 2**k between tries."""
    last = None
    for attempt in range(cfg.retries + 1):
        if attempt:
            delay = min(cfg.backoff_max_s, cfg.backoff_s * 2 ** (attempt - 1))
            print(f"{what}: {last}; retry {attempt}/{cfg.retries} in {delay:.1f}s", file=sys.stderr)
            time.sleep(delay)
        try:
            return attempt_fn()
        except (_RetryableError, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            err = e if isinstance(e, _RetryableError) else _classify(e)
            if not isinstance(err, _RetryableError):
                code = f"HTTP {err.code} {err.reason}" if isinstance(err, urllib.error.HTTPError) else err
                raise DownloadError(f"{what}: {code} (not retried)") from e
            last = err
    raise DownloadError(f"{what}: failed after {cfg.retries + 1} attempts; last error: {last}")


# --- the verified downloader --------------------------------------------------

def _attempt(url: str, part: Path, cfg: FetchConfig, progress: bool) -> None:
    """One GET of `url` into `part`, continuing from its current size."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        resp = _open(url, cfg, headers)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # our partial file is no prefix the server knows: start over
            part.unlink(missing_ok=True)
            raise _RetryableError("HTTP 416 on resume; restarting from byte 0") from e
        raise
    with resp:
        if offset and resp.status == 206:
            m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                part.unlink(missing_ok=True)
                raise _RetryableError(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
            mode = "ab"
        else:  # 200: the server ignored the Range header (or there was none)
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        expected = offset + int(length) if length is not None else None
        done = offset
        with open(part, mode) as f, tqdm(total=expected, initial=offset, unit="B", unit_scale=True,
                                         unit_divisor=1024, desc=part.name[:-5], leave=False,
                                         disable=not progress) as bar:
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
        if expected is not None and done < expected:
            raise _RetryableError(f"connection closed after {done:,} of {expected:,} bytes")


def fetch_verified(url: str, dest: str | Path, sha256: str, cfg: FetchConfig,
                   progress: bool = True) -> dict:
    """Download `url` to `dest` unless it is already there with hash `sha256`.

    Returns {name, url, bytes, sha256, cached}. Raises DownloadError on a hash
    mismatch (saying expected vs got; the bytes are deleted) or when the last
    retry fails (the partial file is deleted too). Only an interrupt
    (Ctrl-C, kill) leaves `<dest>.part` behind, which the next call resumes.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        got = sha256_file(dest)
        if got == sha256:
            return {"name": dest.name, "url": url, "bytes": dest.stat().st_size,
                    "sha256": got, "cached": True}
        dest.unlink()  # a stale or tampered cache entry: fetch again
    part = dest.with_name(dest.name + ".part")
    try:
        _with_retries(f"download {url}", cfg, lambda: _attempt(url, part, cfg, progress))
        got = sha256_file(part)
        if got != sha256:
            size = part.stat().st_size
            raise DownloadError(f"sha256 mismatch for {url}: expected {sha256}, got {got} "
                                f"({size:,} bytes); the file was deleted")
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return {"name": dest.name, "url": url, "bytes": dest.stat().st_size, "sha256": got,
            "cached": False}


# --- PEP 503 simple API -------------------------------------------------------

def pip_index_url() -> str:
    """The index pip would use: PIP_INDEX_URL, else pip's config, else PyPI.

    Reads `pip config list` (pip's own view of its config files, e.g.
    `global.index-url` in pip.conf); nothing is installed or executed.
    """
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"].split()[0]
    try:
        out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    found = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found[key.strip()] = value.strip().strip("'\"")
    for key in (":env:.index-url", "install.index-url", "global.index-url"):
        if found.get(key):
            return found[key].split()[0]
    return DEFAULT_INDEX_URL


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []  # (href, text)
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")
            self._text = []

    def handle_data(self, data):
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._href is not None:
            self.links.append((self._href, "".join(self._text).strip()))
            self._href = None


def normalise_name(name: str) -> str:
    """PEP 503 project-name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


def find_sdist_url(index_url: str, package: str, version: str, cfg: FetchConfig) -> tuple[str, str]:
    """(absolute URL, file name) of `package==version`'s sdist on a PEP 503 index."""
    if not index_url.startswith(("http://", "https://")):
        raise DownloadError(f"package index {index_url!r}: only http(s) indexes are supported")
    page = index_url.rstrip("/") + "/" + normalise_name(package) + "/"

    def get():
        with _open(page, cfg, {"Accept": "text/html"}) as resp:
            return resp.geturl(), resp.read().decode("utf-8", errors="replace")

    base, html = _with_retries(f"package index page {page}", cfg, get)
    parser = _Links()
    parser.feed(html)
    for href, _ in parser.links:
        url = urllib.parse.urljoin(base, href).split("#", 1)[0]
        fname = urllib.parse.unquote(urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1])
        for ext in SDIST_EXTENSIONS:
            if fname.lower().endswith(ext):
                name, _, ver = fname[: -len(ext)].rpartition("-")
                if normalise_name(name) == normalise_name(package) and ver == version:
                    return url, fname
    names = ", ".join(t for _, t in parser.links) or "no links"
    raise DownloadError(f"{page}: no sdist for {package}=={version} (found: {names})")
