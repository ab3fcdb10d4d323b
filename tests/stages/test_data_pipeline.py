"""`dvc repro` of the download and tokenizer stages in a throwaway git+DVC copy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import SHAKESPEARE

pytestmark = pytest.mark.slow
TARGETS = ("download", "tokenizer")


def ran(proc) -> set[str]:
    """Names of the stages a `dvc repro` actually executed."""
    return {s for s in TARGETS if f"Running stage '{s}'" in proc.stdout}


def test_repro_local_source_then_noop_then_only_tokenizer(project):
    text = SHAKESPEARE.read_text()[:120_000]
    (project.path / "corpus").mkdir()
    for i in range(6):
        (project.path / "corpus" / f"part{i}.txt").write_text(text[i * 20_000:(i + 1) * 20_000])
    project.set_params({"data": {"source": "local", "val_fraction": 0.2},
                        "tokenizer": {"kind": "bpe", "vocab_size": 300}})
    project.commit("local corpus")

    first = project.dvc("repro", "tokenizer")
    assert ran(first) == {"download", "tokenizer"}
    p = project.path
    for f in ("data/raw/local/docs.parquet", "data/raw/local/manifest.json", "data/tokenizer/tokenizer.json",
              "data/tokens/train.bin", "data/tokens/val.bin", "data/tokens/meta.json",
              "metrics/download.json", "metrics/tokenizer.json"):
        assert (p / f).is_file(), f
    meta = json.loads((p / "data/tokens/meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["split"]["val_docs"] == 1
    assert json.loads((p / "metrics/download.json").read_text())["documents"] == 6
    assert "Data and pipelines are up to date" in project.dvc("status", *TARGETS).stdout

    second = project.dvc("repro", "tokenizer")
    assert ran(second) == set()

    project.set_params({"tokenizer": {"vocab_size": 320}})
    third = project.dvc("repro", "tokenizer")
    assert ran(third) == {"tokenizer"}
    assert json.loads((p / "data/tokens/meta.json").read_text())["vocab_size"] == 320
    assert "Data and pipelines are up to date" in project.dvc("status", *TARGETS).stdout

    project.set_params({"data": {"val_fraction": 0.4}})  # a tokenizer param only
    assert ran(project.dvc("repro", "tokenizer")) == {"tokenizer"}


def test_repro_synthetic_source_with_char_tokenizer(project):
    project.set_params({"data": {"source": "synthetic",
                                 "catalog": {"synthetic": {"n_docs": 30, "min_len": 4, "max_len": 10}}},
                        "tokenizer": {"kind": "char"}})
    project.commit("synthetic")
    assert ran(project.dvc("repro", "tokenizer")) == {"download", "tokenizer"}
    meta = json.loads((project.path / "data/tokens/meta.json").read_text())
    # a..h, >, A..H, 0..9, ?, y, n: 30 characters (+ 256 byte ids + 3 specials)
    assert meta["kind"] == "char" and meta["vocab_size"] == 30 + 256 + 3
    assert meta["split"]["train_docs"] + meta["split"]["val_docs"] == 90
    train = np.fromfile(project.path / "data/tokens/train.bin", dtype=meta["dtype"])
    assert (train == meta["bos_id"]).sum() == meta["split"]["train_docs"]
    assert "Data and pipelines are up to date" in project.dvc("status", *TARGETS).stdout

    project.set_params({"seed": 1338})  # new synthetic data: both stages run again
    assert ran(project.dvc("repro", "tokenizer")) == {"download", "tokenizer"}


def test_repro_with_an_unknown_source_fails_and_writes_nothing(project):
    project.set_params({"data": {"source": "nope"}})
    proc = project.dvc("repro", "download", check=False)
    assert proc.returncode != 0
    assert "data.source: unknown source 'nope'" in proc.stdout + proc.stderr
    assert not (project.path / "data").exists() or not any((project.path / "data").rglob("*.parquet"))
    assert not (project.path / "metrics" / "download.json").exists()
