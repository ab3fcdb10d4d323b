"""pipeline.io: files and folders appear whole or not at all."""

from __future__ import annotations

import pytest

from pipeline.io import atomic_dir, atomic_path, write_json


class Boom(Exception):
    pass


def test_atomic_write_leaves_no_partial_file(tmp_path):
    dest = tmp_path / "out.json"
    write_json(dest, {"a": 1})
    assert dest.read_text().strip().startswith("{")

    with pytest.raises(Boom):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise Boom
    assert '"a": 1' in dest.read_text()          # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp left behind


def test_atomic_dir_replaces_the_folder_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "corpus"
    with atomic_dir(dest) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "b.txt").write_text("1")
        assert not dest.exists()  # nothing visible until the block completes
    assert sorted(p.name for p in dest.iterdir()) == ["a.txt", "b.txt"]

    with pytest.raises(Boom):
        with atomic_dir(dest) as tmp:
            (tmp / "a.txt").write_text("2")
            raise Boom
    assert (dest / "a.txt").read_text() == "1" and (dest / "b.txt").exists()  # untouched

    with atomic_dir(dest) as tmp:
        (tmp / "c.txt").write_text("3")
    assert sorted(p.name for p in dest.iterdir()) == ["c.txt"]  # replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no temp or old folder left
