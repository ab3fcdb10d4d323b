"""pipeline.params: typed sections fail before any work, naming the key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from pipeline.params import ParamsError, build, check_file, flatten, load_section, to_dict

ROOT = Path(__file__).resolve().parents[2]


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
    ({"name": "x", "steps": 500}, "sec.steps=500: must be <= 100"),
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


# ------------------------------------------------------------------ the whole-file check

# A complete params file of this test's own: every section, the headline's four runs, a small grid.
PARAMS = {
    "seed": 1,
    "seeds": [0, 1],
    "data": {"source": "synthetic", "catalog": {"synthetic": {
        "kind": "synthetic", "tasks": ["copy"], "n_docs": 10, "min_len": 4, "max_len": 8}}},
    "tokenizer": {"kind": "char"},
    "tracking": {"enabled": False},
    "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32,
              "attention": {"kernel": "dot", "precision": "fixed"}},
    "pc": {"algorithm": "bp"},
    "train": {"steps": 10, "micro_batch": 2},
    "runs": {"baseline": {},
             "bp_gaussian": {"model": {"attention": {"kernel": "gaussian", "precision": "head"}}},
             "pc_dot": {"pc": {"algorithm": "pc", "settle_steps": 2}},
             "pcgpt": {"model": {"attention": {"kernel": "gaussian", "precision": "head"}},
                       "pc": {"algorithm": "pc", "settle_steps": 2}}},
    "ablation": {"base": "pcgpt", "variants": {
        "bp": {"question": "algorithm", "override": {"pc": {"algorithm": "bp"},
                                                     "model": {"attention": {"kernel": "dot"}}}},
        "err_laplace": {"question": "distribution", "override": {"pc": {"error": "laplace"}}}}},
    "report": {"pcgpt_run": "pcgpt", "kernel_run": "bp_gaussian"},
}


def with_changes(*changes: tuple[str, object]) -> dict:
    """A deep copy of PARAMS with `(dotted.key.path, value)` set for every change."""
    params = json.loads(json.dumps(PARAMS))
    for path, value in changes:
        *parents, last = path.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return params


def test_a_complete_file_passes():
    assert check_file_dict(PARAMS) == []


@pytest.mark.parametrize("change, line", [
    (("train.lrr", 0.1), "train.lrr: unknown key (did you mean 'lr'?)"),
    (("train.steps", "many"), "train.steps: expected an integer, got str 'many'"),
    # every run overrides the kernel; the base section on its own still fails
    (("model.attention.kernel", "gauss"), "model.attention.kernel='gauss': must be one of dot, gaussian"),
    (("ablation.variants.err_laplace.override.pc.error", "laplce"),
     "pc.error='laplce': must be one of gaussian, student_t, laplace (after merging ablation.variants.err_laplace)"),
    (("runs.pcgpt.optim", {"lr": 1}), "runs.pcgpt.optim: unknown section (allowed: model, pc, train)"),
    (("report.kernel_run", "bp"), "report.kernel_run: 'bp' is not a run (known: baseline, bp_gaussian, pc_dot, pcgpt)"),
    (("seeds", [0, 0]), "seeds=[0, 0]: must not repeat"),
    (("extra", {"a": 1}), "extra: unknown section (known: "),
    (("data.source", "wiki"), "data.source: unknown source 'wiki' (catalog has: synthetic)"),
])
def test_each_problem_is_one_line_naming_its_key_path(change, line):
    params = with_changes(("runs.baseline.model", {"attention": {"kernel": "dot"}}), change)
    found = check_file_dict(params)
    assert len(found) == 1 and found[0].startswith(line), found


def test_every_problem_of_a_file_is_listed(tmp_path):
    params = with_changes(("train.steps", 0), ("tokenizer.kind", "wordpiece"),
                          ("runs.baseline.pc", {"algorithm": "magic"}),
                          ("ablation.variants.bp.override.model.n_embd", 30))
    found = check_file_dict(params)
    assert [f.split(":")[0] for f in found] == [
        "tokenizer.kind", "train.steps", "pc.algorithm='magic'", "model.n_embd=30"], found
    assert "(after merging runs.baseline)" in found[2] and "(after merging ablation.variants.bp)" in found[3]


def check_file_dict(params: dict) -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "params.yaml"
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        return check_file(path)


def test_check_command_exits_nonzero_and_never_imports_torch(tmp_path):
    """`python -m pipeline.params check`: one line per problem, exit 1; it reads the stages'
    schemas without importing torch (which alone takes about a second)."""
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(with_changes(("train.lrr", 1), ("pc.tol", -1.0)),
                                                      sort_keys=False))
    (tmp_path / "good.yaml").write_text(yaml.safe_dump(PARAMS))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bad = subprocess.run([sys.executable, "-m", "pipeline.params", "check", "bad.yaml"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1, bad.stderr
    lines = bad.stdout.splitlines()
    assert lines[0].startswith("bad.yaml: pc.tol=-1.0: must be") and lines[1].startswith("bad.yaml: train.lrr:")
    assert lines[2].startswith("bad.yaml: 2 problems") and len(lines) == 3
    code = ("import sys\nfrom pipeline.params import main\nrc = main(['check', 'good.yaml'])\n"
            "assert 'torch' not in sys.modules\nsys.exit(rc)\n")
    good = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert good.returncode == 0 and good.stdout.startswith("good.yaml: ok"), good.stdout + good.stderr


def test_the_shipped_params_file_passes_the_check():
    assert check_file(ROOT / "params.yaml") == []


def test_a_stage_checks_its_sections_before_any_work(tmp_path, monkeypatch):
    """The download stage reads `seed`, `data`, `tracking`: all their problems stop it at once."""
    from stages import download

    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(with_changes(
        ("seed", "x"), ("data.val_fraction", 2.0), ("tracking.flush_interval_s", 0),
        ("train.steps", "ignored by download"))))
    with pytest.raises(SystemExit) as e:
        download.main()
    lines = str(e.value.code).splitlines()
    assert [ln.split(":")[1].strip() for ln in lines] == ["error"] * 3
    assert ["seed" in lines[0], "data.val_fraction" in lines[1], "tracking.flush_interval_s" in lines[2]] == [True] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_broken_base_run_does_not_hide_a_broken_variant():
    params = with_changes(("runs.pcgpt.optim", {"lr": 1}), ("train.steps", "many"),
                          ("ablation.variants.err_laplace.override.pc.error", "laplce"))
    found = check_file_dict(params)
    assert [f.split(":")[0] for f in found] == ["train.steps", "runs.pcgpt.optim", "pc.error='laplce'"], found
