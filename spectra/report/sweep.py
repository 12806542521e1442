"""Sweep -> one self-contained HTML page: the task metric against LoRA size (base and full fine-tune as lines, the
tolerance band, the chosen point) next to the ΔW energy the same LoRAs keep, and the table of points.

Template: templates/sweep.html (autoescaped). `spectra report sweep.json` re-renders it (report.compare's
render_record dispatches here).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from spectra.io.files import write_atomic
from spectra.records import EXTRACTED_KINDS, Sweep, SweepPoint
from spectra.report.compare import _environment, figure_uri

LORA_KINDS = (*EXTRACTED_KINDS, "trained")
MARKERS = {"uniform": "o", "budget": "s", "recommendation": "D", "trained": "^"}
COLOURS = {"trained": "#9467bd"}  # a LoRA trained elsewhere, on the metric axes only (its ΔW is not TUNED's)
MIN_SHARE = 1e-6  # a log axis needs x > 0


def _loras(sweep: Sweep) -> list[SweepPoint]:
    return [p for p in sweep.points if p.kind in LORA_KINDS and p.ok and p.params_share > 0]


def _metric_panel(
    ax: Axes, sweep: Sweep, value: Callable[[SweepPoint], float | None], name: str, title: str, band: bool
) -> None:
    """One metric against params share (log x): points by kind, base/full lines, the band, the chosen point."""
    base, full = sweep.points[0], sweep.points[1]
    mb, mf = value(base), value(full)
    if mb is not None:
        ax.axhline(mb, color="#7f7f7f", lw=1.2, ls="--", label=f"base {mb:.4g}")
    if mf is not None:
        ax.axhline(mf, color="#2ca02c", lw=1.2, ls="--", label=f"full fine-tune {mf:.4g}")
    if band and mb is not None and mf is not None:
        edge = mf - sweep.settings.tolerance * (mf - mb)
        ax.axhspan(min(edge, mf), max(edge, mf), color="#2ca02c", alpha=0.12,
                   label=f"within {100 * sweep.settings.tolerance:g}% of the gain")  # fmt: skip
    loras = _loras(sweep)
    for kind, marker in MARKERS.items():
        pts = sorted((p for p in loras if p.kind == kind and value(p) is not None), key=lambda p: p.params_share)
        if pts:
            xs = [max(p.params_share, MIN_SHARE) * 100 for p in pts]
            ys = [float(v) for p in pts if (v := value(p)) is not None]
            label = kind if kind != "trained" else ", ".join(p.label for p in pts)
            ax.plot(xs, ys, marker=marker, ms=9 if kind == "trained" else 6, ls="-" if kind == "uniform" else "none",
                    label=label, color=COLOURS.get(kind, "#1f5fa8"))  # fmt: skip
    chosen = next((p for p in loras if p.label == sweep.chosen), None)
    if chosen is not None and (y := value(chosen)) is not None:
        ax.plot([max(chosen.params_share, MIN_SHARE) * 100], [y], marker="*", ms=16, color="#d62728", ls="none",
                label=f"chosen: {chosen.label}")  # fmt: skip
    better = "lower" if sweep.settings.lower_is_better else "higher"
    _style(ax, f"{name} ({better} is better)", _short(title))


def _style(ax: Axes, ylabel: str, title: str | None = None) -> None:
    if title is not None:
        ax.set_title(title, fontsize=9)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 0.5%, 1%, 2%, 5%: readable, not 10^x
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("LoRA parameters (% of the dense matrices)", fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7.5, loc="best")


def plot_sweep(sweep: Sweep) -> Figure:
    """Panels side by side: the selection metric (with the band), the reported one when they differ, and the
    ΔW energy kept, each against LoRA parameters as a share of the dense matrices (log scale)."""
    panels: list[tuple[Callable[[SweepPoint], float | None], str, str, bool]] = []
    if sweep.select_evaluator is not None:
        panels.append((lambda p: p.select_metric, "selection metric", sweep.select_evaluator, True))
        panels.append((lambda p: p.metric, "reported metric", sweep.evaluator, False))
    else:
        panels.append((lambda p: p.metric, "metric", sweep.evaluator, True))
    fig = Figure(figsize=(5.2 * (len(panels) + 1), 4.0), layout="constrained")
    axes = fig.subplots(1, len(panels) + 1, squeeze=False)[0]
    for ax, (value, name, title, band) in zip(axes, panels, strict=False):
        _metric_panel(ax, sweep, value, name, title, band)
    _energy_panel(axes[-1], sweep)
    return fig


def _energy_panel(ax: Axes, sweep: Sweep) -> None:
    loras = _loras(sweep)
    for kind, marker in MARKERS.items():
        pts = sorted((p for p in loras if p.kind == kind and p.energy_kept is not None), key=lambda p: p.params_share)
        if pts:
            ax.plot([max(p.params_share, MIN_SHARE) * 100 for p in pts], [100 * (p.energy_kept or 0.0) for p in pts],
                    marker=marker, ls="-" if kind == "uniform" else "none", label=kind, color="#ff7f0e")  # fmt: skip
    chosen = next((p for p in loras if p.label == sweep.chosen), None)
    if chosen is not None and chosen.energy_kept is not None:
        ax.plot([max(chosen.params_share, MIN_SHARE) * 100], [100 * chosen.energy_kept], marker="*", ms=16,
                color="#d62728", ls="none", label=f"chosen: {chosen.label}")  # fmt: skip
    ax.set_ylim(0, 105)
    _style(ax, "ΔW energy kept (%)", "what the same LoRAs keep of ‖ΔW‖²")


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def ranks_text(p: SweepPoint) -> str:
    """ "4" for a uniform rung, "1–12 (median 4)" for a per-module allocation, "—" for base and full."""
    if p.n_modules == 0:
        return "—"
    if p.rank_min == p.rank_max:
        return str(p.rank_max)
    return f"{p.rank_min}–{p.rank_max} (median {p.rank_median:g})"


def _shown_path(path: str) -> str:
    """The last two parts of a path ("full/model.safetensors"): a bare "model.safetensors" says nothing."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts else path


def sweep_html(sweep: Sweep) -> str:
    """The page of a `sweep` record: the reason, the curves (metric and energy against size), the table, notes."""
    return (
        _environment()
        .get_template("sweep.html")
        .render(
            title=f"spectra sweep: {_shown_path(sweep.tuned)}",
            s=sweep,
            plot=figure_uri(plot_sweep(sweep)),
            ranks=ranks_text,
        )
    )


def write_sweep_report(sweep: Sweep, path: str | Path) -> Path:
    """Render `sweep_html(sweep)` and write it atomically to `path`; returns the path.

    Raises:
        SpectraError: the file cannot be written.
    """
    return write_atomic(Path(path), sweep_html(sweep))
