"""Analysis -> matplotlib Figures for the HTML report: one plot per module kind, never one per matrix.

Figures are built with the `Figure` class (no pyplot, no global state, no files); `report` rasterises them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from spectra.records import Analysis, LayerMetrics

log = logging.getLogger(__name__)

MAX_POINTS = 400  # points drawn per spectrum line; longer spectra are subsampled for drawing only
LOG_FLOOR = 1e-6  # lowest σ/σ₁ drawn on the log axis (fp32 tails below it are rounding, not signal)
_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")


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


def _by_kind(analysis: Analysis) -> dict[str, list[LayerMetrics]]:
    groups: dict[str, list[LayerMetrics]] = {k: [] for k in kind_order(analysis.layers)}
    for lm in analysis.layers:
        groups[lm.kind].append(lm)
    return groups


def _color(i: int) -> str:
    return _COLORS[i % len(_COLORS)]


def _median_matrix(group: Sequence[LayerMetrics]) -> LayerMetrics:
    """The matrix whose rank is the (lower) median of the group."""
    ordered = sorted(group, key=lambda lm: (lm.rank, lm.layer if lm.layer is not None else -1))
    return ordered[(len(ordered) - 1) // 2]


def _empty(fig: Figure, message: str = "no analysed matrices") -> Figure:
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="#555")
    ax.set_axis_off()
    return fig


def _pct(analysis: Analysis) -> str:
    return f"{analysis.options.threshold * 100:g}%"


def plot_spectra(analysis: Analysis) -> Figure:
    """Normalised singular values σ_i/σ₁ of ΔW on a log scale, one panel per module kind.

    Each panel draws every matrix of the kind faintly, the median-rank matrix bold with a dot at its rank, and the
    Marchenko–Pastur profile of a Gaussian matrix of that shape (dashed) for comparison.

    Args:
        analysis: the analysis to draw; its spectra are subsampled for drawing (MAX_POINTS per line).
    """
    groups = _by_kind(analysis)
    n_cols = min(4, max(len(groups), 1))
    n_rows = max(math.ceil(len(groups) / n_cols), 1)
    width, height = 3.6 * n_cols + 0.4, 2.9 * n_rows + 0.6
    fig = Figure(figsize=(width, height))
    if not groups:
        return _empty(fig)
    # fixed margins in inches: constrained layout costs seconds on many log axes
    axes = fig.subplots(
        n_rows,
        n_cols,
        squeeze=False,
        gridspec_kw={
            "left": 0.75 / width,
            "right": 1 - 0.15 / width,
            "bottom": 0.5 / height,
            "top": 1 - 0.75 / height,
            "wspace": 0.4,
            "hspace": 0.55,
        },
    )
    for i, (kind, group) in enumerate(groups.items()):
        ax: Axes = axes.flat[i]
        median = _median_matrix(group)
        low = 1.0
        for lm in [*(lm for lm in group if lm is not median), median]:  # the median last, drawn on top
            if not len(lm.s) or lm.s[0] <= 0.0:
                continue
            bold = lm is median
            idx = draw_indices(len(lm.s), MAX_POINTS if bold else MAX_POINTS // 2)
            y = lm.s[idx] / lm.s[0]
            y = np.where(y > 0.0, y, np.nan)
            ax.plot(
                idx + 1,
                y,
                color=_color(i) if bold else "#888",
                lw=1.8 if bold else 0.6,
                alpha=1.0 if bold else 0.35,
                zorder=3 if bold else 2,
            )
            low = min(low, float(np.nanmin(y)) if np.any(y > 0.0) else 1.0)
        if median.rank >= 1 and len(median.s) >= median.rank and median.s[0] > 0.0:
            ax.plot([median.rank], [median.s[median.rank - 1] / median.s[0]], "o", color="black", ms=4, zorder=4)
        mp = marchenko_pastur_profile(median.shape)
        idx = draw_indices(len(mp))
        ax.plot(idx + 1, mp[idx], "--", color="black", lw=1.0, zorder=3)
        ax.set_yscale("log")
        ax.set_ylim(max(low * 0.5, LOG_FLOOR), 1.5)
        ax.set_xlim(0, max(min(lm.shape) for lm in group) + 1)
        layer = "" if median.layer is None else f"layer {median.layer}, "
        ax.set_title(f"{kind}  ({layer}rank {median.rank})", fontsize=9)
        ax.set_xlabel("singular value index i", fontsize=8)
        ax.set_ylabel(r"$\sigma_i\,/\,\sigma_1$ (log scale)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes.flat[len(groups) :]:
        ax.set_axis_off()
    fig.suptitle(
        f"Singular value spectra of ΔW — bold: median-rank matrix (● its rank@{_pct(analysis)}), "
        "grey: other layers, dashed: Gaussian matrix of the same shape (Marchenko–Pastur)",
        fontsize=9,
    )
    return fig


def _kind_energy_curve(group: Sequence[LayerMetrics]) -> np.ndarray | None:
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


def plot_energy(analysis: Analysis) -> Figure:
    """Cumulative explained energy E(k) per module kind (energy-weighted over its matrices), log k axis.

    A horizontal line marks the analysis threshold, dotted vertical lines the LoRA ranks of the options.

    Args:
        analysis: the analysis to draw.
    """
    fig = Figure(figsize=(9.0, 4.6), layout="constrained")
    groups = _by_kind(analysis)
    curves = {kind: _kind_energy_curve(group) for kind, group in groups.items()}
    if not any(c is not None for c in curves.values()):
        return _empty(fig, "no analysed matrices with a nonzero ΔW")
    ax = fig.add_subplot()
    longest = 1
    for i, (kind, curve) in enumerate(curves.items()):
        if curve is None:
            continue
        idx = draw_indices(len(curve))
        ax.plot(idx + 1, 100.0 * curve[idx], color=_color(i), lw=1.6, label=kind)
        longest = max(longest, len(curve))
    ax.axhline(100.0 * analysis.options.threshold, color="black", lw=1.0, ls="--", label=f"threshold {_pct(analysis)}")
    for r in analysis.options.lora_ranks:
        if r <= longest:
            ax.axvline(r, color="#555", lw=0.8, ls=":")
            ax.text(r, 101.0, f"r={r}", ha="center", va="bottom", fontsize=7, color="#333")
    ax.set_xscale("log")
    ax.set_xlim(1, longest)
    ax.set_ylim(0, 108)
    ax.set_xlabel("k, number of top singular directions kept (log scale)")
    ax.set_ylabel(r"E(k), share of $\|\Delta W\|_F^2$ (%)")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", ncol=2)
    return fig


def _cell_values(analysis: Analysis) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(row labels, kinds, rank grid, rank/random grid); a cell holding several matrices shows their median."""
    kinds = kind_order(analysis.layers)
    blocks = sorted({lm.layer for lm in analysis.layers if lm.layer is not None})
    rows: list[int | None] = [*blocks, *([None] if any(lm.layer is None for lm in analysis.layers) else [])]
    cells: dict[tuple[int | None, str], list[LayerMetrics]] = {}
    for lm in analysis.layers:
        cells.setdefault((lm.layer, lm.kind), []).append(lm)
    rank = np.full((len(rows), len(kinds)), np.nan)
    ratio = np.full_like(rank, np.nan)
    for (layer, kind), group in cells.items():
        at = (rows.index(layer), kinds.index(kind))
        rank[at] = np.median([lm.rank for lm in group])
        ratio[at] = np.median([lm.rank / lm.random_rank for lm in group])
    return [("—" if r is None else str(r)) for r in rows], kinds, rank, ratio


def plot_rank_heatmap(analysis: Analysis) -> Figure:
    """Rank@threshold by layer (rows) × module kind (columns), and the same divided by the random-matrix rank.

    Args:
        analysis: the analysis to draw; matrices outside any block (e.g. lm_head) form a last row "—".
    """
    if not analysis.layers:
        return _empty(Figure(figsize=(9.0, 3.0)))
    rows, kinds, rank, ratio = _cell_values(analysis)
    fig = Figure(figsize=(max(9.0, 1.5 * len(kinds) + 3.0), max(3.2, 0.24 * len(rows) + 1.8)), layout="constrained")
    axes = fig.subplots(1, 2)
    annotate = rank.size <= 600
    panels = (
        (rank, f"rank@{_pct(analysis)}", "{:.0f}", float(np.nanmax(rank)) or 1.0),
        (ratio, "rank / random-matrix rank", "{:.2f}", max(1.0, float(np.nanmax(ratio)))),
    )
    for ax, (grid, label, fmt, vmax) in zip(axes, panels, strict=True):
        image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(kinds)), kinds, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(rows)), rows, fontsize=7 if len(rows) > 20 else 8)
        ax.set_xlabel("module kind")
        ax.set_ylabel("layer (block index)")
        ax.set_title(label, fontsize=10)
        fig.colorbar(image, ax=ax, shrink=0.9)
        if annotate:
            for (r, c), value in np.ndenumerate(grid):
                if not np.isnan(value):
                    ax.text(
                        c,
                        r,
                        fmt.format(value),
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if value < 0.6 * vmax else "black",
                        in_layout=False,
                    )
    return fig


def plot_rank_by_depth(analysis: Analysis) -> Figure:
    """Rank@threshold against block index, one line per module kind; dotted: that kind's random-matrix rank.

    Args:
        analysis: the analysis to draw; matrices without a block index are left out.
    """
    fig = Figure(figsize=(9.0, 4.4), layout="constrained")
    groups = {
        k: sorted((lm for lm in g if lm.layer is not None), key=lambda lm: lm.layer or 0)
        for k, g in _by_kind(analysis).items()
    }
    if not any(groups.values()):
        return _empty(fig, "no matrices with a layer index")
    ax = fig.add_subplot()
    baselines: dict[tuple[int, int], dict[int, int]] = {}  # shape -> layer -> random rank, one line per shape
    for i, (kind, group) in enumerate(groups.items()):
        if not group:
            continue
        layers = np.array([lm.layer for lm in group], dtype=float)
        ax.plot(layers, [lm.rank for lm in group], "o-", color=_color(i), ms=3, lw=1.4, label=kind)
        for lm in group:
            baselines.setdefault((min(lm.shape), max(lm.shape)), {})[lm.layer or 0] = lm.random_rank
    for (m, n), line in baselines.items():
        xs = sorted(line)
        ax.plot(xs, [line[x] for x in xs], ":", color="#555", lw=1.2)
        ax.annotate(
            f"random matrix {m}×{n}",
            (xs[0], line[xs[0]]),
            xytext=(2, 2),
            textcoords="offset points",
            fontsize=7,
            color="#555",
            va="bottom",
        )
    ax.set_ylim(bottom=0)
    ax.set_xlabel("layer (block index)")
    ax.set_ylabel(f"rank@{_pct(analysis)} (singular directions)")
    ax.set_title("Rank by depth — dotted: random-matrix rank for each shape", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.08, 1.0), title="module kind", title_fontsize=8)
    return fig


def plot_captured(analysis: Analysis) -> Figure:
    """Energy-weighted captured energy E(r) at each LoRA rank r, per module kind and overall (grouped bars).

    Reads `analysis.summary`, so bars match the summary table: the most a rank-r LoRA could represent of ΔW.

    Args:
        analysis: the analysis to draw.
    """
    groups = [*analysis.summary.kinds, analysis.summary.overall] if analysis.layers else []
    fig = Figure(figsize=(max(9.0, 1.1 * len(groups) + 2.0), 4.4), layout="constrained")
    if not groups:
        return _empty(fig)
    ranks = list(analysis.options.lora_ranks)
    ax = fig.add_subplot()
    width = 0.8 / len(ranks)
    shades = colormaps["Blues"](np.linspace(0.35, 0.9, len(ranks)))
    for j, r in enumerate(ranks):
        xs = np.arange(len(groups)) + (j - (len(ranks) - 1) / 2) * width
        values = [100.0 * g.captured.get(r, np.nan) for g in groups]
        bars = ax.bar(xs, values, width=width * 0.95, color=shades[j], label=f"r={r}")
        if len(groups) * len(ranks) <= 48:
            ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.axhline(100.0 * analysis.options.threshold, color="black", lw=1.0, ls="--", label=f"threshold {_pct(analysis)}")
    ax.set_xticks(range(len(groups)), [g.key for g in groups], rotation=20, ha="right")
    ax.set_ylim(0, 105)
    ax.set_xlabel("module kind (energy-weighted over its matrices)")
    ax.set_ylabel(r"captured energy E(r), % of $\|\Delta W\|_F^2$")
    ax.legend(fontsize=8, title="LoRA rank", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(True, axis="y", alpha=0.3)
    return fig
