"""Comparison / Trajectory / SideBySide -> one self-contained HTML page each (plots inlined as PNG data URIs).

`write_record_report(record, path)` renders any saved record, so `spectra report FILE` re-renders whatever FILE
holds without recomputing. Templates: templates/comparison.html, templates/trajectory.html (autoescaped).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib.figure import Figure

from spectra.compare.records import Comparison, MatrixComparison, Record, SideBySide, Trajectory
from spectra.errors import SpectraError
from spectra.io.files import write_atomic
from spectra.names import SKIP_REASONS
from spectra.records import Analysis, Sweep
from spectra.report.compare_plots import (
    plot_amplification,
    plot_angles,
    plot_captured_by_step,
    plot_change_by_step,
    plot_intruders,
    plot_rank_by_layer,
    plot_rank_by_step,
    plot_similarity_diagonal,
    plot_similarity_grids,
    plot_step_similarity,
)
from spectra.report.html import render_comparison_html, render_html

DPI = 100

DEFINITIONS = (
    (
        "Subspace similarity φ(i, j)",
        "‖U_A[:, :i]ᵀ U_B[:, :j]‖_F² / min(i, j) with U the leading singular vectors of each ΔW (Hu et al. 2021, "
        "“LoRA”, Eq. 4): 1 when the smaller subspace lies inside the larger one, 0 when they are orthogonal. Two "
        "random subspaces of a d-dimensional space give max(i, j)/d on average: the chance level.",
    ),
    (
        "Principal angles",
        "arccos of the singular values of U_A[:, :k]ᵀ U_B[:, :k]: 0° for a direction both updates share, 90° for "
        "one only one of them uses.",
    ),
    (
        "Intruder dimensions",
        "Among the top-k (10) left singular vectors of W_tuned, those whose largest |cosine| with every left "
        "singular vector of W_base is below ε (0.5): new directions the fine-tune put among the weight's most "
        "important ones (Shuttleworth et al. 2024, “LoRA vs Full Fine-tuning: An Illusion of Equivalence”; the "
        "definition of PEFT's intruder helper). The paper finds them in LoRA (r ≤ 256), rarely in full fine-tuning.",
    ),
    (
        "Amplification",
        "‖ΔW‖_F / ‖U_rᵀ W V_r‖_F with U_r, V_r the top-r singular vectors of ΔW and W the base weight (Hu et al. "
        "2021 §7.3): large when the update amplifies directions W itself barely uses (21.5 for GPT-3 W_q at r = 4).",
    ),
)


@dataclass(frozen=True, slots=True)
class _Plot:
    id: str
    title: str
    caption: str
    uri: str


def figure_uri(fig: Figure, dpi: int = DPI) -> str:
    """The figure as a `data:image/png;base64,...` URI (no file is written)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plots(record: Any, specs: tuple[tuple[str, str, Callable[[Any], Figure], str], ...]) -> list[_Plot]:
    return [_Plot(anchor, title, caption, figure_uri(draw(record))) for anchor, title, draw, caption in specs]


def _num(x: float | int | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "—"
    if isinstance(x, int):
        return str(x)
    v = abs(x)
    return f"{x:.0f}" if v >= 100 else f"{x:.1f}" if v >= 10 else f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


@lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("spectra.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(num=_num, pct=_pct)
    env.globals.update(skip_reasons=SKIP_REASONS, definitions=DEFINITIONS)
    return env


def phi_at(values: np.ndarray, k: int) -> float | None:
    """φ(k, k) from a diagonal (None beyond its length)."""
    return float(values[k - 1]) if 0 < k <= values.size and np.isfinite(values[k - 1]) else None


def mean_angle(mc: MatrixComparison, k: int) -> float | None:
    angles = mc.angles.get(k)
    return float(np.mean(angles)) if angles is not None and angles.size else None


COMPARISON_PLOTS = (
    ("grids", "Subspace similarity per module kind", plot_similarity_grids,
     "Mean φ(i, j) over the matrices of each kind; i counts A's top singular vectors, j B's. Bright = shared "
     "directions; the chance level of random subspaces is in each title."),
    ("diagonal", "φ(i, i) against i", plot_similarity_diagonal,
     "The diagonal of the grids, per kind; dotted: the chance level i/d of random subspaces."),
    ("angles", "Principal angles", plot_angles,
     "Principal angles between the top-k subspaces (largest k), ascending, mean per kind. 0°: shared, 90°: not."),
    ("intruders", "Intruder dimensions", plot_intruders,
     "Left: intruders among the top singular vectors of W_tuned, summed over all matrices, against ε. Right: per "
     "kind at the headline ε (solid A, hatched B)."),
    ("amplification", "Amplification", plot_amplification,
     "Median ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F per kind (log scale; 1 = the update lies along W's own strong directions)."),
)  # fmt: skip

TRAJECTORY_PLOTS = (
    ("by-layer", "Rank by layer at each checkpoint", plot_rank_by_layer,
     "Rank@τ against block index, one line per checkpoint (dark = early, yellow = late), one panel per kind: "
     "the layout of Biderman et al. 2024, Fig. 6."),
    ("by-step", "Rank against step", plot_rank_by_step, "Median rank@τ over the layers of each module kind."),
    ("change", "Relative change against step", plot_change_by_step,
     "Median ‖ΔW‖_F / ‖W_base‖_F per module kind (log scale)."),
    ("captured", "Captured energy against step", plot_captured_by_step,
     "The most a rank-r LoRA could represent of ΔW (energy-weighted over all matrices), per LoRA rank r."),
)  # fmt: skip
SIMILARITY_PLOT = (
    ("similarity", "Similarity of consecutive checkpoints", plot_step_similarity,
     "φ(k, k) between the top-k singular vectors of ΔW at a checkpoint and at the one before, mean per kind; "
     "1 = same directions, dotted = chance k/d (new directions)."),
)  # fmt: skip


def intruder_sweep(comparison: Comparison) -> list[tuple[str, list[int]]]:
    """(label, intruders summed over all matrices at each ε of the sweep) for A and B."""
    eps = comparison.settings.epsilons
    return [
        (comparison.labels[0], [sum(kc.intruders_a.get(e, 0) for kc in comparison.kinds) for e in eps]),
        (comparison.labels[1], [sum(kc.intruders_b.get(e, 0) for kc in comparison.kinds) for e in eps]),
    ]


def render_comparison_page(comparison: Comparison) -> str:
    """The page of a `compare` record: definitions, per-kind and per-matrix tables, heatmaps and sweeps."""
    a, b = comparison.labels
    return (
        _environment()
        .get_template("comparison.html")
        .render(
            title=f"spectra compare: {a} vs {b}",
            c=comparison,
            plots=_plots(comparison, COMPARISON_PLOTS),
            phi_at=phi_at,
            mean_angle=mean_angle,
            sweep=intruder_sweep(comparison),
        )
    )


def render_trajectory_page(trajectory: Trajectory) -> str:
    """The page of a `trajectory` record: per-checkpoint and per-kind tables, rank by layer and by step."""
    specs = TRAJECTORY_PLOTS + (SIMILARITY_PLOT if trajectory.similarity else ())
    medians = {
        kind: [g.median_rank if g is not None else None for g in trajectory.kind_series(kind)]
        for kind in trajectory.kinds()
    }
    return (
        _environment()
        .get_template("trajectory.html")
        .render(
            title=f"spectra trajectory: {len(trajectory.points)} checkpoints",
            t=trajectory,
            plots=_plots(trajectory, specs),
            medians=medians,
            change=[_median_change(p.matrices) for p in trajectory.points],
        )
    )


def _median_change(matrices: Any) -> float | None:
    values = [m.relative_change for m in matrices if m.relative_change is not None]
    return float(np.median(values)) if values else None


def render_record(record: Record | Sweep) -> str:
    """The HTML page of any saved record: an analysis, a side-by-side set of analyses, a comparison, a trajectory,
    a sweep."""
    if isinstance(record, Analysis):
        return render_html(record)
    if isinstance(record, SideBySide):
        title = "spectra: " + " vs ".join(record.labels)
        return render_comparison_html(list(zip(record.labels, record.analyses, strict=True)), title)
    if isinstance(record, Comparison):
        return render_comparison_page(record)
    if isinstance(record, Trajectory):
        return render_trajectory_page(record)
    if isinstance(record, Sweep):
        from spectra.report.sweep import sweep_html  # it imports this module

        return sweep_html(record)
    raise SpectraError(f"no report for a {type(record).__name__} record")


def write_record_report(record: object, path: str | Path) -> Path:
    """Render `record` (as `render_record`) and write it atomically to `path`; returns the path.

    Raises:
        SpectraError: not a spectra record, or the file cannot be written.
    """
    if not isinstance(record, Analysis | SideBySide | Comparison | Trajectory | Sweep):
        raise SpectraError(f"no report for a {type(record).__name__} record")
    return write_atomic(Path(path), render_record(record))
