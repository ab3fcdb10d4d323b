"""stages/report/stats.py: intervals, Welch differences and verdicts against reference values
(statistics tables and scipy), no files."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from stages.report import stats


def test_t_critical_values_match_the_table():
    # Two-sided 95% Student-t critical values from any statistics table.
    for df, t in [(1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042)]:
        assert stats.t_critical(0.95, df) == pytest.approx(t, abs=1e-3)
    assert stats.t_critical(0.90, 4) == pytest.approx(2.132, abs=1e-3)


def test_mean_ci_and_welch_against_scipy():
    x = [3.0, 3.2, 3.4]
    ci = stats.mean_ci(x, 0.95)
    assert ci.mean == pytest.approx(3.2) and ci.sd == pytest.approx(0.2)
    assert ci.half == pytest.approx(4.302653 * 0.2 / math.sqrt(3), rel=1e-6)
    lo, hi = sps.t.interval(0.95, 2, loc=3.2, scale=sps.sem(x))
    assert (ci.lo, ci.hi) == pytest.approx((lo, hi))

    a, b = [2.1, 2.5, 2.2, 2.9], [3.0, 3.6, 2.7]
    d = stats.welch_diff(stats.mean_ci(a, 0.95), stats.mean_ci(b, 0.95), 0.95)
    ref = sps.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert d.estimate == pytest.approx(np.mean(a) - np.mean(b))
    assert (d.lo, d.hi) == pytest.approx((ref.low, ref.high))

    one = stats.mean_ci([3.0], 0.95)
    assert one.half is None and one.lo is None
    d1 = stats.welch_diff(one, ci, 0.95)
    assert d1.lo is None and stats.verdict(d1, "val/loss", "pcgpt") == ("1 seed: no interval", "na")


def test_verdict_claims_only_what_the_interval_supports():
    v = stats.verdict
    assert v(stats.Diff(-0.1, -0.2, -0.01, 4), "val/loss", "pcgpt") == \
        ("lower val loss than pcgpt (better)", "better")
    assert v(stats.Diff(0.1, 0.01, 0.2, 4), "val/loss", "pcgpt") == \
        ("higher val loss than pcgpt (worse)", "worse")
    assert v(stats.Diff(0.1, -0.01, 0.2, 4), "val/loss", "pcgpt") == ("no detectable difference", "neutral")
    # Higher accuracy is better: the direction follows the metric.
    assert v(stats.Diff(0.02, 0.01, 0.03, 4), "val/acc", "pcgpt") == \
        ("higher val accuracy than pcgpt (better)", "better")


def test_summary_per_variant_against_the_reference():
    runs = pd.DataFrame({
        "variant": ["ref"] * 3 + ["worse"] * 3 + ["one"],
        "seed": [0, 1, 2] * 2 + [0], "question": ["control"] * 3 + ["precision"] * 4,
        "description": ["r"] * 3 + ["w"] * 3 + ["o"], "override": ["{}"] * 7,
        "val/loss": [3.00, 3.02, 2.98, 3.10, 3.12, 3.08, 3.5], "val/acc": [0.5] * 7,
        "perf/step_ms": [10.0] * 7})
    summ = stats.summarize_ablation(runs, "val/loss", ["val/acc"], "ref", 0.95)
    assert list(summ) == ["ref", "worse", "one"]
    assert summ["ref"].verdict == "reference" and summ["ref"].diff is None
    assert summ["worse"].kind == "worse" and summ["worse"].diff.estimate == pytest.approx(0.1)
    assert summ["one"].verdict == "1 seed: no interval" and summ["one"].seeds == [0]
    assert "pc/settle_steps" not in summ["ref"].stats  # only metrics the runs report


def test_equivalence_checks_pass_on_twins_and_fail_on_a_real_difference():
    def rows(variant, losses, versus="", question="equivalence"):
        return pd.DataFrame({"variant": [variant] * 3, "seed": [0, 1, 2], "question": [question] * 3,
                             "description": ["d"] * 3, "override": ["{}"] * 3, "versus": [versus] * 3,
                             "val/loss": losses, "val/acc": [0.5] * 3})
    ref = rows("pcgpt", [3.0, 3.1, 2.9], question="control")
    bp = rows("bp", [2.50, 2.60, 2.55], question="control")
    cases = {"same": [2.50, 2.60, 2.55], "rounding": [2.500003, 2.599998, 2.55],
             "noise": [2.52, 2.58, 2.57], "off": [2.80, 2.90, 2.85]}
    runs = pd.concat([ref, bp, *(rows(k, v, "bp") for k, v in cases.items())])
    summ = stats.summarize_ablation(runs, "val/loss", [], "pcgpt", 0.95)
    assert summ["same"].verdict == "identical to bp on every seed (as constructed)"
    assert summ["rounding"].verdict.startswith("equal to bp on every seed up to float rounding")
    assert summ["noise"].verdict.startswith("no detectable difference from bp")
    assert summ["off"].verdict == "differs from bp: the equivalence does not hold" and summ["off"].kind == "worse"
    assert summ["off"].diff.estimate == pytest.approx(0.30)  # against `versus`, not the reference


def test_fieller_ratio_matches_the_defining_inequality_and_the_delta_method():
    import math

    from stages.report.stats import fieller_ratio, mean_ci, t_critical

    a = mean_ci([1.50, 1.52, 1.49], 0.95)
    b = mean_ci([1.47, 1.48, 1.46], 0.95)
    r = fieller_ratio(a, b, 0.95)
    assert r.lo < a.mean / b.mean < r.hi
    va, vb = a.sd ** 2 / a.n, b.sd ** 2 / b.n
    # the bounds are the roots of (a - R b)^2 = t^2 (va + R^2 vb) at the df used
    for bound in (r.lo, r.hi):
        lhs = (a.mean - bound * b.mean) ** 2
        est = a.mean / b.mean
        var = va + est ** 2 * vb
        df = var ** 2 / (va ** 2 / 2 + (est ** 2 * vb) ** 2 / 2)
        assert math.isclose(lhs, t_critical(0.95, df) ** 2 * (va + bound ** 2 * vb), rel_tol=1e-9)
    # small relative errors: close to the delta-method interval
    half = t_critical(0.95, df) * math.sqrt(var) / b.mean
    assert math.isclose(r.hi - r.lo, 2 * half, rel_tol=0.01)
    # a denominator indistinguishable from zero gives an unbounded interval
    z = fieller_ratio(a, mean_ci([-1.0, 0.5, 1.0], 0.95), 0.95)
    assert z.lo == -math.inf and z.hi == math.inf
    # one seed: no interval
    assert fieller_ratio(mean_ci([1.0], 0.95), b, 0.95).lo is None
