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
from stages.report.stats import Diff, MeanCI, VariantSummary, summarize_ablation

QUESTIONS = tuple(QUESTION_TITLES)  # the questions with a table (control rows appear in each)


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
    """(stage, seconds) from each metrics file's wall_s; ablation items summed."""
    rows = [("download", float(inputs.download["wall_s"])), ("tokenizer", float(inputs.tokenizer["wall_s"]))]
    rows += [(f"pretrain@{run}", float(m["wall_s"])) for run, m in inputs.pretrain.items()]
    if inputs.ablate:
        rows.append((f"ablate ({len(inputs.ablate)} items, summed)",
                     float(sum(m["wall_s"] for m in inputs.ablate))))
    return rows


# -------------------------------------------------------------------- document

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


def headline_blocks(inputs: Inputs, cfg: ReportConfig) -> list[Block]:
    base, pc = inputs.pretrain[cfg.baseline_run], inputs.pretrain[cfg.pcgpt_run]
    metrics = list(dict.fromkeys([*cfg.headline_metrics, "tokens", "wall_s", "n_params"]))
    rows = []
    for m in metrics:
        if m not in base or m not in pc:
            continue
        spec = METRICS[m]
        b, p = float(base[m]), float(pc[m])
        rel = fmt_number(100.0 * (p - b) / abs(b), "+.1f") + " %" if b else "n/a"
        rows.append([_with_unit(m), spec.show(b), spec.show(p), fmt_number((p - b) * spec.scale, "+" + spec.fmt),
                     rel, f"{spec.better} is better"])
    blocks: list[Block] = [Table(
        ["Metric", cfg.baseline_run, cfg.pcgpt_run, f"{cfg.pcgpt_run} − {cfg.baseline_run}", "relative", ""],
        rows, ["l", "r", "r", "r", "r", "l"],
        caption=f"Pretrain runs {cfg.baseline_run} (backprop GPT) and {cfg.pcgpt_run} (PC-GPT), final evaluation.")]
    if "val/unigram_bpb" in pc:
        blocks.append(Para(f"Reference line: the validation set costs "
                           f"{METRICS['val/unigram_bpb'].show(float(pc['val/unigram_bpb']))} bits/byte under the "
                           f"training unigram distribution; a model that learned anything beats it."))
    blocks.append(Note("One run per model: these differences are not tested for significance. "
                       "The ablation tables below repeat the comparison over seeds with intervals."))
    return blocks


def ablation_table(summ: dict[str, VariantSummary], question: str, cfg: ReportConfig) -> Table:
    names = [cfg.reference] + [v for v, s in summ.items() if s.question == question
                               and v not in (cfg.reference, cfg.control)]
    if cfg.control in summ:
        names.append(cfg.control)
    pct = int(round(cfg.confidence * 100))
    cols = ["Variant", "Change", "n", METRICS[cfg.metric].short, f"Δ vs {cfg.reference} [{pct}% CI]", "Verdict"]
    cols += [METRICS[m].short for m in cfg.table_metrics]
    rows, emphasis = [], {}
    for i, name in enumerate(names):
        s = summ[name]
        change = "PC-GPT default" if name == cfg.reference else (s.description or _override_text(s.override))
        row = [name, change, str(len(s.seeds)), fmt_mean_ci(s.stats.get(cfg.metric), cfg.metric),
               fmt_diff(s.diff, cfg.metric), Badge(s.verdict, s.kind)]  # type: ignore[arg-type]
        row += [fmt_mean_ci(s.stats.get(m), m) for m in cfg.table_metrics]
        rows.append(row)
        if name == cfg.reference:
            emphasis[i] = "ref"
        elif name == cfg.control:
            emphasis[i] = "control"
    return Table(cols, rows, ["l", "l", "r", "r", "r", "l"] + ["r"] * len(cfg.table_metrics),
                 caption=f"{QUESTION_TITLES[question]}: each variant changes one factor of {cfg.reference}; "
                         f"{cfg.control} is the backprop control; n seeds. Cells: mean ± {pct}% CI half-width "
                         f"({METRICS[cfg.metric].short.lower()} in {METRICS[cfg.metric].unit}). "
                         f"Δ = variant − {cfg.reference}, Welch interval.", emphasis=emphasis)


def ablation_bars(summ: dict[str, VariantSummary], question: str, cfg: ReportConfig) -> list[figs.Bar]:
    """The chart's bars: the question's variants, then the control (the reference is the zero line)."""
    names = [v for v, s in summ.items() if s.question == question and v not in (cfg.reference, cfg.control)]
    names += [cfg.control] if cfg.control in summ else []
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


def summarize(ablate_runs: pd.DataFrame, cfg: ReportConfig, ins: ReportInputs) -> dict[str, VariantSummary]:
    if cfg.reference not in set(ablate_runs["variant"]):
        raise ReportInputError(f"{ins.ablate}: no runs of the reference variant {cfg.reference!r} "
                               "(report.reference); the ablation grid must include it")
    return summarize_ablation(ablate_runs, cfg.metric, cfg.table_metrics, cfg.reference, cfg.confidence)


def build_document(inputs: Inputs, results: pd.DataFrame, cfg: ReportConfig, ins: ReportInputs, root: Path,
                   fig_dir: Path) -> tuple[list[Block], str]:
    """The report's blocks (figures drawn into `fig_dir` on the way) and its subtitle line."""
    blocks: list[Block] = []
    pct = int(round(cfg.confidence * 100))
    ablate_runs = results[results["source"] == "ablate"]
    summ = summarize(ablate_runs, cfg, ins) if len(ablate_runs) else {}
    base, pc = inputs.pretrain[cfg.baseline_run], inputs.pretrain[cfg.pcgpt_run]
    ml = METRICS[cfg.metric]

    # -- at a glance
    blocks.append(Heading("At a glance", 2, "glance"))
    glance = [f"{cfg.pcgpt_run} reaches {ml.label} {ml.show(float(pc[cfg.metric]))} vs "
              f"{ml.show(float(base[cfg.metric]))} for {cfg.baseline_run} "
              f"(one run each, {fmt_number(float(pc['tokens']), ',.0f')} training tokens), at "
              f"{METRICS['perf/tok_per_s'].show(float(pc['perf/tok_per_s']))} vs "
              f"{METRICS['perf/tok_per_s'].show(float(base['perf/tok_per_s']))} tokens/s."]
    for q in QUESTIONS:
        vs = [s for s in summ.values() if s.question == q and s.variant not in (cfg.reference, cfg.control)]
        if not vs:
            continue
        found = [f"{s.variant}: {s.verdict}" for s in vs if s.kind in ("better", "worse")]
        glance.append(f"{QUESTION_TITLES[q]}: {len(found)} of {len(vs)} variant(s) differ detectably from "
                      f"{cfg.reference} in {ml.label}" + (f" ({'; '.join(found)})." if found else "."))
    if cfg.control in summ:
        glance.append(f"Control {cfg.control}: {summ[cfg.control].verdict}.")
    blocks.append(Bullets(glance))
    for n in inputs.notes:
        blocks.append(Note(n))

    # -- headline
    blocks.append(Heading("Baseline vs PC-GPT", 2, "headline"))
    blocks += headline_blocks(inputs, cfg)
    fig = figs.curves(inputs.curves, cfg.baseline_run, cfg.pcgpt_run, fig_dir)
    blocks.append(fig.block() if fig.ok else Note(fig.note))

    # -- ablations
    blocks.append(Heading("Ablations", 2, "ablations"))
    if not summ:
        blocks.append(Note(f"No ablation runs in {ins.ablate}: the ablation tables and charts are skipped."))
    else:
        seeds = sorted({int(s) for s in ablate_runs["seed"]})
        blocks.append(Para(
            f"Every variant changes one factor of the PC-GPT default ({cfg.reference}) and is trained with "
            f"seeds {', '.join(map(str, seeds))}. Cells show the mean over seeds ± the half-width of its "
            f"{pct}% Student-t interval; Δ is the difference of means to {cfg.reference} with a {pct}% Welch "
            f"interval. A verdict names a direction only when that interval excludes zero."))
        for q in QUESTIONS:
            blocks.append(Heading(QUESTION_TITLES[q], 3))
            if not any(s.question == q for s in summ.values()):
                blocks.append(Note(f"The grid has no {q} variant: nothing to compare."))
                continue
            blocks.append(ablation_table(summ, q, cfg))
            fig = figs.ablation_bars(ablation_bars(summ, q, cfg), q, QUESTION_TITLES[q], ml.label,
                                     cfg.reference, cfg.confidence, fig_dir)
            blocks.append(fig.block() if fig.ok else Note(fig.note))
            if q == "settling":
                fig = settling_figure(summ, cfg, fig_dir)
                blocks.append(fig.block() if fig.ok else Note(fig.note))

    # -- PC internals
    blocks.append(Heading("Inside PC-GPT", 2, "internals"))
    for fig in (figs.precision(pc, cfg.pcgpt_run, fig_dir), figs.energy(pc, cfg.pcgpt_run, fig_dir),
                figs.attention(inputs.attention, cfg.baseline_run, cfg.pcgpt_run, fig_dir)):
        blocks.append(fig.block() if fig.ok else Note(fig.note))

    # -- samples
    blocks.append(Heading("Generated samples", 2, "samples"))
    for run in (cfg.baseline_run, cfg.pcgpt_run):
        items = inputs.samples.get(run)
        if items is None:
            blocks.append(Note(f"No samples file for {run} ({ins.pretrain}/{run}_samples.json)."))
        else:
            blocks.append(Samples(f"{run}", [(s["prompt"], s["completion"])
                                             for s in items[:cfg.samples_per_model]]))

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
    devices = sorted({m["device"] for m in [*inputs.pretrain.values(), *inputs.ablate]})
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
                        caption="Wall clock per stage, from each stage's metrics (wall_s)."))
    libs = library_versions()
    blocks.append(Table(["Library", "Version"], [[k, v] for k, v in libs.items()], ["l", "l"],
                        caption="Library versions of the environment that ran the report."))
    short = commit[:12] if all(c in "0123456789abcdef" for c in commit) else "unknown"
    subtitle = (f"commit {short} · {dirty} · {len(inputs.pretrain)} pretrain runs · "
                f"{len(inputs.ablate)} ablation runs · {pct}% intervals")
    return blocks, subtitle
