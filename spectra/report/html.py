"""Analysis -> one self-contained HTML page (plots inlined as SVG with hover titles, no network); write_report
writes it.

The page is rendered from templates/report.html with autoescaping on, so checkpoint keys and paths are escaped. It
opens with a headline of four numbers and a verdict of at most three sentences; the recommendation and the caveat
appear once each.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePath

import jinja2
import markupsafe
from matplotlib.figure import Figure

from spectra.io.files import write_atomic
from spectra.lora.usage import KindUse, is_adapter, kind_use, rank_use, use_sentences
from spectra.names import CAVEAT, SKIP_REASONS
from spectra.records import Analysis, CheckpointInfo
from spectra.report import plots
from spectra.report.plots import Run
from spectra.report.svg import figure_svg, natural_width, svg_style

log = logging.getLogger(__name__)

MIN_SCALE = 0.85  # a panel is never drawn below 85% of its natural size: 9 pt text stays ≥ 10 CSS px
GENERIC_STEMS = ("model", "weights", "adapter_model", "pytorch_model", "consolidated", "diffusion_pytorch_model")


@dataclass(frozen=True, slots=True)
class _Plot:
    """One plot of the page: anchor id, title, how to read it, its SVG panels and how they are laid out."""

    id: str
    title: str
    caption: str
    panels: tuple[markupsafe.Markup, ...]
    wide: bool  # spans the page (a grid of panels) rather than one column
    min_px: int  # narrowest a panel may be before the grid puts fewer per row


@dataclass(frozen=True, slots=True)
class _Stat:
    """One headline number."""

    label: str
    value: str
    detail: str


@dataclass(frozen=True, slots=True)
class _View:
    """Everything the template shows about one analysis."""

    label: str
    name: str
    analysis: Analysis
    stats: tuple[_Stat, ...]
    verdict: tuple[str, ...]
    kind_use: tuple[KindUse, ...]
    use_sentences: tuple[str, ...]


def model_name(path: str | None) -> str:
    """A short name for a checkpoint path: the folder of a generic file name ("llama-ft" for
    llama-ft/model.safetensors), else folder/stem ("pair/tuned"), a folder's or hub id's last part."""
    if path is None:
        return "—"
    p = PurePath(path)
    if p.suffix == ".safetensors":
        if p.stem in GENERIC_STEMS or p.stem.startswith("model-0"):
            return p.parent.name or p.stem
        return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem
    return p.name.split("@", 1)[0] or str(path)  # a hub id org/name@revision: name


def _config_name(info: CheckpointInfo | None) -> str | None:
    """The model name a config gives (config.json `_name_or_path`, an adapter's base model): a hub id as is, a local
    path by its last part."""
    name = info.model.name_or_path if info is not None and info.model is not None else None
    if not name:
        return None
    return PurePath(name).name if name.startswith(("/", ".", "~")) or "\\" in name else name


def report_title(analysis: Analysis) -> str:
    """The page title: the fine-tune's own name (its config's, when it differs from the base's), else "<base> fine-tune"
    from the base's config, else the tuned folder's name; an adapter's folder name."""
    tuned, base = _config_name(analysis.tuned_info), _config_name(analysis.base_info)
    if analysis.tuned_info.format in ("peft-adapter", "peft-model"):
        return model_name(analysis.tuned)
    if tuned and tuned != base:
        return tuned
    if base:
        return f"{base} fine-tune"
    return model_name(analysis.tuned)


def base_name(analysis: Analysis) -> str | None:
    """The base model's name for the subtitle: its config's, an adapter's base model, or the base path's; None for
    an adapter alone whose config names no base."""
    if analysis.base is None:
        return _config_name(analysis.tuned_info)
    return _config_name(analysis.base_info) or model_name(analysis.base)


def code_spans(text: str) -> markupsafe.Markup:
    """Plain text with `backticked` spans as <code>, everything escaped."""
    parts = str(markupsafe.escape(text)).split("`")
    return markupsafe.Markup("".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts)))


def _ref_rank(analysis: Analysis) -> int:
    ranks = analysis.options.lora_ranks
    return 16 if 16 in ranks else ranks[len(ranks) // 2]


def headline(analysis: Analysis) -> tuple[_Stat, ...]:
    """The four numbers at the top: the LoRA rank to use (or an adapter's r), median rank@τ, E(r = 16), rank/random."""
    o, tau = analysis.summary.overall, f"{analysis.options.threshold * 100:g}%"
    if not analysis.layers:
        return (_Stat(f"rank@{tau}", "—", "no matrix was analysed"),)
    uses = rank_use(analysis)
    rec = analysis.recommendation
    if uses:
        kinds = kind_use(uses)
        rs = sorted({u.r for u in uses})
        first = _Stat(
            "adapter rank r",
            f"{rs[0]}" if len(rs) == 1 else f"{rs[0]}–{rs[-1]}",
            f"{sum(k.n_saturated for k in kinds)} of {len(uses)} modules saturate r, "
            f"{sum(k.n_fraction for k in kinds)} use at most half",
        )
    elif rec is not None:
        option = next((t for t in rec.tradeoff if t.r == rec.uniform_rank), None)
        share = f" with {option.params_fraction:.1%} of the targeted weights' parameters" if option else ""
        first = _Stat("recommended LoRA", f"r = {rec.uniform_rank}", f"captures {rec.uniform_captured:.1%}{share}")
    else:
        first = _Stat("recommended LoRA", "—", "no recommendation for this analysis")
    ref = _ref_rank(analysis)
    return (
        first,
        _Stat(f"median rank@{tau}", f"{o.median_rank:g}", f"max {o.max_rank} over {o.n} matrices"),
        _Stat(f"E(r = {ref})", _pct(o.captured.get(ref, 0.0)), f"of ΔW's energy a rank-{ref} LoRA could hold at most"),
        _Stat("rank / random", f"{o.median_rank_ratio:.2f}", "median; 1 = as spread out as a random matrix"),
    )


def verdict(analysis: Analysis) -> tuple[str, ...]:
    """At most three short plain-text sentences: how concentrated ΔW is, which kinds need the most and least rank,
    and the noise floor or (for an adapter) how much of r is used.

    Args:
        analysis: the analysis to summarise (its summary is read, nothing is recomputed).
    """
    layers, overall = analysis.layers, analysis.summary.overall
    if not layers:
        return ("No matrix was analysed, so there is no rank to report (see the skipped tensors below).",)
    tau = f"{analysis.options.threshold * 100:g}%"
    ratio = overall.median_rank_ratio
    looks = (
        "as spread out as noise"
        if ratio >= 0.8
        else "high-rank, partly noise-like"
        if ratio >= 0.3
        else "low-rank, far more concentrated than noise"
    )
    lines = [
        f"ΔW is {looks}: the median matrix needs {overall.median_rank:g} directions for {tau} of its energy "
        f"(max {overall.max_rank}), {ratio:.0%} of what a random matrix of its shape needs."
    ]
    kinds = sorted(analysis.summary.kinds, key=lambda g: g.median_rank)
    if len(kinds) > 1 and kinds[0].median_rank != kinds[-1].median_rank:
        lines.append(
            f"{kinds[-1].key} needs the most rank (median {kinds[-1].median_rank:g}), "
            f"{kinds[0].key} the least ({kinds[0].median_rank:g})."
        )
    if overall.n_noisy:
        lines.append(
            f"{overall.n_noisy} of {len(layers)} matrices are at the storage rounding-noise floor (⚠): their rank "
            "measures rounding, not the update."
        )
    elif is_adapter(analysis):
        lines.append(use_sentences(analysis)[0])
    return tuple(lines)


def _svg(fig: Figure, anchor: str, label: str) -> markupsafe.Markup:
    return markupsafe.Markup(figure_svg(fig, anchor, label))


def _plot(anchor: str, title: str, caption: str, figures: Sequence[Figure], wide: bool) -> _Plot:
    panels = tuple(_svg(fig, f"{anchor}-{i}", title) for i, fig in enumerate(figures))
    widest = max((natural_width(p) for p in panels), default=0)
    return _Plot(anchor, title, caption, panels, wide, round(MIN_SCALE * widest))


SPECTRA_CAPTION = (
    "σᵢ/σ₁ on a log scale, one panel per module kind: every matrix faint, the median-rank matrix bold (● its "
    "rank), dashed: a Gaussian matrix of the same shape (Marchenko–Pastur). A flat curve near the dashed line is as "
    "spread out as noise; a fast drop means low rank. Hover a line for its matrix."
)
ENERGY_CAPTION = (
    "E(k): the share of ‖ΔW‖²_F in the top k singular directions, energy-weighted over the matrices of each kind. "
    "Where a curve crosses the dashed threshold is its rank; dotted lines are LoRA ranks."
)
CAPTURED_CAPTION = (
    "The most a rank-r LoRA could represent of ΔW (best rank-r approximation, Eckart–Young), energy-weighted per "
    "module kind; hover a bar for its value."
)
HEATMAP_CAPTION = (
    "Left: rank at the threshold per layer and module kind. Right: the same divided by the rank of a Gaussian "
    "matrix of the same shape (1 = as spread out as noise). Hover a cell for its value."
)
DEPTH_CAPTION = "Rank at the threshold against the block index, one line per module kind; hover a point for its matrix."


def _single_plots(analysis: Analysis) -> tuple[_Plot, ...]:
    colors = plots.kind_colors(analysis)
    return (
        _plot("spectra", "Singular value spectra", SPECTRA_CAPTION, plots.plot_spectra(analysis), True),
        _plot("energy", "Cumulative explained energy", ENERGY_CAPTION, [plots.plot_energy(analysis, colors)], False),
        _plot(
            "captured",
            "Captured energy at LoRA ranks",
            CAPTURED_CAPTION,
            [plots.plot_captured(analysis, colors)],
            False,
        ),
        _plot(
            "heatmap",
            "Rank by layer and module kind",
            HEATMAP_CAPTION,
            [plots.plot_rank_heatmap(analysis, panel) for panel in plots.HEATMAPS],
            True,
        ),
        _plot("depth", "Rank by depth", DEPTH_CAPTION, [plots.plot_rank_by_depth(analysis, colors)], False),
    )


def _overlay_plots(runs: Sequence[Run]) -> tuple[_Plot, ...]:
    """The comparison's plots: every run on the same axes, a colour per module kind, a line style per run."""
    colors = plots.kind_colors(runs)
    styles = ", ".join(
        f"{'solid' if r.style == '-' else 'dashed' if r.style == '--' else 'dotted'}: {r.label}" for r in runs
    )
    figures: list[tuple[str, str, str, Callable[[], list[Figure]], bool]] = [
        ("spectra", "Singular value spectra", SPECTRA_CAPTION, lambda: plots.plot_spectra(runs), True),
        ("energy", "Cumulative explained energy", ENERGY_CAPTION, lambda: [plots.plot_energy(runs, colors)], False),
        ("depth", "Rank by depth", DEPTH_CAPTION, lambda: [plots.plot_rank_by_depth(runs, colors)], False),
    ]
    return tuple(_plot(a, t, f"{c} Line styles — {styles}.", draw(), wide) for a, t, c, draw, wide in figures)


def _view(analysis: Analysis, label: str = "") -> _View:
    uses = rank_use(analysis)
    return _View(
        label=label,
        name=report_title(analysis),
        analysis=analysis,
        stats=headline(analysis),
        verdict=verdict(analysis),
        kind_use=kind_use(uses),
        use_sentences=use_sentences(analysis),
    )


def _num(x: float | int | None) -> str:
    if x is None:
        return "—"
    if isinstance(x, int):
        return str(x)
    v = abs(x)
    return f"{x:.0f}" if v >= 100 else f"{x:.1f}" if v >= 10 else f"{x:.3g}"


def _alpha(alpha: object) -> str:
    """lora_alpha as written, a float shortened (2√8 = 5.65685…)."""
    return f"{alpha:.4g}" if isinstance(alpha, float) else str(alpha)


def _pct(x: float | None) -> str:
    """A share in percent: one decimal (rounded down near 100%, so a shortfall never reads 100.0%)."""
    if x is None:
        return "—"
    if 0.999 <= x < 1.0:
        return f"{math.floor(1000 * x) / 10:.1f}%"
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
    env.filters.update(num=_num, pct=_pct, size=_size, code=code_spans, alpha=_alpha)
    env.globals.update(
        caveat=CAVEAT,
        skip_reasons=SKIP_REASONS,
        n_params=_n_params,
        model_name=model_name,
        base_name=base_name,
        E2=markupsafe.Markup("‖ΔW‖<sub>F</sub><sup>2</sup>"),
    )
    return env


def render_html(analysis: Analysis) -> str:
    """The full report of one analysis as a self-contained HTML document (no external resources).

    Args:
        analysis: a finished or reloaded analysis; no SVD is recomputed.
    """
    view = _view(analysis)
    with svg_style():
        figures = _single_plots(analysis)
    return (
        _environment()
        .get_template("report.html")
        .render(mode="single", title=view.name, intro="", views=[view], plots=figures)
    )


def render_comparison_html(analyses: Sequence[tuple[str, Analysis]], title: str, intro: str = "") -> str:
    """One page comparing several analyses: headline ranks per kind, their spectra, energy and ranks by depth
    overlaid on shared axes (a colour per module kind, a line style per analysis), then each one's details.

    Args:
        analyses: (label, analysis) pairs, e.g. ("full fine-tune", a1), ("LoRA r=8", a2); labels are escaped.
        title: page title.
        intro: a paragraph shown under the title (plain text, escaped).
    """
    views = [_view(a, label or f"analysis {i + 1}") for i, (label, a) in enumerate(analyses)]
    runs = [Run(v.label, v.analysis, i) for i, v in enumerate(views)]
    kinds = list(dict.fromkeys(g.key for v in views for g in v.analysis.summary.kinds))
    by_kind = [{g.key: g for g in v.analysis.summary.kinds} for v in views]
    headline_rows = [(kind, [groups.get(kind) for groups in by_kind]) for kind in kinds]
    lora_ranks = sorted({r for v in views for r in v.analysis.options.lora_ranks})
    with svg_style():
        figures = _overlay_plots(runs) if runs else ()
    return (
        _environment()
        .get_template("report.html")
        .render(
            mode="comparison",
            title=title,
            intro=intro,
            views=views,
            plots=figures,
            headline=headline_rows,
            lora_ranks=lora_ranks,
        )
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
