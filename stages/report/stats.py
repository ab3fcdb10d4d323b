"""The report's statistics, pure: no files, no figures. Over the seeds of one variant, a
mean with its Student-t interval; against the reference variant, the difference of means
with a Welch interval; and a verdict that claims only what that interval supports.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from pipeline.metrics import METRICS


def t_critical(confidence: float, df: float) -> float:
    """Two-sided Student-t critical value: P(|T_df| <= t) = confidence."""
    return float(sps.t.ppf(0.5 + confidence / 2.0, df))


@dataclass(frozen=True)
class MeanCI:
    """Mean over seeds with a t-interval; `half` is None for a single seed."""

    n: int
    mean: float
    sd: float  # sample standard deviation (ddof=1); nan for n = 1
    half: float | None

    @property
    def lo(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def hi(self) -> float | None:
        return None if self.half is None else self.mean + self.half


def mean_ci(values: list[float] | np.ndarray, confidence: float) -> MeanCI:
    """Mean ± t_{(1+c)/2, n-1} · s/√n over seeds."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("mean_ci of no values")
    mean = float(x.mean())
    if x.size == 1:
        return MeanCI(1, mean, float("nan"), None)
    sd = float(x.std(ddof=1))
    return MeanCI(int(x.size), mean, sd, t_critical(confidence, x.size - 1) * sd / math.sqrt(x.size))


@dataclass(frozen=True)
class Diff:
    """mean(a) − mean(b) with a Welch interval; lo/hi None when either side has one seed."""

    estimate: float
    lo: float | None
    hi: float | None
    df: float | None


def welch_diff(a: MeanCI, b: MeanCI, confidence: float) -> Diff:
    """Difference of means with the Welch–Satterthwaite interval (unequal variances)."""
    est = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Diff(est, None, None, None)
    va, vb = a.sd ** 2 / a.n, b.sd ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0.0:  # identical seeds on both sides: the difference is exact
        return Diff(est, est, est, float("inf"))
    df = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))
    half = t_critical(confidence, df) * se
    return Diff(est, est - half, est + half, df)


@dataclass(frozen=True)
class Ratio:
    """mean(a) / mean(b) with Fieller's interval; lo/hi None with one seed, inf when the
    denominator's own interval contains zero (the ratio is then unbounded)."""

    estimate: float
    lo: float | None
    hi: float | None


def fieller_ratio(a: MeanCI, b: MeanCI, confidence: float) -> Ratio:
    """Ratio of two independent means with Fieller's interval: every R with
    (ā − R·b̄)² ≤ t²·(s_a²/n_a + R²·s_b²/n_b), t at the Welch–Satterthwaite df of that
    variance at R = ā/b̄ (Fieller 1954; the usual interval for a PC/BP loss ratio)."""
    est = a.mean / b.mean if b.mean else float("nan")
    if a.n < 2 or b.n < 2 or not math.isfinite(est):
        return Ratio(est, None, None)
    va, vb = a.sd ** 2 / a.n, b.sd ** 2 / b.n
    var = va + est ** 2 * vb
    if var == 0.0:
        return Ratio(est, est, est)
    df = var ** 2 / (va ** 2 / (a.n - 1) + (est ** 2 * vb) ** 2 / (b.n - 1))
    t2 = t_critical(confidence, df) ** 2
    qa = b.mean ** 2 - t2 * vb
    if qa <= 0.0:
        return Ratio(est, -math.inf, math.inf)
    qb, qc = a.mean * b.mean, a.mean ** 2 - t2 * va
    root = math.sqrt(max(qb ** 2 - qa * qc, 0.0))
    return Ratio(est, (qb - root) / qa, (qb + root) / qa)


def verdict(diff: Diff, metric: str, reference: str) -> tuple[str, str]:
    """Plain-language verdict and its kind (better/worse/neutral/na), claiming only what the interval supports."""
    spec = METRICS[metric]
    if diff.lo is None or diff.hi is None:
        return "1 seed: no interval", "na"
    if not all(math.isfinite(v) for v in (diff.estimate, diff.lo, diff.hi)):
        return "not computable (non-finite values)", "na"
    if diff.lo <= 0.0 <= diff.hi:
        return "no detectable difference", "neutral"
    higher = diff.lo > 0.0
    good = higher == (spec.better == "higher")
    return (f"{'higher' if higher else 'lower'} {spec.label} than {reference} "
            f"({'better' if good else 'worse'})", "better" if good else "worse")


@dataclass
class VariantSummary:
    """One row of an ablation table."""

    variant: str
    question: str
    description: str
    override: dict[str, Any]
    seeds: list[int]
    stats: dict[str, MeanCI]  # metric -> mean ± CI over seeds
    diff: Diff | None  # None for the reference itself
    verdict: str
    kind: str
    versus: str = ""  # the run the difference is taken against
    max_abs: float | None = None  # equivalence checks: largest |difference| of a seed to its twin


EQUIVALENCE_RTOL = 1e-4
"""Equal "up to rounding": two constructions of the same gradient sum in another order in
float32, and 300 AdamW steps carry that into the 6th digit of the val loss (measured 3e-6)."""


def equivalence_verdict(diff: Diff, max_abs: float | None, versus: str, scale: float = 1.0) -> tuple[str, str]:
    """An equivalence check passes when the seeds match their twins of `versus` exactly or up
    to rounding (EQUIVALENCE_RTOL of `scale`, the metric's size), or at least the interval of
    the difference contains zero; otherwise the construction failed."""
    if max_abs is not None and max_abs == 0.0:
        return f"identical to {versus} on every seed (as constructed)", "neutral"
    if max_abs is not None and max_abs <= EQUIVALENCE_RTOL * abs(scale):
        return f"equal to {versus} on every seed up to float rounding (largest |Δ| {max_abs:.1g})", "neutral"
    if diff.lo is not None and diff.hi is not None and diff.lo <= 0.0 <= diff.hi:
        suffix = f", largest per-seed |Δ| {max_abs:.2g}" if max_abs is not None else ""
        return f"no detectable difference from {versus}{suffix}", "neutral"
    return f"differs from {versus}: the equivalence does not hold", "worse"


def summarize_ablation(runs: pd.DataFrame, metric: str, table_metrics: list[str], reference: str,
                       confidence: float) -> dict[str, VariantSummary]:
    """Per variant: mean ± CI of `metric` and the table's metrics, the difference of `metric`
    to the run it is compared with (its `versus` column, else `reference`) and the verdict.

    `runs` holds one row per variant x seed: the grid's items and the pretrain runs they are
    compared with (the reference among them). Variants keep the order in which they first
    appear in `runs`.
    """
    metrics = list(dict.fromkeys([metric, *table_metrics, "perf/step_ms", "pc/settle_steps", "wall_s"]))
    out: dict[str, VariantSummary] = {}
    values: dict[str, dict[int, float]] = {}
    for variant, group in runs.groupby("variant", sort=False):
        first = group.iloc[0]
        # The decision metric always gets stats (a diverged seed's NaN makes them NaN and the
        # verdict "not computable"); other metrics only where every seed reports them (bp has
        # no pc/settle_steps).
        st = {m: mean_ci(group[m].to_numpy(dtype=float), confidence)
              for m in metrics if m in group and (m == metric or group[m].notna().all())}
        versus = first["versus"] if "versus" in group and not pd.isna(first["versus"]) else ""
        out[str(variant)] = VariantSummary(
            variant=str(variant), question=str(first["question"]), description=str(first["description"]),
            override=json.loads(first["override"]), seeds=sorted(int(s) for s in group["seed"]),
            stats=st, diff=None, verdict="", kind="", versus=str(versus or reference))
        values[str(variant)] = dict(zip((int(s) for s in group["seed"]), group[metric].astype(float)))
    for s in out.values():
        if s.variant == reference:
            s.verdict, s.kind, s.versus = "reference", "ref", ""
            continue
        if s.versus not in out:
            s.verdict, s.kind = f"not computable: no runs of {s.versus}", "na"
            continue
        s.diff = welch_diff(s.stats[metric], out[s.versus].stats[metric], confidence)
        if s.question == "equivalence":
            twins = values[s.versus]
            pairs = [abs(v - twins[seed]) for seed, v in values[s.variant].items() if seed in twins]
            s.max_abs = max(pairs) if pairs else None
            s.verdict, s.kind = equivalence_verdict(s.diff, s.max_abs, s.versus, s.stats[metric].mean)
        else:
            s.verdict, s.kind = verdict(s.diff, metric, s.versus)
    return out
