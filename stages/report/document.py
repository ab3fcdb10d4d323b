"""The report's document: the blocks of report.md / report.html (render.py turns them into
either), the figures drawn on the way (figures.py), the provenance table."""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.metrics import METRICS, QUESTION_TITLES, fmt_number, is_number
from pipeline.provenance import OUTPUT_PATHS, git_state
from stages.report import figures as figs
from stages.report.config import ReportConfig, ReportInputs
from stages.report.inputs import Inputs, ReportInputError
from stages.report.render import Badge, Block, Bullets, Heading, Note, Para, Samples, Table
from stages.report.stats import (Diff, MeanCI, Ratio, VariantSummary, fieller_ratio, mean_ci, summarize_ablation,
                                 verdict, welch_diff)

QUESTIONS = tuple(QUESTION_TITLES)  # the questions with a table (reference and control rows in each)


LIBRARIES = ("torch", "numpy", "pandas", "pyarrow", "scipy", "matplotlib", "dvc", "mlflow", "prefect",
             "tiktoken", "rustbpe", "safetensors")


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def stage_wall_clock(inputs: Inputs) -> list[tuple[str, float]]:
    """(stage, seconds) from each metrics file's wall_s: a pretrain run's seeds summed, the
    ablation items summed."""
    rows = [("download", float(inputs.download["wall_s"])), ("tokenizer", float(inputs.tokenizer["wall_s"]))]
    rows += [(f"pretrain@{run} ({len(seeds)} seeds, summed)", float(sum(m["wall_s"] for m in seeds.values())))
             for run, seeds in inputs.pretrain.items()]
    if inputs.ablate:
        rows.append((f"ablate ({len(inputs.ablate)} items, summed)",
                     float(sum(m["wall_s"] for m in inputs.ablate))))
    return rows


# -------------------------------------------------------------------- formatting

def fmt_mean_ci(s: MeanCI | None, metric: str) -> str:
    if s is None or not math.isfinite(s.mean):
        return "n/a"
    spec = METRICS[metric]
    if s.half is None:
        return spec.show(s.mean)
    return f"{spec.show(s.mean)} ± {fmt_number(s.half * spec.scale, spec.fmt)}"


def fmt_diff(d: Diff | None, metric: str) -> str:
    if d is None:
        return "—"
    if not math.isfinite(d.estimate):
        return "n/a"
    spec = METRICS[metric]
    sgn = "+" + spec.fmt
    est = fmt_number(d.estimate * spec.scale, sgn)
    if d.lo is None or d.hi is None:
        return est
    return f"{est} [{fmt_number(d.lo * spec.scale, sgn)}, {fmt_number(d.hi * spec.scale, sgn)}]"


def _with_unit(metric: str) -> str:
    spec = METRICS[metric]
    return f"{spec.label} ({spec.unit})" if spec.unit else spec.label


def _override_text(override: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {json.dumps(v)}" for k, v in override.items()) or "—"


def _values(inputs: Inputs, run: str, metric: str) -> list[float]:
    return [float(m[metric]) for m in inputs.pretrain[run].values() if is_number(m.get(metric))]


# -------------------------------------------------------------------- the PC regime

def bp_by_construction(pc: Any, n_layer: int) -> str | None:
    """Why training config `pc` gives backprop's weight gradients exactly (model/pc.py), or None."""
    if pc.algorithm == "bp":
        return "it is backprop"
    if pc.settle_steps == 0:
        return "T = 0 is defined as backprop"
    if (pc.algorithm == "pc" and pc.fixed_predictions and pc.settle_steps >= n_layer and pc.state_lr == 1.0
            and pc.state_momentum == 0 and pc.error == "gaussian" and pc.error_pathway == "full"
            and (pc.precondition or pc.precision == "fixed")):
        return (f"fixed predictions at equilibrium (T = {pc.settle_steps} ≥ n_layer = {n_layer}, state_lr 1): "
                "its weight gradients are backprop's for any β and π")
    return None


def regime_text(params: dict[str, Any] | None, run: str) -> str | None:
    """One sentence on the training regime of pretrain run `run` (None without params)."""
    if not params:
        return None
    from stages.pretrain.config import load_config

    cfg = load_config(run, params)
    pc, L = cfg.pc, cfg.model.n_layer
    if pc.algorithm == "bp":
        return None
    precision = ("fixed (π = 1)" if pc.precision == "fixed"
                 else f"{pc.precision}, updated by {pc.precision_update}")
    text = (f"{run} trains with `{pc.algorithm}`, {'fixed' if pc.fixed_predictions else 'free'} predictions, "
            f"T = {pc.settle_steps} settling steps (n_layer = {L}), state_lr {pc.state_lr:g}"
            f"{' (preconditioned)' if pc.precondition else ''}, β = {pc.output_weight:g}, layer precision "
            f"{precision}, {pc.error} errors, attention `{cfg.model.attention.kernel}` "
            f"(precision {cfg.model.attention.precision}).")
    why = bp_by_construction(pc, L)
    return text + (f" It is backprop by construction: {why}." if why else
                   " It is not backprop by construction: its weight updates differ from backprop's "
                   "(the cosine between the two is measured below).")


PRECISION_REGIMES = (
    "Which regime makes precision matter (model/pc.py). Under fixed predictions at equilibrium "
    "the precision-weighted errors equal backprop's gradients whatever the layer precision π, so π "
    "cancels from learning; with the preconditioned state step and Gaussian errors it cancels out of "
    "equilibrium too (the ε dynamics do not depend on π). Layer precision changes learning only with free "
    "predictions (π sets how far each layer's state moves while settling, so where the Jacobians are "
    "taken) or through non-Gaussian errors; attention precision changes the forward function itself and "
    "matters at any T.")


# -------------------------------------------------------------------- headline (2x2)

def headline_blocks(inputs: Inputs, cfg: ReportConfig, params: dict[str, Any] | None) -> list[Block]:
    runs = cfg.headline_runs
    pct = int(round(cfg.confidence * 100))
    seeds = sorted(inputs.pretrain[cfg.pcgpt_run])
    metrics = list(dict.fromkeys([*cfg.headline_metrics, "perf/step_ms", "wall_s", "n_params"]))
    rows = []
    for m in metrics:
        if not all(_values(inputs, r, m) for r in runs):
            continue
        rows.append([_with_unit(m), *(fmt_mean_ci(mean_ci(_values(inputs, r, m), cfg.confidence), m)
                                      for r in runs), f"{METRICS[m].better} is better"])
    blocks: list[Block] = [Table(
        ["Metric", *(f"{r} ({k})" for r, k in zip(runs, ("bp, dot", "bp, PC attention", "PC, dot",
                                                          "PC, PC attention"))), ""],
        rows, ["l", "r", "r", "r", "r", "l"],
        caption=f"The four pretrain runs, final evaluation: mean ± {pct}% t-interval over seeds "
                f"{', '.join(map(str, seeds))}.")]
    effects = headline_effects(inputs, cfg)
    ml = METRICS[cfg.metric]
    blocks.append(Table(
        ["Effect", "Contrast", f"Δ {ml.short} [{pct}% Welch CI]", f"ratio [{pct}% Fieller CI]", "Verdict"],
        [[name, f"{a} − {b}", fmt_diff(d, cfg.metric), fmt_ratio(run_ratio(inputs, cfg, a, b)),
          Badge(*verdict(d, cfg.metric, b))] for name, a, b, d in effects],
        ["l", "l", "r", "r", "l"],
        caption=f"The 2x2 separates the attention kernel from the training algorithm ({ml.label}, "
                f"{ml.unit}; a verdict names a direction only when the interval excludes zero)."))
    for run in (cfg.pcgpt_run, cfg.pc_dot_run):
        text = regime_text(params, run)
        if text:
            blocks.append(Para(text))
    ref = inputs.pretrain[cfg.pcgpt_run]
    any_m = next(iter(ref.values()))
    if "val/unigram_bpb" in any_m:
        line = (f"Reference lines: the validation set costs {METRICS['val/unigram_bpb'].show(float(any_m['val/unigram_bpb']))} "
                f"bits/byte under the training unigram distribution")
        if "val/majority_acc" in any_m:
            line += (f", and always predicting the most frequent training token is right "
                     f"{METRICS['val/majority_acc'].show(float(any_m['val/majority_acc']))} % of the time")
        blocks.append(Para(line + "."))
    return blocks


def headline_effects(inputs: Inputs, cfg: ReportConfig) -> list[tuple[str, str, str, Diff]]:
    """(name, run a, run b, a − b with its Welch interval) for the contrasts of the 2x2."""
    def d(a: str, b: str) -> Diff:
        return welch_diff(mean_ci(_values(inputs, a, cfg.metric), cfg.confidence),
                          mean_ci(_values(inputs, b, cfg.metric), cfg.confidence), cfg.confidence)

    c = cfg
    return [("kernel effect (under backprop)", c.kernel_run, c.baseline_run, d(c.kernel_run, c.baseline_run)),
            ("algorithm effect (PC-GPT attention)", c.pcgpt_run, c.kernel_run, d(c.pcgpt_run, c.kernel_run)),
            ("kernel effect (under PC)", c.pcgpt_run, c.pc_dot_run, d(c.pcgpt_run, c.pc_dot_run)),
            ("algorithm effect (dot attention)", c.pc_dot_run, c.baseline_run, d(c.pc_dot_run, c.baseline_run)),
            ("PC-GPT vs the GPT baseline", c.pcgpt_run, c.baseline_run, d(c.pcgpt_run, c.baseline_run))]


def run_ratio(inputs: Inputs, cfg: ReportConfig, a: str, b: str) -> Ratio:
    """mean(a) / mean(b) of the report metric over seeds, with Fieller's interval."""
    return fieller_ratio(mean_ci(_values(inputs, a, cfg.metric), cfg.confidence),
                         mean_ci(_values(inputs, b, cfg.metric), cfg.confidence), cfg.confidence)


def fmt_ratio(r: Ratio) -> str:
    if not math.isfinite(r.estimate):
        return "n/a"
    if r.lo is None or r.hi is None:
        return f"{r.estimate:.4f}"
    if not (math.isfinite(r.lo) and math.isfinite(r.hi)):
        return f"{r.estimate:.4f} [unbounded]"
    return f"{r.estimate:.4f} [{r.lo:.4f}, {r.hi:.4f}]"


# -------------------------------------------------------------------- above chance

def chance_rows(inputs: Inputs, cfg: ReportConfig) -> tuple[list[list[Any]], bool, str]:
    """Every pretrain run and grid variant against the reference lines: (rows, all above, summary)."""
    unigram = [float(m["val/unigram_bpb"]) for s in inputs.pretrain.values() for m in s.values()
               if is_number(m.get("val/unigram_bpb"))]
    majority = [float(m["val/majority_acc"]) for s in inputs.pretrain.values() for m in s.values()
                if is_number(m.get("val/majority_acc"))]
    if not unigram:
        return [], True, "no unigram reference in the metrics"
    uni = unigram[0]
    maj = majority[0] if majority else None
    entries: list[tuple[str, list[float], list[float]]] = []
    for run, seeds in inputs.pretrain.items():
        entries.append((run, [float(m["val/bpb"]) for m in seeds.values()], [float(m["val/acc"]) for m in seeds.values()]))
    by_variant: dict[str, tuple[list[float], list[float]]] = {}
    for m in inputs.ablate:
        b, a = by_variant.setdefault(m["variant"], ([], []))
        b.append(float(m["val/bpb"]))
        a.append(float(m["val/acc"]))
    entries += [(v, b, a) for v, (b, a) in by_variant.items()]
    rows, worst, ok = [], None, True
    for name, bpb, acc in entries:
        below = [(uni - x) / uni for x in bpb]
        above = all(math.isfinite(x) and x >= cfg.chance_margin for x in below)
        ok &= above
        lo = min(below) if below else float("nan")
        if worst is None or not lo >= worst[1]:
            worst = (name, lo)
        ratio = (sum(acc) / len(acc) / maj) if maj else float("nan")
        rows.append([name, fmt_number(sum(bpb) / len(bpb), ".3f"), fmt_number(100 * lo, ".1f") + " %",
                     fmt_number(100 * sum(acc) / len(acc), ".1f"), fmt_number(ratio, ".2f") + "×",
                     Badge("yes" if above else "no", "neutral" if above else "worse")])
    summary = (f"{'every' if ok else 'not every'} run ends ≥ {100 * cfg.chance_margin:.0f} % below the unigram "
               f"bpb on every seed (least margin: {worst[0]}, {100 * worst[1]:.1f} %)")
    return rows, ok, summary


def control_vs_majority(inputs: Inputs, cfg: ReportConfig) -> str | None:
    seeds = inputs.pretrain[cfg.kernel_run]
    maj = [float(m["val/majority_acc"]) for m in seeds.values() if is_number(m.get("val/majority_acc"))]
    if not maj:
        return None
    acc = [float(m["val/acc"]) for m in seeds.values()]
    ratio = min(acc) / maj[0]
    ok = ratio >= cfg.majority_factor
    return (f"the backprop control {cfg.kernel_run} reaches val accuracy {100 * min(acc):.1f} % on its worst "
            f"seed, {ratio:.2f}× the majority-token accuracy {100 * maj[0]:.1f} % "
            f"({'≥' if ok else 'below'} {cfg.majority_factor:g}×)")


# -------------------------------------------------------------------- ablations

def grid_rows(results: pd.DataFrame, cfg: ReportConfig) -> pd.DataFrame:
    """The ablation items and the pretrain runs they are compared with (the reference, the
    control, each variant's `versus`), the latter as `control` rows."""
    items = results[results["source"] == "ablate"]
    wanted = {cfg.reference, cfg.control, *(v for v in items["versus"].dropna() if v)}
    pre = results[(results["source"] == "pretrain") & results["variant"].isin(wanted)].copy()
    pre["question"] = "control"
    pre["description"] = pre["variant"].map(lambda v: "PC-GPT default (reference)" if v == cfg.reference
                                            else "backprop, PC-GPT's attention (control)" if v == cfg.control
                                            else "pretrain run")
    order = [cfg.reference] + [v for v in wanted if v != cfg.reference]
    pre = pre.sort_values("variant", key=lambda s: s.map(order.index), kind="stable")
    return pd.concat([pre, items], ignore_index=True)


def ablation_table(summ: dict[str, VariantSummary], question: str, cfg: ReportConfig) -> Table:
    names = [cfg.reference] + [v for v, s in summ.items() if s.question == question
                               and v not in (cfg.reference, cfg.control)]
    if cfg.control in summ and cfg.control not in names:
        names.append(cfg.control)
    pct = int(round(cfg.confidence * 100))
    extra = list(cfg.table_metrics) + (["wall_s"] if question == "compute" and "wall_s" not in cfg.table_metrics else [])
    cols = ["Variant", "Change", "n", METRICS[cfg.metric].short, f"Δ [{pct}% CI]", "vs", "Verdict"]
    cols += [METRICS[m].short for m in extra]
    rows, emphasis = [], {}
    for i, name in enumerate(names):
        s = summ[name]
        change = ("PC-GPT default" if name == cfg.reference else
                  s.description if s.question == "control" else (s.description or _override_text(s.override)))
        row = [name, change, str(len(s.seeds)), fmt_mean_ci(s.stats.get(cfg.metric), cfg.metric),
               fmt_diff(s.diff, cfg.metric), s.versus or "—", Badge(s.verdict, s.kind)]  # type: ignore[arg-type]
        row += [fmt_mean_ci(s.stats.get(m), m) for m in extra]
        rows.append(row)
        if name == cfg.reference:
            emphasis[i] = "ref"
        elif s.question == "control":
            emphasis[i] = "control"
    title = QUESTION_TITLES.get(question, "Equivalence checks")
    return Table(cols, rows, ["l", "l", "r", "r", "r", "l", "l"] + ["r"] * len(extra),
                 caption=f"{title}: each variant changes one factor of {cfg.reference}; {cfg.control} is the "
                         f"backprop control; n seeds. Cells: mean ± {pct}% CI half-width "
                         f"({METRICS[cfg.metric].short.lower()} in {METRICS[cfg.metric].unit}). "
                         f"Δ = variant − the run in `vs`, Welch interval.", emphasis=emphasis)


def ablation_bars(summ: dict[str, VariantSummary], question: str, cfg: ReportConfig) -> list[figs.Bar]:
    """The chart's bars: the question's variants (against the reference), then the control."""
    names = [v for v, s in summ.items() if s.question == question and v not in (cfg.reference, cfg.control)
             and s.versus == cfg.reference]
    names += [cfg.control] if cfg.control in summ and summ[cfg.control].versus == cfg.reference else []
    return [figs.Bar(n, summ[n].diff.estimate, summ[n].diff.lo, summ[n].diff.hi, summ[n].kind,
                     control=n == cfg.control) for n in names if summ[n].diff is not None]


def settling_figure(summ: dict[str, VariantSummary], cfg: ReportConfig, fig_dir: Path) -> figs.FigureResult:
    """Val loss / step time against T (x = the run's own pc/settle_steps) and against test-time steps.

    Test-time attention-settling variants are those whose override key contains
    `report.test_time_settle_key`; their x is the override's value.
    """
    def point(s: VariantSummary, x: float) -> figs.Point:
        y, ms = s.stats[cfg.metric], s.stats.get("perf/step_ms")
        return figs.Point(s.variant, x, y.mean, y.half, ms.mean if ms else None, ms.half if ms else None,
                          reference=s.variant == cfg.reference)

    train, test = [], []
    for s in summ.values():
        if s.question != "settling" and s.variant != cfg.reference:
            continue
        tt = [v for k, v in s.override.items() if cfg.test_time_settle_key in k]
        if tt and is_number(tt[0]):
            test.append(point(s, float(tt[0])))
        elif "pc/settle_steps" in s.stats:
            train.append(point(s, s.stats["pc/settle_steps"].mean))
    ref = summ.get(cfg.reference)
    ref_pt = point(ref, 0.0) if ref else None
    ctl = summ.get(cfg.control)
    control = (ctl.stats[cfg.metric].mean, ctl.stats[cfg.metric].half) if ctl else None
    return figs.settling(train, test, ref_pt, control, _with_unit(cfg.metric), cfg.reference,
                         cfg.confidence, fig_dir)


def summarize(grid: pd.DataFrame, cfg: ReportConfig, ins: ReportInputs) -> dict[str, VariantSummary]:
    if cfg.reference not in set(grid["variant"]):
        raise ReportInputError(f"{ins.pretrain}: no seeds of the reference run {cfg.reference!r} "
                               "(report.pcgpt_run)")
    return summarize_ablation(grid, cfg.metric, cfg.table_metrics, cfg.reference, cfg.confidence)


def _figure(fig: figs.FigureResult) -> Block:
    return fig.block() if fig.ok else Note(fig.note)


# -------------------------------------------------------------------- the document

def build_document(inputs: Inputs, results: pd.DataFrame, cfg: ReportConfig, ins: ReportInputs, root: Path,
                   fig_dir: Path, params: dict[str, Any] | None = None) -> tuple[list[Block], str]:
    """The report's blocks (figures drawn into `fig_dir` on the way) and its subtitle line."""
    blocks: list[Block] = []
    pct = int(round(cfg.confidence * 100))
    grid = grid_rows(results, cfg)
    has_items = bool((grid["source"] == "ablate").any())
    summ = summarize(grid, cfg, ins) if has_items else {}
    ml = METRICS[cfg.metric]
    effects = headline_effects(inputs, cfg)
    chance, _, chance_line = chance_rows(inputs, cfg)
    majority_line = control_vs_majority(inputs, cfg)

    # -- at a glance
    blocks.append(Heading("At a glance", 2, "glance"))
    n_seeds = len(next(iter(inputs.pretrain.values())))
    glance = [f"{name}: {a} − {b} = {fmt_diff(d, cfg.metric)} {ml.unit} ({pct}% Welch interval over "
              f"{n_seeds} seeds), ratio {fmt_ratio(run_ratio(inputs, cfg, a, b))} ({pct}% Fieller interval): "
              f"{verdict(d, cfg.metric, b)[0]}." for name, a, b, d in effects[:2]]
    glance.append(f"Above chance: {chance_line}" + (f"; {majority_line}." if majority_line else "."))
    cos = _values(inputs, cfg.pcgpt_run, "pc/grad_cos")
    if cos:
        c = mean_ci(cos, cfg.confidence)
        glance.append(f"{cfg.pcgpt_run}'s weight update at the end of training has cosine "
                      f"{fmt_mean_ci(c, 'pc/grad_cos')} to the backprop gradient on the same batch.")
    for q in QUESTIONS:
        vs = [s for s in summ.values() if s.question == q and s.variant not in (cfg.reference, cfg.control)]
        if not vs:
            continue
        found = [f"{s.variant}: {s.verdict}" for s in vs if s.kind in ("better", "worse")]
        glance.append(f"{QUESTION_TITLES[q]}: {len(found)} of {len(vs)} variant(s) differ detectably from the "
                      f"run they are compared with in {ml.label}" + (f" ({'; '.join(found)})." if found else "."))
    checks = [s for s in summ.values() if s.question == "equivalence"]
    if checks:
        glance.append("Equivalence checks: " + "; ".join(f"{s.variant}: {s.verdict}" for s in checks) + ".")
    blocks.append(Bullets(glance))
    for n in inputs.notes:
        blocks.append(Note(n))

    # -- headline
    blocks.append(Heading("Kernel x algorithm: the headline", 2, "headline"))
    blocks += headline_blocks(inputs, cfg, params)
    blocks.append(_figure(figs.curves(inputs.curves, cfg.headline_runs, fig_dir)))

    # -- above chance
    blocks.append(Heading("Above chance", 2, "chance"))
    if chance:
        blocks.append(Table(["Run / variant", "Val bpb (mean)", "Below unigram (worst seed)", "Val acc (%)",
                             "Acc / majority", f"≥ {100 * cfg.chance_margin:.0f} % below"],
                            chance, ["l", "r", "r", "r", "r", "l"],
                            caption="Every pretrain run and grid variant against the reference lines: the "
                                    "unigram bits per byte and the majority-token accuracy."))
    if majority_line:
        blocks.append(Para(majority_line[0].upper() + majority_line[1:] + "."))

    # -- diagnostics over training
    blocks.append(Heading("PC vs backprop over training", 2, "diagnostics"))
    pc_runs = [r for r in (cfg.pcgpt_run, cfg.pc_dot_run) if any(len(df) for df in inputs.diagnostics.get(r, {}).values())]
    blocks.append(Para(
        "At every evaluation each PC run measures itself on one fixed training batch: the cosine between "
        "its weight update and the backprop gradient (per block and over all shared weights), the "
        "settling residual ‖∂E/∂x‖, the relative decrease of the true energy by settling (predictions "
        "recomputed), rejected settling tries, whether settling raised the true energy (counted over "
        "training), the layer precisions and each layer's prediction-error energy Σρ per token, without "
        "the −½·log π constant. Lines are the mean over seeds, shaded between the lowest and highest seed."))
    blocks.append(_figure(figs.diagnostics_scalars(inputs.curves, pc_runs, fig_dir)))
    blocks.append(_figure(figs.diagnostics_layers(inputs.diagnostics, cfg.pcgpt_run, fig_dir)))
    blocks.append(Para(PRECISION_REGIMES))

    # -- ablations
    blocks.append(Heading("Ablations", 2, "ablations"))
    if not summ:
        blocks.append(Note(f"No ablation runs in {ins.ablate}: the ablation tables and charts are skipped."))
    else:
        seeds = sorted({int(s) for s in grid["seed"]})
        blocks.append(Para(
            f"Every variant changes one factor of the PC-GPT default ({cfg.reference}) and is trained at the "
            f"pretrain runs' scale with seeds {', '.join(map(str, seeds))}; the reference and the backprop "
            f"control ({cfg.control}) are the pretrain runs themselves. Cells show the mean over seeds ± the "
            f"half-width of its {pct}% Student-t interval; Δ is the difference of means to the run in `vs` "
            f"with a {pct}% Welch interval. A verdict names a direction only when that interval excludes zero."))
        for q in (*QUESTIONS, "equivalence"):
            if not any(s.question == q for s in summ.values()):
                continue
            blocks.append(Heading(QUESTION_TITLES.get(q, "Equivalence checks (equal by construction)"), 3))
            if q == "equivalence":
                blocks.append(Para("These variants equal another run by construction: they check the code, "
                                   "they are not findings. The check passes when every seed matches its "
                                   "twin (or at least the interval contains zero)."))
            if q == "compute":
                blocks.append(Para(
                    "Equal wall clock, not equal steps: the variant trains backprop for as many steps as the "
                    f"reference's measured wall time allows (its step count is a param, so the run stays "
                    f"deterministic); the wall-clock column shows how well the budgets matched in this run."))
            blocks.append(ablation_table(summ, q, cfg))
            if q == "equivalence":
                continue
            fig = figs.ablation_bars(ablation_bars(summ, q, cfg), q, QUESTION_TITLES[q], ml.label,
                                     cfg.reference, cfg.confidence, fig_dir)
            blocks.append(_figure(fig))
            if q == "settling":
                blocks.append(_figure(settling_figure(summ, cfg, fig_dir)))

    # -- PC internals
    blocks.append(Heading("Inside PC-GPT", 2, "internals"))
    first = next(iter(inputs.pretrain[cfg.pcgpt_run].values()))
    for fig in (figs.precision(first, cfg.pcgpt_run, fig_dir),
                figs.attention(inputs.attention, cfg.baseline_run, cfg.pcgpt_run, fig_dir)):
        blocks.append(_figure(fig))

    # -- samples
    blocks.append(Heading("Generated samples", 2, "samples"))
    for run in (cfg.baseline_run, cfg.pcgpt_run):
        items = inputs.samples.get(run)
        if items is None:
            blocks.append(Note(f"No samples file for {run} ({ins.pretrain}/{run}_samples.json)."))
        else:
            blocks.append(Samples(f"{run} (seed {sorted(inputs.pretrain[run])[0]})",
                                  [(s["prompt"], s["completion"]) for s in items[:cfg.samples_per_model]]))

    # -- provenance
    blocks.append(Heading("Provenance", 2, "provenance"))
    git = git_state(root)
    commit = git["commit"] or "unknown (not a git repository, or no commit yet)"
    dirty = ("unknown" if git["dirty"] is None else
             f"dirty ({git['changed']} changed path{'s' if git['changed'] != 1 else ''})" if git["dirty"]
             else "clean")
    meta = inputs.tokens_meta
    tok = ", ".join(f"{k} {meta[k]}" for k in ("kind", "vocab_size", "train_tokens", "val_tokens",
                                                "bytes_per_token_val") if k in meta)
    all_runs = [m for s in inputs.pretrain.values() for m in s.values()] + inputs.ablate
    devices = sorted({m["device"] for m in all_runs})
    prov = [
        ["git commit", commit],
        ["working tree", f"{dirty} (pipeline outputs {', '.join(OUTPUT_PATHS)} not counted)"],
        ["params.yaml sha256", inputs.params_sha256],
        ["data manifest sha256", f"{inputs.manifest[1]} ({inputs.manifest[0]})" if inputs.manifest else "not present"],
        ["data source", str(inputs.download.get("source", "unknown"))],
        ["tokenizer", tok or "unknown"],
        ["tokenizer sha256", str(meta.get("tokenizer_sha256", "unknown"))],
        ["hardware", "; ".join(devices)],
        ["host", f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"],
        ["generated", dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")],
    ]
    blocks.append(Table(["Item", "Value"], prov, caption="What this report was computed from."))
    wall = stage_wall_clock(inputs)
    blocks.append(Table(["Stage", "Wall clock (s)"], [[s, fmt_number(v, ",.1f")] for s, v in wall]
                        + [["total", fmt_number(sum(v for _, v in wall), ",.1f")]], ["l", "r"],
                        caption="Wall clock per stage, from each stage's metrics (wall_s: training and "
                                "evaluation, without process start-up)."))
    libs = library_versions()
    blocks.append(Table(["Library", "Version"], [[k, v] for k, v in libs.items()], ["l", "l"],
                        caption="Library versions of the environment that ran the report."))
    short = commit[:12] if all(c in "0123456789abcdef" for c in commit) else "unknown"
    n_models = sum(len(s) for s in inputs.pretrain.values())
    subtitle = (f"commit {short} · {dirty} · {len(inputs.pretrain)} pretrain runs x {n_seeds} seeds "
                f"({n_models} models) · {len(inputs.ablate)} ablation items · {pct}% intervals")
    return blocks, subtitle
