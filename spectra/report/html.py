"""Analysis -> one self-contained HTML page (plots inlined as PNG data URIs, no network); write_report writes it.

The page is rendered from templates/report.html with autoescaping on, so checkpoint keys and paths are escaped.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import jinja2
import markupsafe
from matplotlib.figure import Figure

from spectra.io.files import write_atomic
from spectra.names import SKIP_REASONS
from spectra.records import Analysis
from spectra.report.plots import plot_captured, plot_energy, plot_rank_by_depth, plot_rank_heatmap, plot_spectra

log = logging.getLogger(__name__)

DPI = 100  # PNG resolution: a 9-inch plot is 900 px wide, ~50–150 kB
CAVEAT = (
    "Caveat: these are the ranks needed to reconstruct ΔW, an upper bound in Frobenius norm. The rank a task "
    "needs can be much lower (Biderman et al. 2024): a LoRA that captures a small share of ΔW may still match "
    "the full fine-tune on the task, and rounding noise inflates the rank of small updates."
)


@dataclass(frozen=True, slots=True)
class _Plot:
    """One embedded figure: anchor id, title, how to read it, PNG data URI."""

    id: str
    title: str
    caption: str
    uri: str


@dataclass(frozen=True, slots=True)
class _View:
    """Everything the template shows about one analysis."""

    label: str
    analysis: Analysis
    verdict: tuple[str, ...]
    plots: tuple[_Plot, ...]


_PLOTS: dict[str, tuple[str, Callable[[Analysis], Figure], str]] = {
    "spectra": (
        "Singular value spectra",
        plot_spectra,
        "σ_i/σ₁ on a log scale, one panel per module kind. A flat curve close to the dashed "
        "Marchenko–Pastur line is as spread out as a random matrix; a fast drop means low rank.",
    ),
    "energy": (
        "Cumulative explained energy",
        plot_energy,
        "E(k): the share of ‖ΔW‖_F² in the top k singular directions, energy-weighted over the matrices "
        "of each kind. Where a curve crosses the dashed threshold is its rank; dotted lines are LoRA ranks.",
    ),
    "heatmap": (
        "Rank by layer and module kind",
        plot_rank_heatmap,
        "Left: rank at the threshold. Right: the same divided by the rank of a Gaussian matrix of the "
        "same shape (1 = as spread out as noise).",
    ),
    "depth": (
        "Rank by depth",
        plot_rank_by_depth,
        "Rank at the threshold against the block index, one line per module kind.",
    ),
    "captured": (
        "Captured energy at LoRA ranks",
        plot_captured,
        "The most a rank-r LoRA could represent of ΔW (best rank-r approximation, Eckart–Young), "
        "energy-weighted per module kind.",
    ),
}
COMPARISON_PLOTS = ("spectra", "energy", "captured")


def figure_uri(fig: Figure, dpi: int = DPI) -> str:
    """The figure as a `data:image/png;base64,...` URI (rasterised with Agg; no file is written).

    Args:
        fig: a matplotlib Figure.
        dpi: pixels per inch.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _times(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def verdict(analysis: Analysis) -> tuple[str, ...]:
    """Two to four plain-text sentences: median/max rank vs LoRA and random ranks, coverage, noise, recommendation.

    Args:
        analysis: the analysis to summarise (its summary and recommendation are read, nothing is recomputed).
    """
    layers, overall, opts = analysis.layers, analysis.summary.overall, analysis.options
    if not layers:
        return ("No matrix was analysed, so there is no rank to report (see the skipped tensors below).",)
    tau = f"{opts.threshold * 100:g}%"
    ref = 16 if 16 in opts.lora_ranks else opts.lora_ranks[len(opts.lora_ranks) // 2]
    lines = [
        f"Across {len(layers)} matrices, the rank that explains {tau} of the energy ‖ΔW‖_F² (rank@{tau}) has "
        f"median {overall.median_rank:g} and maximum {overall.max_rank}: {_times(overall.median_rank / ref)}–"
        f"{_times(overall.max_rank / ref)}× LoRA r={ref}."
    ]
    randoms = sorted({lm.random_rank for lm in layers})
    spread = f"{randoms[0]}" if len(randoms) == 1 else f"{randoms[0]}–{randoms[-1]}"
    ratio = overall.median_rank_ratio
    looks = (
        "as spread out as noise"
        if ratio >= 0.8
        else "high-rank, partly noise-like"
        if ratio >= 0.3
        else "far more concentrated than noise"
    )
    lines.append(
        f"A Gaussian matrix of the same shape needs {spread}; the median matrix is at {ratio:.0%} of that ({looks})."
    )
    low, high = opts.lora_ranks[0], opts.lora_ranks[-1]
    cover = f"A rank-{low} LoRA could represent at most {overall.captured.get(low, 0.0):.0%} of ‖ΔW‖_F²"
    if high != low:
        cover += f", rank {high} at most {overall.captured.get(high, 0.0):.0%}"
    lines.append(cover + " (energy-weighted over all matrices).")
    if overall.n_noisy:
        lines.append(
            f"{overall.n_noisy} of {len(layers)} matrices are at or below the storage rounding-noise "
            "floor (flagged ⚠): their rank measures rounding noise, not the update."
        )
    return tuple(lines)


def _view(analysis: Analysis, label: str, which: Sequence[str], index: int | None = None) -> _View:
    made = []
    for key in which:
        title, draw, caption = _PLOTS[key]
        anchor = key if index is None else f"{key}-{index}"
        made.append(_Plot(anchor, title, caption, figure_uri(draw(analysis))))
    return _View(label, analysis, verdict(analysis), tuple(made))


def _num(x: float | int | None) -> str:
    if x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    v = abs(x)
    return f"{x:.0f}" if v >= 100 else f"{x:.1f}" if v >= 10 else f"{x:.3g}"


def _pct(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{100 * x:.1f}%" if 100 * abs(x) >= 0.1 or x == 0 else f"{100 * x:.2g}%"


def _size(n_bytes: int | None) -> str:
    if n_bytes is None:
        return "—"
    size = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{size:.3g} {unit}"
        size /= 1000
    return f"{size:.3g} TB"


def _n_params(analysis: Analysis) -> int:
    return sum(m * n for m, n in (lm.shape for lm in analysis.layers))


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("spectra.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_num, pct=_pct, size=_size)
    env.globals.update(
        caveat=CAVEAT,
        skip_reasons=SKIP_REASONS,
        n_params=_n_params,
        E2=markupsafe.Markup("‖ΔW‖<sub>F</sub><sup>2</sup>"),
    )
    return env


def render_html(analysis: Analysis) -> str:
    """The full report of one analysis as a self-contained HTML document (no external resources).

    Args:
        analysis: a finished or reloaded analysis; no SVD is recomputed.
    """
    view = _view(analysis, "", list(_PLOTS))
    title = f"spectra report: {Path(analysis.tuned).name or analysis.tuned}"
    return _environment().get_template("report.html").render(mode="single", title=title, intro="", views=[view])


def render_comparison_html(analyses: Sequence[tuple[str, Analysis]], title: str, intro: str = "") -> str:
    """One page comparing several analyses side by side: headline ranks per kind, spectra, energy, coverage.

    Args:
        analyses: (label, analysis) pairs, e.g. ("full fine-tune", a1), ("LoRA r=8", a2); labels are escaped.
        title: page title.
        intro: a paragraph shown under the title (plain text, escaped).
    """
    views = [
        _view(analysis, label or f"analysis {i + 1}", COMPARISON_PLOTS, i)
        for i, (label, analysis) in enumerate(analyses)
    ]
    kinds = list(dict.fromkeys(g.key for v in views for g in v.analysis.summary.kinds))
    by_kind = [{g.key: g for g in v.analysis.summary.kinds} for v in views]
    headline = [(kind, [groups.get(kind) for groups in by_kind]) for kind in kinds]
    lora_ranks = sorted({r for v in views for r in v.analysis.options.lora_ranks})
    return (
        _environment()
        .get_template("report.html")
        .render(mode="comparison", title=title, intro=intro, views=views, headline=headline, lora_ranks=lora_ranks)
    )


def write_report(analysis: Analysis, path: str | Path) -> Path:
    """Render the report of `analysis` and write it atomically to `path`; returns the path.

    Args:
        analysis: the analysis to report.
        path: output .html file (missing folders are created). An existing file is replaced.

    Raises:
        SpectraError: the file cannot be written.
    """
    return write_atomic(Path(path), render_html(analysis))


def write_comparison_report(
    analyses: Sequence[tuple[str, Analysis]], path: str | Path, title: str, intro: str = ""
) -> Path:
    """Render `render_comparison_html(analyses, title, intro)` and write it atomically to `path`; returns the path.

    Raises:
        SpectraError: the file cannot be written.
    """
    return write_atomic(Path(path), render_comparison_html(analyses, title, intro))
