"""Analyses -> matplotlib Figures for the HTML report: one plot per module kind, never one per matrix.

Figures are built with the `Figure` class (no pyplot, no global state, no files); `report.svg` turns them into
inline SVG. Every plot takes one or more `Run`s (an analysis and its label), so two fine-tunes overlay on one axis:
a module kind has the same colour in every plot, an analysis the same line style. Artists that should say what they
are on hover carry a tip (`tip(artist, text)`), which the SVG writer turns into a `<title>`.
"""

from __future__ import annotations

import base64
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter, StrMethodFormatter

from spectra.records import Analysis, LayerMetrics

log = logging.getLogger(__name__)

MAX_POINTS = 400  # points drawn per spectrum line; longer spectra are subsampled for drawing only
LOG_FLOOR = 1e-6  # lowest σ/σ₁ drawn on the log axis (fp32 tails below it are rounding, not signal)
FONT = 9.0  # points: at the report's scale ≥ 10 CSS px (text in an SVG shown at its natural size is pt × 4/3 px)
SMALL = 8.5  # legends and notes only
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_STYLES = ("-", "--", ":", "-.")
TIP = "tip-"  # gid prefix of an artist with a hover text (base64url of the text follows)
PANEL = (3.7, 2.9)  # inches: one module kind's spectrum
WIDE = (6.6, 3.9)  # inches: a single-axes plot


@dataclass(frozen=True, slots=True)
class Run:
    """One analysis on a plot: its label (legend) and its position (line style) among the runs drawn together."""

    label: str
    analysis: Analysis
    index: int = 0

    @property
    def style(self) -> str:
        return _STYLES[self.index % len(_STYLES)]


Runs = Analysis | Sequence[Run]


def runs_of(what: Runs) -> list[Run]:
    """A bare analysis is one unlabelled run."""
    return [Run("", what)] if isinstance(what, Analysis) else list(what)


def tip(artist: Artist, text: str) -> None:
    """Give `artist` a hover text: the SVG writer replaces the gid by a `<title>` holding `text`."""
    artist.set_gid(TIP + base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii").rstrip("="))


def tip_text(gid: str) -> str | None:
    """The hover text encoded in a gid by `tip`, or None."""
    if not gid.startswith(TIP):
        return None
    data = gid[len(TIP) :]
    return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4)).decode("utf-8", "replace")


def marchenko_pastur_profile(shape: tuple[int, int]) -> np.ndarray:
    """Expected σ_k/σ₁ of an m×n Gaussian matrix, k = 1..min(m, n): sqrt(x_k / b), Marchenko–Pastur quantiles.

    x_k is the (k − 0.5)/min(m, n) quantile of the MP law counted from the top edge b = (1 + √q)², q = m/n ≤ 1
    (METHODS.md §3). The result is read-only and cached per shape.

    Args:
        shape: (m, n) in either order.
    """
    return _mp_profile(min(shape), max(shape))


@lru_cache(maxsize=64)
def _mp_profile(m: int, n: int) -> np.ndarray:
    q = m / n
    # x = 1 + q − 2√q·cos θ maps θ ∈ [0, π] onto [a, b]; p(x)·dx = (2/π)·sin²θ / x · dθ, bounded even at q = 1.
    edges = np.linspace(0.0, math.pi, 8193)
    mid = 0.5 * (edges[1:] + edges[:-1])
    x_mid = 1.0 + q - 2.0 * math.sqrt(q) * np.cos(mid)
    mass = (2.0 / math.pi) * np.sin(mid) ** 2 / x_mid * np.diff(edges)
    above = np.concatenate([np.cumsum(mass[::-1])[::-1], [0.0]]) / mass.sum()  # share of law above each edge
    x_edges = 1.0 + q - 2.0 * math.sqrt(q) * np.cos(edges)
    levels = (np.arange(1, m + 1) - 0.5) / m  # share above x_k, increasing in k
    x_k = np.interp(levels, above[::-1], x_edges[::-1])  # `above` decreases along the edges, so flip both
    profile = np.sqrt(x_k / (1.0 + math.sqrt(q)) ** 2)
    profile.setflags(write=False)
    return profile


def draw_indices(n: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """Indices (0-based, increasing, first and last included) of at most ~max_points points of a length-n curve.

    Dense at the start (where spectra fall fastest), evenly and logarithmically spaced elsewhere.
    """
    if n <= max_points:
        return np.arange(n)
    third = max_points // 3
    parts = (np.arange(third), np.linspace(0, n - 1, third), np.geomspace(1, n, third) - 1)
    return np.unique(np.concatenate(parts).round().astype(np.int64))


def kind_order(layers: Sequence[LayerMetrics]) -> list[str]:
    """Module kinds in order of first appearance (q, k, v, o, gate, up, down for Llama)."""
    return list(dict.fromkeys(lm.kind for lm in layers))


def kind_colors(runs: Runs) -> dict[str, str]:
    """Module kind -> colour, the same in every plot of a report (kinds of all runs, in order of appearance)."""
    kinds = list(dict.fromkeys(k for run in runs_of(runs) for k in kind_order(run.analysis.layers)))
    return {kind: _COLORS[i % len(_COLORS)] for i, kind in enumerate(kinds)}


def by_kind(analysis: Analysis) -> dict[str, list[LayerMetrics]]:
    groups: dict[str, list[LayerMetrics]] = {k: [] for k in kind_order(analysis.layers)}
    for lm in analysis.layers:
        groups[lm.kind].append(lm)
    return groups


def median_matrix(group: Sequence[LayerMetrics]) -> LayerMetrics:
    """The matrix whose rank is the (lower) median of the group."""
    ordered = sorted(group, key=lambda lm: (lm.rank, lm.layer if lm.layer is not None else -1))
    return ordered[(len(ordered) - 1) // 2]


def _empty(fig: Figure, message: str = "no analysed matrices") -> Figure:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=FONT + 1, color="#555")
    ax.set_axis_off()
    return fig


def _axes(fig: Figure, left: float = 0.7, right: float = 0.15, bottom: float = 0.55, top: float = 0.35) -> Axes:
    """One axes with fixed margins in inches (constrained layout measures every label twice: seconds per report)."""
    w, h = fig.get_size_inches()
    return fig.add_axes((left / w, bottom / h, 1 - (left + right) / w, 1 - (bottom + top) / h))


def _legend_width(labels: Sequence[str]) -> float:
    """Inches a legend of these labels needs right of the axes (8.5 pt text, a line sample)."""
    return 0.75 + 0.068 * max((len(label) for label in labels), default=4)


def text(label: str) -> str:
    """A key, kind or label as literal matplotlib text ("$" would start mathtext)."""
    return label.replace("$", r"\$")


def _pct(analysis: Analysis) -> str:
    return f"{analysis.options.threshold * 100:g}%"


def _style(ax: Axes) -> None:
    ax.tick_params(labelsize=FONT)
    ax.grid(True, which="major", alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _label(run: Run, text: str) -> str:
    return f"{run.label}: {text}" if run.label else text


def _is_factored(group: Sequence[LayerMetrics]) -> bool:
    return all(lm.method.startswith("factored") for lm in group)


def plot_kind_spectrum(runs: Runs, kind: str, colors: dict[str, str] | None = None) -> Figure:
    """σ_i/σ₁ of ΔW on a log scale for the matrices of one module kind.

    Every matrix is drawn faintly, the median-rank matrix of each run bold (its line style) with a dot at its rank,
    and the Marchenko–Pastur profile of a Gaussian matrix of that shape dashed grey. The index axis ends at the
    longest spectrum drawn (an adapter's r, or min(m, n)). Lines say their matrix and rank on hover.

    Args:
        runs: one analysis, or several to overlay (e.g. a full fine-tune and a LoRA).
        kind: the module kind to draw.
        colors: kind -> colour (default: `kind_colors(runs)`).
    """
    runs = runs_of(runs)
    color = (colors or kind_colors(runs)).get(kind, _COLORS[0])
    fig = Figure(figsize=PANEL)
    groups = [(run, by_kind(run.analysis).get(kind, [])) for run in runs]
    if not any(group for _, group in groups):
        return _empty(fig, text(f"no {kind} matrices"))
    ax = _axes(fig, left=0.72, bottom=0.5, top=0.5 if len(runs) > 1 else 0.3)
    low, longest, titles = 1.0, 1, []
    for run, group in groups:
        if not group:
            continue
        median = median_matrix(group)
        tau = _pct(run.analysis)
        for lm in [*(lm for lm in group if lm is not median), median]:  # the median last, drawn on top
            if not len(lm.s) or lm.s[0] <= 0.0:
                continue
            bold = lm is median
            idx = draw_indices(len(lm.s), MAX_POINTS if bold else MAX_POINTS // 2)
            y = lm.s[idx] / lm.s[0]
            y = np.where(y > 0.0, y, np.nan)
            (line,) = ax.plot(
                idx + 1,
                y,
                color=color if bold or len(runs) > 1 else "#8a8a8a",
                ls=run.style,
                lw=1.9 if bold else 0.9,
                alpha=1.0 if bold else (0.3 if len(runs) > 1 else 0.45),
                zorder=3 if bold else 2,
            )
            tip(
                line, _label(run, f"{lm.name}: rank@{tau} {lm.rank} of {min(lm.shape)}" + (" (median)" if bold else ""))
            )
            finite = y[np.isfinite(y)]
            low = min(low, float(finite.min()) if finite.size else 1.0)
            longest = max(longest, len(lm.s))
        if median.rank >= 1 and len(median.s) >= median.rank and median.s[0] > 0.0:
            (dot,) = ax.plot([median.rank], [median.s[median.rank - 1] / median.s[0]], "o", color="black", ms=4.5)
            dot.set_zorder(4)
            tip(dot, _label(run, f"median {kind}: rank@{tau} = {median.rank}"))
        layer = "" if median.layer is None else f"layer {median.layer}, "
        titles.append(f"{run.label} {median.rank}" if len(runs) > 1 else f"{layer}rank {median.rank}")
    shape = median_matrix(next(group for _, group in groups if group)).shape
    mp = marchenko_pastur_profile(shape)
    idx = draw_indices(min(len(mp), longest))
    (line,) = ax.plot(idx + 1, mp[idx], "--", color="#333", lw=1.0, zorder=3)
    tip(line, f"Gaussian matrix {shape[0]}×{shape[1]} (Marchenko–Pastur)")
    ax.set_yscale("log")
    ax.set_ylim(max(min(low * 0.5, 0.1), LOG_FLOOR), 1.6)  # at least a decade: labelled major ticks only
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # singular value indices
    ax.set_xlim(0, longest + 0.5 if longest < 20 else longest * 1.02)
    if len(runs) > 1:  # the median rank of each run on a line of its own: panel titles must fit ~40 characters
        ax.set_title(text(f"{kind}\nmedian rank: {' · '.join(titles)}"), fontsize=FONT, loc="left")
    else:
        ax.set_title(text(f"{kind}  ({titles[0]})"), fontsize=FONT, loc="left")
    ax.set_xlabel("singular value index i" + (" (≤ adapter r)" if _is_factored(groups[0][1]) else ""), fontsize=FONT)
    ax.set_ylabel("σᵢ / σ₁ (log scale)", fontsize=FONT)
    _style(ax)
    return fig


def plot_spectra(runs: Runs) -> list[Figure]:
    """`plot_kind_spectrum` for every module kind of the runs, in order of appearance."""
    colors = kind_colors(runs)
    return [plot_kind_spectrum(runs, kind, colors) for kind in colors]


def kind_energy_curve(group: Sequence[LayerMetrics]) -> np.ndarray | None:
    """Energy-weighted E(k) over the matrices of one kind, k = 1..max length; None if all ΔW are zero."""
    length = max(len(lm.s) for lm in group)
    kept, total = np.zeros(length), 0.0
    for lm in group:
        if not len(lm.s):
            continue
        cum = np.cumsum(np.square(lm.s))
        kept += np.concatenate([cum, np.full(length - len(cum), cum[-1])])
        total += lm.frobenius_norm**2
    return np.minimum(kept / total, 1.0) if total > 0.0 else None


def _legends(ax: Axes, runs: Sequence[Run], colors: dict[str, str], extra: Sequence[Line2D] = ()) -> None:
    """A legend of module kinds (colours) and, for several runs, one of the runs (line styles), outside the axes."""
    handles = [Line2D([], [], color=c, lw=2, label=text(k)) for k, c in colors.items()]
    handles += list(extra)
    kinds = ax.legend(
        handles=handles, fontsize=SMALL, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="kind"
    )
    kinds.get_title().set_fontsize(SMALL)
    if len(runs) > 1:
        ax.add_artist(kinds)
        styles = [Line2D([], [], color="#333", ls=r.style, lw=1.6, label=text(r.label)) for r in runs]
        ax.legend(handles=styles, fontsize=SMALL, loc="lower left", bbox_to_anchor=(1.01, 0.0), frameon=False)


def plot_energy(runs: Runs, colors: dict[str, str] | None = None) -> Figure:
    """Cumulative explained energy E(k) per module kind (energy-weighted over its matrices), log k axis.

    A horizontal line marks the analysis threshold, dotted vertical lines the LoRA ranks of the options. With
    several runs, each kind keeps its colour and each run has its line style.

    Args:
        runs: one analysis, or several to overlay.
        colors: kind -> colour (default: `kind_colors(runs)`).
    """
    runs = runs_of(runs)
    colors = colors or kind_colors(runs)
    fig = Figure(figsize=WIDE)
    curves = [(run, kind, kind_energy_curve(g)) for run in runs for kind, g in by_kind(run.analysis).items()]
    if not any(c is not None for _, _, c in curves):
        return _empty(fig, "no analysed matrices with a nonzero ΔW")
    ax = _axes(fig, left=0.65, right=_legend_width([*colors, "threshold 100%", *(r.label for r in runs)]), top=0.3)
    longest = 1
    for run, kind, curve in curves:
        if curve is None:
            continue
        idx = draw_indices(len(curve))
        (line,) = ax.plot(idx + 1, 100.0 * curve[idx], color=colors[kind], ls=run.style, lw=1.7)
        tau = run.analysis.options.threshold
        k = int(np.searchsorted(curve, tau * (1 - 1e-6))) + 1
        tip(line, _label(run, f"{kind}: E(k) reaches {_pct(run.analysis)} at k = {min(k, len(curve))}"))
        longest = max(longest, len(curve))
    first = runs[0].analysis
    ax.axhline(100.0 * first.options.threshold, color="black", lw=1.0, ls="--")
    for r in first.options.lora_ranks:
        if r <= longest:
            ax.axvline(r, color="#555", lw=0.8, ls=":")
            ax.text(r, 101.5, f"r={r}", ha="center", va="bottom", fontsize=SMALL, color="#333")
    ax.set_xscale("log")
    ax.set_xlim(1, max(longest, 2))
    ax.set_ylim(0, 109)
    ax.set_xlabel("k, number of top singular directions kept (log scale)", fontsize=FONT)
    ax.set_ylabel("E(k), share of ‖ΔW‖²_F (%)", fontsize=FONT)
    threshold = Line2D([], [], color="black", lw=1.0, ls="--", label=f"threshold {_pct(first)}")
    _legends(ax, runs, colors, [threshold])
    _style(ax)
    return fig


def cell_values(analysis: Analysis) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(row labels, kinds, rank grid, rank/random grid, matrices per cell); a cell holding several matrices shows
    their median."""
    kinds = kind_order(analysis.layers)
    blocks = sorted({lm.layer for lm in analysis.layers if lm.layer is not None})
    rows: list[int | None] = [*blocks, *([None] if any(lm.layer is None for lm in analysis.layers) else [])]
    cells: dict[tuple[int | None, str], list[LayerMetrics]] = {}
    for lm in analysis.layers:
        cells.setdefault((lm.layer, lm.kind), []).append(lm)
    rank = np.full((len(rows), len(kinds)), np.nan)
    ratio = np.full_like(rank, np.nan)
    count = np.zeros_like(rank)
    for (layer, kind), group in cells.items():
        at = (rows.index(layer), kinds.index(kind))
        rank[at] = np.median([lm.rank for lm in group])
        ratio[at] = np.median([lm.rank / lm.random_rank for lm in group])
        count[at] = len(group)
    return [("—" if r is None else str(r)) for r in rows], kinds, rank, ratio, count


HEATMAPS = ("rank", "ratio")


def plot_rank_heatmap(analysis: Analysis, panel: str = "rank") -> Figure:
    """Rank@threshold by layer (rows) × module kind (columns), or (panel "ratio") the same divided by the
    random-matrix rank. Cells are vector rectangles that say their layer, kind and value on hover.

    Args:
        analysis: the analysis to draw; matrices outside any block (e.g. lm_head) form a last row "—".
        panel: "rank" or "ratio".
    """
    if not analysis.layers:
        return _empty(Figure(figsize=(4.0, 2.4)))
    rows, kinds, rank, ratio, count = cell_values(analysis)
    grid = rank if panel == "rank" else ratio
    below = 0.35 + 0.055 * max(len(k) for k in kinds)  # x labels at 30°
    width = max(3.6, 0.62 * len(kinds) + 1.9)
    height = max(2.4, 0.25 * len(rows) + 0.35 + below)
    fig = Figure(figsize=(width, height))
    ax = _axes(fig, left=0.75, right=1.05, bottom=below, top=0.3)
    vmax = (float(np.nanmax(rank)) or 1.0) if panel == "rank" else max(1.0, float(np.nanmax(ratio)))
    norm, cmap = Normalize(0.0, vmax), colormaps["viridis"]
    label, fmt = (f"rank@{_pct(analysis)}", "{:.0f}") if panel == "rank" else ("rank / random-matrix rank", "{:.2f}")
    annotate = len(rows) <= 48 and len(kinds) <= 14
    for (r, c), value in np.ndenumerate(grid):
        if np.isnan(value):
            continue
        cell = Rectangle((c - 0.5, r - 0.5), 1.0, 1.0, facecolor=cmap(norm(value)), edgecolor="white", lw=0.5)
        ax.add_patch(cell)
        of = f" (median of {int(count[r, c])})" if count[r, c] > 1 else ""
        tip(cell, f"layer {rows[r]}, {kinds[c]}: {label} {fmt.format(value)}{of}")
        if annotate:
            shade = "white" if value < 0.6 * vmax else "black"
            ax.text(c, r, fmt.format(value), ha="center", va="center", fontsize=FONT, color=shade)
    ax.set_xlim(-0.5, len(kinds) - 0.5)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xticks(range(len(kinds)), [text(k) for k in kinds], rotation=30, ha="right", fontsize=FONT)
    step = max(1, math.ceil(len(rows) / 40))  # at most ~40 row labels, each ≥ 10 px
    ax.set_yticks(range(0, len(rows), step), rows[::step], fontsize=FONT)
    ax.set_ylabel("layer (block index)", fontsize=FONT)
    ax.set_title(label, fontsize=FONT, loc="left")
    for spine in ax.spines.values():
        spine.set_visible(False)
    w = fig.get_size_inches()[0]
    box = ax.get_position()
    bar = fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap), cax=fig.add_axes((box.x1 + 0.12 / w, box.y0, 0.14 / w, box.height))
    )
    bar.ax.tick_params(labelsize=FONT)
    return fig


def plot_rank_by_depth(runs: Runs, colors: dict[str, str] | None = None) -> Figure:
    """Rank@threshold against block index, one line per module kind (and run); the y axis fits the ranks drawn.

    Random-matrix ranks are drawn dotted per shape when they fall within the axis, and named in the title when
    they are far above it. Points say their matrix and rank on hover.

    Args:
        runs: one analysis, or several to overlay; matrices without a block index are left out.
        colors: kind -> colour (default: `kind_colors(runs)`).
    """
    runs = runs_of(runs)
    colors = colors or kind_colors(runs)
    fig = Figure(figsize=WIDE)
    series = [
        (run, kind, sorted((lm for lm in g if lm.layer is not None), key=lambda lm: lm.layer or 0))
        for run in runs
        for kind, g in by_kind(run.analysis).items()
    ]
    if not any(group for _, _, group in series):
        return _empty(fig, "no matrices with a layer index")
    ax = _axes(fig, left=0.65, right=_legend_width([*colors, *(r.label for r in runs)]), top=0.3)
    top = max(lm.rank for _, _, group in series for lm in group)
    baselines: dict[tuple[int, int], dict[int, int]] = {}  # shape -> layer -> random rank
    for run, kind, group in series:
        if not group:
            continue
        xs = [lm.layer or 0 for lm in group]
        ax.plot(xs, [lm.rank for lm in group], color=colors[kind], ls=run.style, lw=1.5)
        for lm in group:
            (point,) = ax.plot([lm.layer or 0], [lm.rank], "o", color=colors[kind], ms=3.5)
            tip(point, _label(run, f"{lm.name}: rank@{_pct(run.analysis)} {lm.rank} (random {lm.random_rank})"))
            baselines.setdefault((min(lm.shape), max(lm.shape)), {})[lm.layer or 0] = lm.random_rank
    bottom = min(max(lm.rank, 1) for _, _, group in series for lm in group)
    log_scale = top >= 8 * bottom  # ranks of different kinds an order of magnitude apart: each kind stays visible
    ceiling = top * (1.6 if log_scale else 1.25) if top else 4.0
    above = []
    for (m, n), line in baselines.items():
        xs = sorted(line)
        if max(line.values()) > 3.0 * max(top, 1):  # would squeeze the ranks into the bottom of the axis
            above.append(f"{min(line.values())}" + (f"–{max(line.values())}" if len(set(line.values())) > 1 else ""))
            continue
        (dotted,) = ax.plot(xs, [line[x] for x in xs], ":", color="#555", lw=1.2)
        tip(dotted, f"Gaussian matrix {m}×{n}: rank@{_pct(runs[0].analysis)} {line[xs[0]]}")
        ceiling = max(ceiling, max(line.values()) * (1.3 if log_scale else 1.08))
    if log_scale:
        ax.set_yscale("log")
        ax.set_ylim(bottom / 1.5, ceiling)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    else:
        ax.set_ylim(0, ceiling)
    layers = sorted({lm.layer or 0 for _, _, g in series for lm in g})
    ax.set_xlim(layers[0] - 0.3, layers[-1] + 0.3)
    if len(layers) <= 24:
        ax.set_xticks(layers)
    ax.set_xlabel("layer (block index)", fontsize=FONT)
    ax.set_ylabel(f"rank@{_pct(runs[0].analysis)}" + (" (log scale)" if log_scale else ""), fontsize=FONT)
    note = "dotted: random-matrix rank per shape" if len(above) < len(baselines) else ""
    if above:
        note += ("; " if note else "") + f"random-matrix ranks {', '.join(sorted(set(above)))} are above the axis"
    ax.set_title(note, fontsize=SMALL, loc="left", color="#444")
    _legends(ax, runs, colors)
    _style(ax)
    return fig


def plot_captured(analysis: Analysis, colors: dict[str, str] | None = None) -> Figure:
    """Energy-weighted captured energy E(r) at each LoRA rank r, per module kind and overall (grouped bars).

    Reads `analysis.summary`, so bars match the summary table: the most a rank-r LoRA could represent of ΔW. Bars
    take their kind's colour, lighter for smaller r, and say their value on hover.

    Args:
        analysis: the analysis to draw.
        colors: kind -> colour (default: `kind_colors(analysis)`).
    """
    colors = colors or kind_colors(analysis)
    groups = [*analysis.summary.kinds, analysis.summary.overall] if analysis.layers else []
    fig = Figure(figsize=WIDE)
    if not groups:
        return _empty(fig)
    ranks = list(analysis.options.lora_ranks)
    ax = _axes(fig, left=0.65, bottom=0.35 + 0.045 * max(len(g.key) for g in groups), top=0.3)
    width = 0.8 / len(ranks)
    for j, r in enumerate(ranks):
        xs = np.arange(len(groups)) + (j - (len(ranks) - 1) / 2) * width
        shade = 0.35 + 0.65 * (j + 1) / len(ranks)
        for x, g in zip(xs, groups, strict=True):
            value = 100.0 * g.captured.get(r, np.nan)
            (bar,) = ax.bar([x], [value], width=width * 0.92, color=colors.get(g.key, "#444"), alpha=shade)
            tip(bar, f"{g.key}, LoRA r={r}: E(r) = {value:.1f}% of ‖ΔW‖²_F")
    ax.axhline(100.0 * analysis.options.threshold, color="black", lw=1.0, ls="--")
    ax.set_xticks(range(len(groups)), [text(g.key) for g in groups], rotation=20, ha="right", fontsize=FONT)
    ax.set_ylim(0, 105)
    ax.set_ylabel("captured energy E(r), %", fontsize=FONT)
    ax.set_title(
        f"bars left to right: r = {', '.join(map(str, ranks))}; dashed: threshold {_pct(analysis)}",
        fontsize=SMALL,
        loc="left",
        color="#444",
    )
    _style(ax)
    ax.grid(False, axis="x")
    return fig
