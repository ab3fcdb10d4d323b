"""Stage `download`: fetch the corpus named by `data.source` and store it as documents.

Reads:  params.yaml `seed`, `data` (the source is `data.catalog[data.source]`, see
        stages/data_config.py and stages/data_sources.py for the kinds) and `tracking`,
        all checked before any work.
Writes: data/raw/<source>/docs.parquet   one row per document: doc_id, text, source
        data/raw/<source>/manifest.json  every file read (name, bytes, sha256), totals
        metrics/download.json            counts and wall_s
        an MLflow stage run (pipeline/tracking.py): metrics, the manifest and its sha256
        (downloads are also kept, verified, under data/cache/: not a DVC output,
        so a re-run does not fetch them again)
Run:    python -m stages.download        (or `dvc repro download`)

The corpus folder is built beside its destination and renamed into place, so
a failure (unknown source, hash mismatch, network down after the retries,
empty corpus, bad bytes, unsafe archive) leaves nothing half-written.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.io import atomic_dir, sha256_file, write_json
from pipeline.metrics import numeric
from pipeline.params import ParamsError, check_seed, fail, load_section, read_params, validate
from stages import data_config
from stages._fetch import DownloadError
from stages.data_config import DataConfig
from stages.data_sources import CorpusError, read_source


def build_corpus(cfg: DataConfig, seed: int, progress: bool = True) -> tuple[pa.Table, dict]:
    """Read the chosen source into a (doc_id, text, source) table and its manifest."""
    spec = cfg.spec
    docs, files = read_source(spec, seed, Path(cfg.cache_dir), cfg.fetch, progress)
    kept = [(i, t) for i, t in docs if t]
    if not kept:
        raise CorpusError(f"source {cfg.source!r}: empty corpus (no non-empty documents)")
    ids = [i for i, _ in kept]
    if len(set(ids)) != len(ids):
        dup = Counter(ids).most_common(1)[0][0]
        raise CorpusError(f"source {cfg.source!r}: duplicate doc_id {dup!r}")
    texts = [t for _, t in kept]
    table = pa.table({
        "doc_id": pa.array(ids, pa.string()),
        "text": pa.array(texts, pa.large_string()),
        "source": pa.array([cfg.source] * len(kept), pa.string()),
    })
    manifest = {
        "source": cfg.source,
        "kind": spec.kind,
        "files": files,
        "documents": len(kept),
        "empty_documents_dropped": len(docs) - len(kept),
        "characters": sum(len(t) for t in texts),
        "utf8_bytes": sum(len(t.encode("utf-8")) for t in texts),
    }
    return table, manifest


def write_corpus(out_dir: Path, table: pa.Table, manifest: dict) -> None:
    """docs.parquet + manifest.json, as one folder that replaces `out_dir` whole."""
    with atomic_dir(out_dir) as tmp:
        pq.write_table(table, tmp / "docs.parquet")
        write_json(tmp / "manifest.json", manifest)


def run(cfg: DataConfig, seed: int, progress: bool = True) -> dict:
    """Fetch, build and write the corpus; write and return the stage metrics."""
    t0 = time.perf_counter()
    table, manifest = build_corpus(cfg, seed, progress)
    write_corpus(cfg.corpus_dir, table, manifest)
    metrics = {
        "source": cfg.source,
        "documents": manifest["documents"],
        "characters": manifest["characters"],
        "utf8_bytes": manifest["utf8_bytes"],
        "files": len(manifest["files"]),
        "downloaded_bytes": sum(f["bytes"] for f in manifest["files"] if f.get("cached") is False),
        "wall_s": round(time.perf_counter() - t0, 3),
    }
    write_json(cfg.metrics_file, metrics)
    return metrics


def main() -> None:
    from pipeline import tracking

    try:
        params = read_params()
        validate(params, [check_seed, data_config.check_data, tracking.check_params])
        cfg, seed = data_config.check_data(params), check_seed(params)
        tcfg = load_section(tracking.TrackingConfig, "tracking", params=params)
        with tracking.stage_run("download", params=cfg, config=tcfg) as tracker:
            metrics = run(cfg, seed)
            manifest = cfg.manifest_path
            tracker.set_tags({"data.manifest_sha256": sha256_file(manifest)})
            tracker.log_metrics(numeric(metrics), step=0)
            tracker.log_artifact(manifest)
    except (ParamsError, DownloadError, CorpusError) as e:
        fail("download", e)
    print(f"download: {metrics['documents']:,} documents, {metrics['characters']:,} characters "
          f"from {metrics['source']!r} in {metrics['wall_s']:.1f}s")


if __name__ == "__main__":
    main()
