"""Figures of the report (matplotlib, Agg backend, PNG).

Each function draws one figure from already-validated data into `fig_dir` and
returns a `FigureResult`: the figure block for the report, or - when its input
is absent (no curves, a `dot` model has no attention precision, the grid has
no settling runs) - a note saying what was skipped and why. A missing optional
input never fails the report.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display, deterministic raster output
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from stages.report.render import Figure  # noqa: E402

DPI = 150  # the HTML shows figures at 100 px/inch (render.HIDPI_SCALE)
COLORS = {"baseline": "#3b6ea8", "bp_gaussian": "#6a9fd4", "pc_dot": "#7a4a12", "pcgpt": "#d9822b"}
KIND_COLORS = {"better": "#1f7a5a", "worse": "#c0492f", "neutral": "#9aa3ab", "na": "#c9ced3"}
KIND_LABELS = {"better": "better than reference", "worse": "worse than reference",
               "neutral": "no detectable difference", "na": "1 seed: no interval"}
STYLE = {
    "font.size": 11, "axes.titlesize": 12, "axes.titleweight": "bold", "axes.labelsize": 11,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.color": "#e3e7eb",
    "grid.linewidth": 0.8, "axes.axisbelow": True, "legend.frameon": False, "legend.fontsize": 10,
    "figure.facecolor": "white", "savefig.facecolor": "white",
}


@dataclass
class FigureResult:
    """A drawn figure (path + caption) or the note explaining why it was skipped."""

    path: Path | None
    caption: str
    note: str = ""
    alt: str = ""

    @property
    def ok(self) -> bool:
        return self.path is not None

    def block(self) -> Figure:
        assert self.path is not None
        return Figure(self.path, self.caption, alt=self.alt or self.caption)


def skipped(note: str) -> FigureResult:
    return FigureResult(None, "", note)


def _save(fig: plt.Figure, path: Path) -> Path:
    # No "Software" metadata: the same inputs give byte-identical PNGs.
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)
    return path


def _color(run: str, i: int) -> str:
    return COLORS.get(run, plt.get_cmap("tab10")(i % 10))


def _layer_values(metrics: dict[str, Any], prefix: str) -> dict[int, float]:
    """{layer: value} from flat keys `<prefix><layer>` (e.g. pc/precision/3)."""
    out = {}
    for k, v in metrics.items():
        m = re.fullmatch(re.escape(prefix) + r"(\d+)", k)
        if m:
            out[int(m.group(1))] = float(v)
    return dict(sorted(out.items()))


# ------------------------------------------------------------------ curves

def _seed_band(frames: dict[int, pd.DataFrame], x: str, y: str) -> pd.DataFrame | None:
    """Mean, min and max of column `y` over seeds at each `x` shared by every seed (None if none)."""
    parts = [df[[x, y]].dropna().set_index(x)[y].rename(seed) for seed, df in frames.items() if y in df]
    if not parts:
        return None
    wide = pd.concat(parts, axis=1, join="inner").sort_index()
    if wide.empty:
        return None
    return pd.DataFrame({"mean": wide.mean(axis=1), "lo": wide.min(axis=1), "hi": wide.max(axis=1)})


def _band(ax, band: pd.DataFrame, color: Any, label: str, scale: float = 1.0, marker: str | None = "o") -> None:
    x = band.index.to_numpy(dtype=float) * scale
    ax.plot(x, band["mean"], color=color, lw=1.8, marker=marker, ms=3.5, label=label)
    ax.fill_between(x, band["lo"], band["hi"], color=color, alpha=0.18, lw=0)


def curves(data: dict[str, dict[int, pd.DataFrame]], runs: Sequence[str], fig_dir: Path) -> FigureResult:
    """Validation loss against training tokens and against wall clock (mean over seeds, min-max band)."""
    have = [r for r in runs if data.get(r)]
    missing = [r for r in runs if not data.get(r)]
    if not have:
        return skipped(f"Training curves skipped: no curve files for {', '.join(runs)} (<run>/<seed>_curve.tsv).")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), constrained_layout=True)
        for i, run in enumerate(have):
            c = _color(run, i)
            band = _seed_band(data[run], "tokens", "val_loss")
            if band is not None:
                _band(axes[0], band, c, run, 1e-6)
            wall = [df.dropna(subset=["val_loss"]) for df in data[run].values()]
            wx = np.mean([df["wall_s"].to_numpy(float) for df in wall if len(df) == len(wall[0])], axis=0)
            axes[1].plot(wx, band["mean"] if band is not None else [], color=c, lw=1.8, marker="o", ms=3.5,
                         label=run)
        axes[0].set(title="Validation loss", xlabel="training tokens (millions)", ylabel="loss (nats/token)")
        axes[1].set(title="Validation loss vs wall clock", xlabel="wall clock (s, mean over seeds)",
                    ylabel="loss (nats/token)")
        for ax in axes:
            ax.legend()
        path = _save(fig, fig_dir / "curves.png")
    cap = (f"Validation loss of {', '.join(have)} against training tokens (mean over seeds, band: lowest to "
           f"highest seed) and against wall clock (PC settling costs time per step).")
    if missing:
        cap += f" No curve files for {', '.join(missing)}."
    return FigureResult(path, cap, alt="Validation loss curves of the four pretrain runs")


def diagnostics_scalars(data: dict[str, dict[int, pd.DataFrame]], runs: Sequence[str],
                        fig_dir: Path) -> FigureResult:
    """The PC runs' scalar diagnostics over training (pipeline.metrics.PC_CURVE_COLUMNS)."""
    panels = [("grad_cos", "cosine to the backprop gradient", "cos(PC update, BP gradient)", False),
              ("settle_residual", "settling residual ‖∂E/∂x‖", "RMS per token", True),
              ("energy_drop", "true energy decrease by settling", "(E₀ − E_T) / |E₀|", False),
              ("diverged_count", "settling raised the true energy", "evaluations so far (cumulative)", False)]
    have = [r for r in runs if any("grad_cos" in df for df in data.get(r, {}).values())]
    if not have:
        return skipped("PC diagnostics over training skipped: no PC run's curve has the diagnostic columns.")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(15.5, 3.7), constrained_layout=True)
        for ax, (col, title, ylabel, log) in zip(axes, panels):
            for i, run in enumerate(have):
                band = _seed_band(data[run], "step", col)
                if band is not None:
                    _band(ax, band, _color(run, i), run)
            if log and ax.has_data():
                ax.set_yscale("symlog", linthresh=1e-6)
            ax.set(title=title, xlabel="training step", ylabel=ylabel)
        axes[0].axhline(1.0, color="#2b3035", lw=0.8, ls=":")
        axes[0].legend()
        path = _save(fig, fig_dir / "diagnostics.png")
    return FigureResult(path, f"PC diagnostics of {', '.join(have)} on one fixed training batch at every "
                              "evaluation (mean over seeds, band: lowest to highest seed). A cosine of 1 is "
                              "backprop's direction; a diverged count that grows means settling raised the true "
                              "energy at that many evaluations.", alt="PC diagnostics over training")


def diagnostics_layers(data: dict[str, dict[int, pd.DataFrame]], run: str, fig_dir: Path) -> FigureResult:
    """Per-layer series over training for `run` (pipeline.metrics.DIAGNOSTIC_SERIES), mean over seeds."""
    frames = [df for df in data.get(run, {}).values() if len(df)]
    if not frames:
        return skipped(f"Per-layer diagnostics skipped: {run} has no per-layer series (<run>/<seed>_diagnostics.tsv).")
    long = pd.concat(frames)
    mean = long.groupby(["metric", "layer", "step"])["value"].mean()
    panels = [("pc/grad_cos", "cosine to backprop, per block", "cos", False),
              ("pc/precision", "layer precision π", "π (1 / variance)", True),
              ("pc/error_energy", "prediction-error energy (no −½·log π)", "Σρ per token (nats)", True)]
    panels = [p for p in panels if p[0] in mean.index.get_level_values("metric")]
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(5.0 * len(panels) + 0.5, 3.7), constrained_layout=True,
                                 squeeze=False)
        cmap = plt.get_cmap("viridis")
        for ax, (metric, title, ylabel, log) in zip(axes[0], panels):
            series = mean.loc[metric]
            layers = sorted(series.index.get_level_values("layer").unique())
            for layer in layers:
                s = series.loc[layer]
                ax.plot(s.index, s.to_numpy(), color=cmap(layer / max(1, len(layers) - 1)), lw=1.8, marker="o",
                        ms=3, label=f"layer {layer}")
            values = series.to_numpy(dtype=float)
            if log and np.all(values[np.isfinite(values)] > 0) and np.nanmax(values) / max(np.nanmin(values), 1e-30) > 50:
                ax.set_yscale("log")
            ax.set(title=title, xlabel="training step", ylabel=ylabel)
        axes[0][0].legend(fontsize=9)
        path = _save(fig, fig_dir / "diagnostics_layers.png")
    return FigureResult(path, f"{run} per layer over training (mean over seeds, one fixed training batch): the "
                              "cosine between each block's PC weight update and its backprop gradient, the layer "
                              "precisions, and each layer's prediction-error energy Σρ per scored token at the "
                              "settled states, without the −½·log π normaliser (what the errors cost).",
                        alt=f"{run}: per-layer diagnostics over training")


# --------------------------------------------------------------- ablations

@dataclass
class Bar:
    """One variant in an ablation chart: difference to the reference with its interval."""

    name: str
    estimate: float
    lo: float | None
    hi: float | None
    kind: str  # better | worse | neutral | na
    control: bool = False


def ablation_bars(bars: Sequence[Bar], slug: str, title: str, metric_label: str, reference: str,
                  confidence: float, fig_dir: Path) -> FigureResult:
    """Horizontal bars of Δ metric vs the reference with Welch error bars, coloured by verdict.

    The control is clipped at the axis edge (and labelled with its value) when its
    difference would otherwise squash the variants of interest into a sliver.
    """
    bars = [b for b in bars if math.isfinite(b.estimate)]
    if not bars:
        return skipped(f"{title}: chart skipped, no variant with a finite difference to {reference}.")
    pct = int(round(confidence * 100))

    def extent(b: Bar) -> list[float]:
        return [b.estimate] + [v for v in (b.lo, b.hi) if v is not None and math.isfinite(v)]

    def span(values: list[float]) -> tuple[float, float]:
        return min(min(values), 0.0), max(max(values), 0.0)

    everything = span([v for b in bars for v in extent(b)])
    main = [v for b in bars if not b.control for v in extent(b)]
    lo, hi = everything
    if main:  # clip the control only when it would take more than ~60% of the axis
        mlo, mhi = span(main)
        if (hi - lo) > 2.5 * (mhi - mlo):
            lo, hi = mlo, mhi
    pad = 0.12 * (hi - lo or abs(hi) or 1.0)
    xlim = (lo - pad, hi + pad)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(8.5, 0.5 * len(bars) + 1.6), constrained_layout=True)
        ys = np.arange(len(bars))[::-1]
        for y, b in zip(ys, bars):
            est = min(max(b.estimate, xlim[0]), xlim[1])
            clipped = any(v < xlim[0] or v > xlim[1] for v in extent(b))
            ax.barh(y, est, height=0.62, color=KIND_COLORS[b.kind], alpha=0.55 if b.control else 0.9,
                    hatch="//" if b.control else None, edgecolor="white" if not b.control else "#6b747c")
            if b.lo is not None and b.hi is not None and not clipped:
                ax.errorbar(b.estimate, y, xerr=[[b.estimate - b.lo], [b.hi - b.estimate]], fmt="none",
                            ecolor="#2b3035", elinewidth=1.4, capsize=4)
            if clipped:
                ax.annotate(f"{b.estimate:+.3f} (off scale) →" if b.estimate > 0
                            else f"← {b.estimate:+.3f} (off scale)",
                            (est, y), xytext=(-4 if b.estimate > 0 else 4, 0), textcoords="offset points",
                            ha="right" if b.estimate > 0 else "left", va="center", fontsize=9.5,
                            color="#2b3035")
        ax.axvline(0.0, color="#2b3035", lw=1.0)
        ax.set_yticks(ys, [f"{b.name} (control)" if b.control else b.name for b in bars])
        ax.set_xlim(*xlim)
        ax.set_xlabel(f"Δ {metric_label} vs {reference} (variant − {reference}); {pct}% Welch interval")
        ax.set_title(f"{title}: difference to {reference}", pad=30)
        ax.grid(axis="y", visible=False)
        kinds = [k for k in KIND_LABELS if any(b.kind == k for b in bars)]
        handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS[k]) for k in kinds]
        ax.legend(handles, [KIND_LABELS[k] for k in kinds], loc="lower center", bbox_to_anchor=(0.5, 1.0),
                  ncol=len(kinds), fontsize=9.5)
        path = _save(fig, fig_dir / f"ablation_{slug}.png")
    return FigureResult(path, f"{title}: difference in {metric_label} to {reference} per variant, "
                              f"with {pct}% Welch intervals (bars left of zero are lower). Colour gives the "
                              f"verdict; hatched bars are the backprop control.",
                        alt=f"{title}: difference to {reference} per variant")


@dataclass
class Point:
    """A variant at a settling-step count: mean ± half-width of val loss and step time."""

    name: str
    x: float
    y: float
    y_half: float | None
    ms: float | None
    ms_half: float | None
    reference: bool = False


def settling(train_pts: Sequence[Point], test_pts: Sequence[Point], ref: Point | None,
             control: tuple[float, float | None] | None, metric_label: str, reference: str,
             confidence: float, fig_dir: Path) -> FigureResult:
    """Val loss and step time against training settling steps T; val loss against test-time steps."""
    if len(train_pts) < 2 and not test_pts:
        return skipped("Settling figure skipped: the grid has fewer than two training settling counts T "
                       "and no test-time attention-settling variant.")
    pct = int(round(confidence * 100))
    panels = (2 if len(train_pts) >= 2 else 0) + (1 if test_pts else 0)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels + 0.4, 3.9), constrained_layout=True,
                                 squeeze=False)
        axes = list(axes[0])
        if len(train_pts) >= 2:
            pts = sorted(train_pts, key=lambda p: p.x)
            x = [p.x for p in pts]
            for ax, ys, hs, label in ((axes[0], [p.y for p in pts], [p.y_half for p in pts], metric_label),
                                      (axes[1], [p.ms for p in pts], [p.ms_half for p in pts], "step time (ms)")):
                yv = np.array([np.nan if v is None else v for v in ys], dtype=float)
                hv = np.array([0.0 if v is None else v for v in hs], dtype=float)
                ax.plot(x, yv, color=COLORS["pcgpt"], lw=1.8, zorder=2)
                ax.errorbar(x, yv, yerr=hv, fmt="o", color=COLORS["pcgpt"], ecolor="#2b3035", capsize=4,
                            ms=6, zorder=3, label=f"PC-GPT variants (mean ± {pct}% CI)")
                for p, yy in zip(pts, yv):
                    if p.reference:
                        ax.scatter([p.x], [yy], s=140, facecolors="none", edgecolors="#2b3035", lw=1.6,
                                   zorder=4, label=f"{reference} (default T)")
                ax.set_xticks(sorted(set(x)))
                ax.set_xlabel("training settling steps T")
            if control is not None:
                axes[0].axhline(control[0], color=COLORS["baseline"], ls="--", lw=1.5, label="bp control")
            axes[0].set(title=f"{metric_label.split(' (')[0].capitalize()} vs T", ylabel=metric_label)
            axes[1].set(title="Step time vs T", ylabel="step time (ms)")
        if test_pts:
            ax = axes[-1]
            pts = sorted(test_pts, key=lambda p: p.x)
            ax.errorbar([p.x for p in pts], [p.y for p in pts], yerr=[p.y_half or 0.0 for p in pts], fmt="o-",
                        color="#6a4c93", ecolor="#2b3035", capsize=4, ms=6, label="test-time settling variants")
            if ref is not None:
                ax.axhline(ref.y, color="#2b3035", lw=1.2, label=f"{reference} (default test-time steps)")
                if ref.y_half:
                    ax.axhspan(ref.y - ref.y_half, ref.y + ref.y_half, color="#2b3035", alpha=0.08,
                               label=f"{reference} {pct}% CI")
            ax.set_xticks(sorted({p.x for p in pts}))
            ax.set(title="Test-time attention settling", xlabel="attention settling steps at test time",
                   ylabel=metric_label)
        # One legend for all panels, below them: inside, it would cover the points.
        seen: dict[str, Any] = {}
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncol=min(len(seen), 4),
                   fontsize=10)
        path = _save(fig, fig_dir / "settling.png")
    cap = (f"Settling: {metric_label} and step time against the training settling steps T (mean over seeds, "
           f"{pct}% t-intervals; the ring marks {reference})")
    cap += ", and against attention settling steps at test time." if test_pts else "."
    if len(train_pts) < 2:
        cap += " Fewer than two training settling counts in the grid: the T panels are skipped."
    return FigureResult(path, cap, alt="Val loss and step time against settling steps")


# ------------------------------------------------------------ PC internals

def precision(metrics: dict[str, Any], run: str, fig_dir: Path) -> FigureResult:
    """Learned precision per layer (pc/precision/<l>) and per attention head (attn/precision/<l>/<h>)."""
    layer = _layer_values(metrics, "pc/precision/")
    if all(v == 1.0 for v in layer.values()):
        layer = {}  # fixed precision: nothing was learned or estimated
    heads: dict[tuple[int, int], float] = {}
    for k, v in metrics.items():
        m = re.fullmatch(r"attn/precision/(\d+)/(\d+)", k)
        if m:
            heads[(int(m.group(1)), int(m.group(2)))] = float(v)
    if not layer and not heads:
        return skipped(f"Precision figure skipped: {run} reports no learned precision "
                       f"(pc/precision/<layer>, attn/precision/<layer>/<head>).")
    panels = (1 if layer else 0) + (1 if heads else 0)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels + 0.6, 3.8), constrained_layout=True,
                                 squeeze=False)
        axes = list(axes[0])
        if layer:
            ax = axes[0]
            ax.bar(list(layer), list(layer.values()), color=COLORS["pcgpt"], width=0.65)
            ax.set_xticks(list(layer))
            ax.set(title=r"Layer precision $\pi_l$", xlabel="layer l", ylabel=r"precision $\pi_l$ (1 / variance)")
            if max(layer.values()) / max(min(layer.values()), 1e-12) > 50:
                ax.set_yscale("log")
        if heads:
            ax = axes[-1]
            nl, nh = max(l for l, _ in heads) + 1, max(h for _, h in heads) + 1
            grid = np.full((nl, nh), np.nan)
            for (l, h), v in heads.items():
                grid[l, h] = v
            im = ax.imshow(grid, cmap="YlOrBr", aspect="auto")
            for (l, h), v in heads.items():
                ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if v > np.nanmean(grid) + 0.5 * np.nanstd(grid) else "#1d2327")
            ax.set_xticks(range(nh))
            ax.set_yticks(range(nl))
            ax.set(title=r"Attention precision $\lambda$ per head", xlabel="head", ylabel="layer")
            ax.grid(False)
            fig.colorbar(im, ax=ax, label=r"precision $\lambda$ (1 / variance)")
        path = _save(fig, fig_dir / "precision.png")
    cap = f"Learned precisions of {run} at the end of training"
    parts = (["per layer (inter-layer prediction errors)"] if layer else []) + \
            (["per attention head"] if heads else [])
    cap += ": " + " and ".join(parts) + "."
    if not heads:
        cap += " No per-head attention precision (a fixed or dot-product kernel learns none)."
    if not layer:
        cap += " No per-layer precision reported."
    return FigureResult(path, cap, alt="Learned precision per layer and head")


def _token_label(tok: str) -> str:
    return tok.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "·") or "∅"


def attention(maps: dict[str, dict[str, Any]], baseline: str, pcgpt: str, fig_dir: Path,
              max_tokens: int = 48) -> FigureResult:
    """One head's attention probabilities on the same sample: `dot` (baseline) beside the PC kernel."""
    runs = [r for r in (baseline, pcgpt) if r in maps]
    if not runs:
        return skipped(f"Attention maps skipped: no attention file for {baseline} or {pcgpt} "
                       f"(<run>_attention.json).")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, len(runs), figsize=(5.0 * len(runs) + 1.0, 5.0), constrained_layout=True,
                                 squeeze=False)
        mats = [np.asarray(maps[r]["weights"], dtype=float)[:max_tokens, :max_tokens] for r in runs]
        vmax = max(float(np.nanmax(m)) for m in mats)
        im = None
        for ax, run, w in zip(axes[0], runs, mats):
            a = maps[run]
            toks = [_token_label(t) for t in a["tokens"][:max_tokens]]
            # The causal mask (keys after the query) drawn as "no data", not as probability 0.
            masked = np.ma.masked_where(np.triu(np.ones_like(w, dtype=bool), 1), w)
            cmap = plt.get_cmap("magma_r").with_extremes(bad="#eef1f4")
            im = ax.imshow(masked, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
            step = max(1, math.ceil(len(toks) / 24))
            ticks = list(range(0, len(toks), step))
            ax.set_xticks(ticks, [toks[i] for i in ticks], rotation=90, fontsize=8)
            ax.set_yticks(ticks, [toks[i] for i in ticks], fontsize=8)
            ax.set(title=f"{run}: {a['kernel']} kernel (layer {a['layer']}, head {a['head']})",
                   xlabel="key token", ylabel="query token")
            ax.grid(False)
        fig.colorbar(im, ax=list(axes[0]), label="attention probability", shrink=0.85)
        path = _save(fig, fig_dir / "attention.png")
    cap = (f"Attention probabilities of one head on the same validation sample ({', '.join(runs)}); "
           f"row = query, column = key, causal mask (grey) above the diagonal.")
    if len(runs) < 2:
        cap += f" No attention file for {baseline if baseline not in maps else pcgpt}."
    return FigureResult(path, cap, alt="Attention maps of one head")


__all__ = ["FigureResult", "Bar", "Point", "curves", "diagnostics_scalars", "diagnostics_layers", "ablation_bars",
           "settling", "precision", "attention", "skipped"]
