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
COLORS = {"baseline": "#3b6ea8", "pcgpt": "#d9822b"}
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

def curves(data: dict[str, pd.DataFrame], baseline: str, pcgpt: str, fig_dir: Path) -> FigureResult:
    """Train and validation loss against tokens, and validation loss against wall clock."""
    runs = [r for r in (baseline, pcgpt) if r in data]
    missing = [r for r in (baseline, pcgpt) if r not in data]
    if not runs:
        return skipped(f"Training curves skipped: no curve file for {baseline} or {pcgpt} "
                       f"(<run>_curve.tsv).")
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 3, figsize=(11.2, 3.8), constrained_layout=True)
        for i, run in enumerate(runs):
            df, c = data[run], _color(run, i)
            tr = df.dropna(subset=["train_loss"])
            va = df.dropna(subset=["val_loss"])
            axes[0].plot(tr["tokens"] / 1e6, tr["train_loss"], color=c, lw=1.8, label=run)
            axes[1].plot(va["tokens"] / 1e6, va["val_loss"], color=c, lw=1.8, marker="o", ms=3.5, label=run)
            axes[2].plot(va["wall_s"], va["val_loss"], color=c, lw=1.8, marker="o", ms=3.5, label=run)
        axes[0].set(title="Training loss", xlabel="training tokens (millions)", ylabel="loss (nats/token)")
        axes[1].set(title="Validation loss", xlabel="training tokens (millions)", ylabel="loss (nats/token)")
        axes[2].set(title="Validation loss vs wall clock", xlabel="wall clock (s)", ylabel="loss (nats/token)")
        for ax in axes:
            ax.legend()
        path = _save(fig, fig_dir / "curves.png")
    cap = (f"Training and validation curves of {' and '.join(runs)}: loss per token against training "
           f"tokens, and validation loss against wall-clock time (PC settling costs time per step).")
    if missing:
        cap += f" No curve file for {', '.join(missing)}."
    return FigureResult(path, cap, alt="Training and validation loss curves")


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


def energy(metrics: dict[str, Any], run: str, fig_dir: Path) -> FigureResult:
    """Per-layer energy before and after settling (pc/energy_before/<l>, pc/energy_after/<l>)."""
    before, after = _layer_values(metrics, "pc/energy_before/"), _layer_values(metrics, "pc/energy_after/")
    layers = sorted(set(before) | set(after))
    if not layers:
        return skipped(f"Energy figure skipped: {run} reports no per-layer energy "
                       f"(pc/energy_before/<layer>, pc/energy_after/<layer>).")
    x = np.arange(len(layers))
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(layers) + 3), 3.6), constrained_layout=True)
        b = [before.get(l, np.nan) for l in layers]
        a = [after.get(l, np.nan) for l in layers]
        ax.bar(x - 0.2, b, width=0.4, color="#9aa3ab", label="before settling")
        ax.bar(x + 0.2, a, width=0.4, color=COLORS["pcgpt"], label="after settling")
        ax.set_xticks(x, [str(l) for l in layers])
        vals = [v for v in b + a if np.isfinite(v) and v > 0]
        if vals and max(vals) / min(vals) > 100:
            ax.set_yscale("log")
        ax.set(title="Prediction-error energy per layer", xlabel="layer l", ylabel=r"energy $E_l$ (nats)")
        ax.legend()
        path = _save(fig, fig_dir / "energy.png")
    cap = f"Per-layer prediction-error energy of {run} before and after settling (end of training)"
    if "pc/settle_residual" in metrics:
        cap += f"; settling residual ‖∂E/∂x‖ = {float(metrics['pc/settle_residual']):.3g}"
    if "pc/settle_steps" in metrics:
        cap += f" after {float(metrics['pc/settle_steps']):g} steps"
    return FigureResult(path, cap + ".", alt="Energy per layer before and after settling")


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


__all__ = ["FigureResult", "Bar", "Point", "curves", "ablation_bars", "settling", "precision", "energy",
           "attention", "skipped"]
