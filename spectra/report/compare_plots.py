"""Comparison and Trajectory records -> matplotlib Figures (never pyplot). A module kind keeps one colour in every
plot of a page (kinds in order of first appearance, the palette of spectra.report.plots); A is drawn solid, B dashed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from spectra.compare.records import Comparison, Trajectory

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
STYLES = ("-", "--")  # A, B


def kind_colors(kinds: Sequence[str]) -> dict[str, str]:
    """Module kind -> colour, by order of first appearance."""
    return {kind: PALETTE[i % len(PALETTE)] for i, kind in enumerate(dict.fromkeys(kinds))}


def _panels(n: int, width: float = 3.4, height: float = 2.9, cols: int = 4) -> tuple[Figure, list[Axes]]:
    n_cols = min(cols, max(n, 1))
    n_rows = max(math.ceil(n / n_cols), 1)
    fig = Figure(figsize=(width * n_cols + 0.6, height * n_rows + 0.5), layout="constrained")
    grid = fig.subplots(n_rows, n_cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[n:]:
        ax.set_axis_off()
    return fig, axes[:n]


def _empty(message: str) -> Figure:
    fig = Figure(figsize=(6, 1.6))
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="#555")
    ax.set_axis_off()
    return fig


def plot_similarity_grids(comparison: Comparison) -> Figure:
    """Heatmaps of the mean φ(i, j) per module kind (i: vectors of A, j: of B), 0 to 1, the chance level's largest
    value (at the far corner) in each title."""
    kinds = comparison.kinds
    fig, axes = _panels(len(kinds))
    image = None
    for ax, kc in zip(axes, kinds, strict=True):
        a, b = kc.grid.shape
        image = ax.imshow(
            np.ma.masked_invalid(kc.grid), origin="lower", vmin=0.0, vmax=1.0, cmap=colormaps["viridis"],
            extent=(0.5, b + 0.5, 0.5, a + 0.5), aspect="auto", interpolation="nearest",
        )  # fmt: skip
        ax.set_title(
            f"{kc.kind} (n={kc.n}, d={kc.dim})\nchance max(i, j)/d ≤ {min(max(a, b) / kc.dim, 1):.3f}", fontsize=9
        )
        ax.set_xlabel(f"j: top vectors of {comparison.labels[1]}", fontsize=8)
        ax.set_ylabel(f"i: top vectors of {comparison.labels[0]}", fontsize=8)
        ax.tick_params(labelsize=7)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.8, label="φ(i, j)")
    return fig


def plot_similarity_diagonal(comparison: Comparison) -> Figure:
    """φ(i, i) against i per module kind (mean over its matrices), with the chance level i/d dashed."""
    fig = Figure(figsize=(7.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    colors = kind_colors([kc.kind for kc in comparison.kinds])
    for kc in comparison.kinds:
        i = np.arange(1, kc.diagonal.size + 1)
        ax.plot(i, kc.diagonal, color=colors[kc.kind], lw=1.8, label=kc.kind)
        ax.plot(i, np.minimum(i / kc.dim, 1.0), color=colors[kc.kind], lw=0.9, ls=":")
    ax.plot([], [], color="#333", ls=":", lw=0.9, label="chance i/d")
    ax.set_xlabel("i (top-i singular vectors of each ΔW)")
    ax.set_ylabel("φ(i, i)")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(f"Subspace similarity of {comparison.labels[0]} and {comparison.labels[1]}", fontsize=10)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig


def plot_angles(comparison: Comparison) -> Figure:
    """Principal angles between the top-k subspaces (largest k), ascending, mean per module kind."""
    k = max(comparison.settings.top_k)
    fig = Figure(figsize=(7.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    colors = kind_colors([kc.kind for kc in comparison.kinds])
    for kind in colors:
        curves = [mc.angles[k] for mc in comparison.matrices if mc.kind == kind and k in mc.angles]
        size = min((c.size for c in curves), default=0)
        if size:
            ax.plot(np.arange(1, size + 1), np.mean([c[:size] for c in curves], axis=0), color=colors[kind], label=kind)
    ax.axhline(90.0, color="#999", lw=0.8, ls=":")
    ax.set_xlabel(f"principal angle index (top-{k} subspaces)")
    ax.set_ylabel("angle (degrees)")
    ax.set_ylim(0.0, 92.0)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig


def plot_intruders(comparison: Comparison) -> Figure:
    """Left: intruders summed over all matrices against ε, A solid, B dashed. Right: per kind at the headline ε."""
    s = comparison.settings
    kinds = [kc for kc in comparison.kinds if kc.intruders_a or kc.intruders_b]
    if not kinds:
        return _empty("intruder dimensions were not computed")
    fig = Figure(figsize=(10.5, 3.8), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=(1, 1.3))
    for side, label, style in ((0, comparison.labels[0], STYLES[0]), (1, comparison.labels[1], STYLES[1])):
        totals = [sum((kc.intruders_a if side == 0 else kc.intruders_b).get(e, 0) for kc in kinds) for e in s.epsilons]
        left.plot(s.epsilons, totals, ls=style, marker="o", ms=3.5, color="#333", label=label)
    left.axvline(s.epsilon, color="#999", lw=0.8, ls=":")
    left.set_xlabel("ε (max |cos| with the base's singular vectors)")
    left.set_ylabel(f"intruders among the top {s.intruder_k}, all matrices")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    colors = kind_colors([kc.kind for kc in comparison.kinds])
    x = np.arange(len(kinds))
    a = [kc.intruders_a.get(s.epsilon, 0) for kc in kinds]
    b = [kc.intruders_b.get(s.epsilon, 0) for kc in kinds]
    shades = [colors[kc.kind] for kc in kinds]
    right.bar(x - 0.2, a, 0.4, color=shades, label=comparison.labels[0])
    right.bar(x + 0.2, b, 0.4, color=shades, hatch="//", edgecolor="white", alpha=0.7, label=comparison.labels[1])
    right.set_xticks(x, [kc.kind for kc in kinds], rotation=30, ha="right", fontsize=8)
    right.set_ylim(0.0, max(1, *a, *b) * 1.15)
    right.yaxis.get_major_locator().set_params(integer=True)
    right.set_ylabel(f"intruders at ε = {s.epsilon:g}")
    right.legend(fontsize=8)
    return fig


def plot_amplification(comparison: Comparison) -> Figure:
    """Median amplification ‖ΔW‖_F/‖U_rᵀWV_r‖_F per kind at each r: A solid bars, B hatched (log scale)."""
    ranks = comparison.settings.amplification_ranks
    kinds = comparison.kinds
    if not any(v is not None for kc in kinds for v in (*kc.amplification_a.values(), *kc.amplification_b.values())):
        return _empty("amplification was not computed")
    fig, axes = _panels(len(ranks), width=3.8, height=3.2, cols=3)
    colors = kind_colors([kc.kind for kc in kinds])
    x = np.arange(len(kinds))
    for ax, r in zip(axes, ranks, strict=True):
        a = [kc.amplification_a.get(r) or np.nan for kc in kinds]
        b = [kc.amplification_b.get(r) or np.nan for kc in kinds]
        shades = [colors[kc.kind] for kc in kinds]
        ax.bar(x - 0.2, a, 0.4, color=shades)
        ax.bar(x + 0.2, b, 0.4, color=shades, hatch="//", edgecolor="white", alpha=0.7)
        ax.set_yscale("log")
        ax.axhline(1.0, color="#999", lw=0.8, ls=":")
        ax.set_xticks(x, [kc.kind for kc in kinds], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"r = {r}  (solid {comparison.labels[0]}, hatched {comparison.labels[1]})", fontsize=9)
    return fig


def _x(trajectory: Trajectory) -> tuple[list[float], str]:
    steps = [p.step for p in trajectory.points]
    if all(s is not None for s in steps):
        return [float(s) for s in steps if s is not None], "training step"
    return [float(i + 1) for i in range(len(steps))], "checkpoint"


def plot_rank_by_layer(trajectory: Trajectory) -> Figure:
    """Rank@τ against block index, one panel per module kind, one line per checkpoint (Biderman et al. Fig. 6).

    Kinds outside the blocks (embeddings, heads) have no layer axis: they appear in the plots against step.
    """
    kinds = [
        k for k in trajectory.kinds() if any(m.kind == k and m.layer is not None for m in trajectory.points[0].matrices)
    ]
    if not kinds:
        return _empty("no matrix inside a numbered block")
    fig, axes = _panels(len(kinds))
    cmap = colormaps["viridis"]
    n = len(trajectory.points)
    for ax, kind in zip(axes, kinds, strict=True):
        for i, point in enumerate(trajectory.points):
            rows = sorted((m.layer, m.rank) for m in point.matrices if m.kind == kind and m.layer is not None)
            if rows:
                layers, ranks = zip(*rows, strict=True)
                ax.plot(layers, ranks, marker="o", ms=3, color=cmap(i / max(n - 1, 1) * 0.9), label=point.label)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel(f"rank@{trajectory.options.threshold * 100:g}%", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    return fig


def _by_step(trajectory: Trajectory, value: str, ylabel: str, log: bool = False) -> Figure:
    fig = Figure(figsize=(7.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    x, xlabel = _x(trajectory)
    colors = kind_colors(trajectory.kinds())
    for kind, color in colors.items():
        ys = []
        for point in trajectory.points:
            group = [m for m in point.matrices if m.kind == kind]
            values = [v for m in group if (v := (m.rank if value == "rank" else m.relative_change)) is not None]
            ys.append(float(np.median(values)) if values else np.nan)
        ax.plot(x, ys, marker="o", ms=3.5, color=color, label=kind)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig


def plot_rank_by_step(trajectory: Trajectory) -> Figure:
    """Median rank@τ over the layers of each module kind against training step."""
    return _by_step(trajectory, "rank", f"median rank@{trajectory.options.threshold * 100:g}%")


def plot_change_by_step(trajectory: Trajectory) -> Figure:
    """Median relative change ‖ΔW‖_F/‖W_base‖_F of each module kind against training step (log scale)."""
    return _by_step(trajectory, "change", "median ‖ΔW‖_F / ‖W‖_F", log=True)


def plot_captured_by_step(trajectory: Trajectory) -> Figure:
    """Energy-weighted captured energy E(r) over all matrices at each LoRA rank r against training step."""
    fig = Figure(figsize=(7.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    x, xlabel = _x(trajectory)
    ranks = trajectory.options.lora_ranks
    greys = colormaps["plasma"]
    for i, r in enumerate(ranks):
        ys = [100.0 * p.summary.overall.captured.get(r, np.nan) for p in trajectory.points]
        ax.plot(x, ys, marker="o", ms=3.5, color=greys(i / max(len(ranks), 1) * 0.85), label=f"r = {r}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("captured energy E(r), % of ‖ΔW‖_F²")
    ax.set_ylim(0.0, 101.0)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig


def plot_step_similarity(trajectory: Trajectory) -> Figure:
    """φ(k, k) between consecutive checkpoints' top-k vectors per kind (at the later step), chance k/d dotted."""
    if not trajectory.similarity:
        return _empty("vectors were not computed (--with-vectors)")
    fig = Figure(figsize=(7.2, 4.0), layout="constrained")
    ax = fig.add_subplot()
    x, xlabel = _x(trajectory)
    colors = kind_colors(trajectory.kinds())
    later = [x[s.b] for s in trajectory.similarity]
    for kind, color in colors.items():
        ax.plot(later, [s.kinds.get(kind, np.nan) for s in trajectory.similarity], marker="o", color=color, label=kind)
        ax.plot(later, [s.chance.get(kind, np.nan) for s in trajectory.similarity], ls=":", lw=0.9, color=color)
    ax.plot([], [], ls=":", color="#333", label="chance k/d")
    ax.set_xlabel(f"{xlabel} (later of the two)")
    ax.set_ylabel(f"φ({trajectory.settings.top_k}, {trajectory.settings.top_k}) with the previous checkpoint")
    ax.set_ylim(0.0, 1.02)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    return fig
