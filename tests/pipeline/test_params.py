"""pipeline.params: typed sections fail before any work, naming the key."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.io import write_json
from pipeline.params import ParamsError, build, flatten, load_section, to_dict


@dataclass
class Inner:
    rate: float = 0.1
    kind: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str
    steps: int = 3
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)
    extra: dict[str, int] = field(default_factory=dict)
    maybe: int | None = None

    def __post_init__(self):
        if self.steps > 100:
            raise ValueError(f"steps={self.steps}: must be <= 100")


def test_builds_nested_and_coerces_int_to_float():
    cfg = build(Outer, {"name": "x", "inner": {"rate": 1, "kind": "b"}, "tags": ["t"],
                        "extra": {"k": 2}, "maybe": 4}, "sec")
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.kind == "b" and cfg.tags == ["t"] and cfg.extra == {"k": 2} and cfg.maybe == 4
    assert to_dict(cfg)["inner"] == {"rate": 1.0, "kind": "b"}
    assert flatten(to_dict(cfg))["inner.rate"] == 1.0


@pytest.mark.parametrize("data, message", [
    ({"name": "x", "stpes": 3}, "sec.stpes: unknown key"),
    ({"name": "x", "steps": "3"}, "sec.steps: expected an integer, got str '3'"),
    ({"name": "x", "steps": True}, "sec.steps: expected an integer"),
    ({"name": "x", "flag": "yes"}, "sec.flag: expected true or false"),
    ({"name": "x", "inner": {"kind": "c"}}, "sec.inner.kind: 'c' is not allowed (must be one of a, b)"),
    ({"name": "x", "inner": {"rat": 1}}, "sec.inner.rat: unknown key"),
    ({"name": "x", "tags": ["a", 2]}, "sec.tags[1]: expected a string"),
    ({"name": "x", "extra": {"k": 1.5}}, "sec.extra.k: expected an integer"),
    ({}, "sec.name: missing"),
    ({"name": "x", "steps": 500}, "sec: steps=500: must be <= 100"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ParamsError) as e:
        build(Outer, data, "sec")
    assert message in str(e.value)


def test_load_section_from_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("seed: 1\nsec:\n  name: x\n  steps: 4\n")
    assert load_section(Outer, "sec", p).steps == 4
    with pytest.raises(ParamsError, match="other: section missing"):
        load_section(Outer, "other", p)
    with pytest.raises(ParamsError, match="file not found"):
        load_section(Outer, "sec", tmp_path / "nope.yaml")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    dest = tmp_path / "out.json"
    write_json(dest, {"a": 1})
    assert dest.read_text().strip().startswith("{")

    class Boom(Exception):
        pass

    from pipeline.io import atomic_path
    with pytest.raises(Boom):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise Boom
    assert '"a": 1' in dest.read_text()          # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no temp left behind
