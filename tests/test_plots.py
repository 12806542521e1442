"""plots: the Marchenko–Pastur profile against closed forms and a Gaussian SVD, and each figure's drawn data.

The Analysis records come from `builders.make_analysis` (planted spectra through the metrics code), not the pipeline.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable

import numpy as np
import pytest
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D
from matplotlib.text import Text

from builders import KINDS, adapter_analysis, empty_analysis, make_analysis
from spectra import Analysis
from spectra.report.plots import (
    Run,
    draw_indices,
    kind_colors,
    marchenko_pastur_profile,
    plot_captured,
    plot_energy,
    plot_rank_by_depth,
    plot_rank_heatmap,
    plot_spectra,
    tip,
    tip_text,
)
from spectra.report.svg import figure_svg, natural_width

# --- Marchenko–Pastur profile -------------------------------------------------------------------------------


def test_mp_profile_square_matches_quarter_circle_quantiles() -> None:
    """q = 1: singular values of X/√n follow the quarter circle on [0, 2], F(s) = (s√(4−s²) + 4 asin(s/2)) / 2π."""
    m = 500
    s = 2.0 * marchenko_pastur_profile((m, m))  # σ/σ₁ · √b, √b = 2
    share_above = 1.0 - (s * np.sqrt(4.0 - s**2) + 4.0 * np.arcsin(s / 2.0)) / (2.0 * math.pi)
    np.testing.assert_allclose(share_above, (np.arange(1, m + 1) - 0.5) / m, atol=2e-4)


@pytest.mark.parametrize("shape", [(64, 48), (1024, 4096), (300, 301), (4096, 11008)])
def test_mp_profile_shape_order_and_mean(shape: tuple[int, int]) -> None:
    m, n = min(shape), max(shape)
    q = m / n
    p = marchenko_pastur_profile(shape)
    assert p.shape == (m,) and np.all(np.diff(p) <= 0) and p[-1] > 0 and p[0] <= 1
    assert np.array_equal(p, marchenko_pastur_profile((shape[1], shape[0])))
    x = p**2 * (1 + math.sqrt(q)) ** 2
    assert abs(x.mean() - 1.0) < 2e-3  # the MP law has mean 1
    assert (1 - math.sqrt(q)) ** 2 - 1e-9 <= x[-1] < (1 - math.sqrt(q)) ** 2 + 0.05


def test_mp_profile_matches_gaussian_svd() -> None:
    """σ_k/√n of a 400×1600 Gaussian matrix against sqrt(x_k) (the profile times √b)."""
    m, n = 400, 1600
    s = np.linalg.svd(np.random.default_rng(0).standard_normal((m, n)), compute_uv=False) / math.sqrt(n)
    expected = marchenko_pastur_profile((m, n)) * (1 + math.sqrt(m / n))
    assert np.max(np.abs(s - expected)) < 0.03
    assert np.max(np.abs(s[5:] - expected[5:])) < 0.01


def test_draw_indices() -> None:
    assert np.array_equal(draw_indices(48), np.arange(48))
    idx = draw_indices(4096)
    assert idx[0] == 0 and idx[-1] == 4095 and np.all(np.diff(idx) > 0) and len(idx) <= 400
    assert np.array_equal(idx[:50], np.arange(50))  # dense head


# --- figures ------------------------------------------------------------------------------------------------


def tips(fig: Figure) -> dict[str, Artist]:
    """Hover text -> artist, for every artist of `fig` given a tip."""
    found = {}
    for artist in fig.findobj():
        text = tip_text(artist.get_gid() or "")
        if text is not None:
            found[text] = artist
    return found


def test_tip_round_trips_any_text() -> None:
    line = Line2D([], [])
    for text in ("model.layers.0.q_proj.weight: rank@90% 8", 'a<b>&"x" ✓ $x$', ""):
        tip(line, text)
        gid = line.get_gid() or ""
        assert tip_text(gid) == text and gid.startswith("tip-") and re.fullmatch(r"[A-Za-z0-9_-]+", gid)
    assert tip_text("line2d_1") is None


def test_plot_spectra_draws_median_matrix_and_mp_line() -> None:
    a = make_analysis(n_layers=3)
    figs = plot_spectra(a)
    assert len(figs) == len(KINDS) and all(len(f.axes) == 1 for f in figs)
    ax = figs[1].axes[0]  # v_proj: planted ranks 7, 9, 11 -> median is layer 1
    median = next(lm for lm in a.layers if lm.kind == "v_proj" and lm.layer == 1)
    bold = [line for line in ax.lines if line.get_linewidth() > 1.5]
    assert len(bold) == 1
    np.testing.assert_allclose(bold[0].get_ydata(), median.s / median.s[0])
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    np.testing.assert_allclose(dashed[0].get_ydata(), marchenko_pastur_profile((64, 48)))
    assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    assert f"rank {median.rank}" in ax.get_title(loc="left")
    hover = tips(figs[1])
    for lm in a.layers:
        if lm.kind == "v_proj":
            assert any(text.startswith(f"{lm.name}: rank@90% {lm.rank} of 48") for text in hover)
    assert any("(median)" in text for text in hover) and any("Marchenko" in text for text in hover)


def test_plot_spectra_downsamples_long_spectra() -> None:
    figs = plot_spectra(make_analysis(shape=(4096, 4096), length=4096))
    assert max(len(line.get_xdata()) for f in figs for ax in f.axes for line in ax.lines) <= 400


def test_adapter_spectra_axes_end_at_r() -> None:
    """An r = 12 adapter's spectra have 12 values: the index axis fits r, not min(m, n) = 48."""
    a = adapter_analysis(r=12)
    for fig in plot_spectra(a):
        ax = fig.axes[0]
        assert 12 <= ax.get_xlim()[1] <= 13
        assert "adapter r" in ax.get_xlabel()


def test_plot_energy_crosses_threshold_at_planted_rank() -> None:
    a = make_analysis(n_layers=1)  # one matrix per kind, so the kind's curve is that matrix's E(k)
    fig = plot_energy(a)
    ax = fig.axes[0]
    hover = tips(fig)
    for lm in a.layers:
        text = next(t for t in hover if t.startswith(f"{lm.kind}: "))
        y = np.asarray(hover[text].get_ydata())  # type: ignore[attr-defined]
        assert y[lm.rank - 1] >= 90.0 > y[lm.rank - 2]
        assert text.endswith(f"at k = {lm.rank}")
    assert {round(line.get_xdata()[0]) for line in ax.lines if line.get_linestyle() == ":"} == {4, 8, 16}
    assert ax.get_xscale() == "log" and "%" in ax.get_ylabel()


def test_overlay_keeps_a_colour_per_kind_and_a_style_per_run() -> None:
    a, b = make_analysis(n_layers=2), make_analysis(n_layers=3, kinds=("q_proj", "o_proj"))
    runs = [Run("full", a, 0), Run("LoRA", b, 1)]
    colors = kind_colors(runs)
    assert list(colors) == [*KINDS, "o_proj"] and len(set(colors.values())) == 4
    for plot in (plot_energy, plot_rank_by_depth):
        fig = plot(runs)
        hover = tips(fig)
        full_q = next(v for t, v in hover.items() if t.startswith("full: ") and "q_proj" in t)
        lora_q = next(v for t, v in hover.items() if t.startswith("LoRA: ") and "q_proj" in t)
        assert full_q.get_color() == lora_q.get_color() == colors["q_proj"]  # type: ignore[attr-defined]
        legend_texts = [t.get_text() for legend in fig.axes[0].findobj(Legend) for t in legend.get_texts()]
        assert {"full", "LoRA", "q_proj", "o_proj"} <= set(legend_texts)
    lines = [line for line in plot_energy(runs).axes[0].lines if line.get_gid()]
    assert {line.get_linestyle() for line in lines} == {"-", "--"}
    q_panel = plot_spectra(runs)[0].axes[0]
    assert {line.get_linestyle() for line in q_panel.lines if line.get_linewidth() > 1.5} == {"-", "--"}


def test_plot_rank_heatmap_cells_are_planted_ranks() -> None:
    a = make_analysis()
    rank_fig, ratio_fig = plot_rank_heatmap(a, "rank"), plot_rank_heatmap(a, "ratio")
    shown = sorted(int(t.get_text()) for t in rank_fig.axes[0].texts)
    assert shown == sorted(lm.rank for lm in a.layers)
    ratios = sorted(round(lm.rank / lm.random_rank, 2) for lm in a.layers)
    assert sorted(float(t.get_text()) for t in ratio_fig.axes[0].texts) == ratios
    assert [t.get_text() for t in rank_fig.axes[0].get_xticklabels()] == list(KINDS)
    hover = tips(rank_fig)
    for lm in a.layers:
        assert f"layer {lm.layer}, {lm.kind}: rank@90% {lm.rank}" in hover
    for fig in (rank_fig, ratio_fig):  # every label ≥ 9 pt: ≥ 10 CSS px at the report's smallest scale
        texts = [t for t in fig.findobj(Text) if t.get_text()]
        assert texts and min(t.get_fontsize() for t in texts) >= 9.0


def test_plot_rank_by_depth_lines_follow_layers_and_the_axis_fits_them() -> None:
    a = make_analysis(n_layers=4)
    fig = plot_rank_by_depth(a)
    ax = fig.axes[0]
    color = kind_colors(a)["q_proj"]
    q = next(line for line in ax.lines if line.get_color() == color and len(line.get_xdata()) > 1)
    assert list(q.get_xdata()) == [0, 1, 2, 3]
    assert list(q.get_ydata()) == [lm.rank for lm in a.layers if lm.kind == "q_proj"]
    top = max(lm.rank for lm in a.layers)  # 15; the random rank of 64×48 (28) is within 3× and is drawn
    assert top < ax.get_ylim()[1] <= 1.3 * 28
    assert any(t.startswith("Gaussian matrix 48×64") for t in tips(fig))
    big = make_analysis(n_layers=2, shape=(4096, 4096), length=64)  # random rank ~2000 ≫ ranks ≤ 13
    ax = plot_rank_by_depth(big).axes[0]
    assert ax.get_ylim()[1] < 40 and "above the axis" in ax.get_title(loc="left")


def test_plot_captured_bars_match_summary() -> None:
    a = make_analysis()
    fig = plot_captured(a)
    heights = [p.get_height() for p in fig.axes[0].patches]
    groups = [*a.summary.kinds, a.summary.overall]
    expected = [100 * g.captured[r] for r in a.options.lora_ranks for g in groups]
    np.testing.assert_allclose(heights, expected)
    assert f"q_proj, LoRA r=4: E(r) = {expected[0]:.1f}% of ‖ΔW‖²_F" in tips(fig)


@pytest.mark.parametrize("plot", [plot_energy, plot_rank_heatmap, plot_rank_by_depth, plot_captured])
def test_plots_handle_an_empty_analysis(plot: Callable[[Analysis], Figure]) -> None:
    assert isinstance(plot(empty_analysis()), Figure)
    assert plot_spectra(empty_analysis()) == []


def test_dollar_signs_in_names_are_text_not_mathtext() -> None:
    names = {(0, "q_proj"): "model.layers.0.$q$.weight", (1, "q_proj"): "model.layers.1.$q$.weight"}
    a = make_analysis(kinds=("q_proj",), names=names)
    for fig in [*plot_spectra(a), plot_energy(a), plot_rank_heatmap(a)]:
        assert "<svg" in figure_svg(fig, "p")


# --- SVG -------------------------------------------------------------------------------------------------------


def test_figure_svg_inlines_titles_and_prefixes_ids() -> None:
    a = make_analysis(names={(1, "v_proj"): 'model.layers.1.a<b>&"x".weight'})
    fig = plot_spectra(a)[1]
    n_tips = len(tips(fig))
    svg = figure_svg(fig, "spectra-1", "Singular value spectra")
    assert svg.startswith("<svg ") and 'viewBox="' in svg and ' width="' not in svg.split(">", 1)[0]
    assert svg.count("<title>") == n_tips > len(KINDS)
    assert "a&lt;b&gt;&amp;&quot;x&quot;" in svg and "<b>" not in svg
    ids = re.findall(r'\sid="([^"]+)"', svg)
    assert ids and all(i.startswith("spectra-1-") for i in ids) and len(ids) == len(set(ids))
    for ref in re.findall(r'(?:url\(#|href="#)([^")]+)', svg):
        assert ref in ids
    geometry = " ".join(re.findall(r'\s(?:d|x|y)="([^"]*)"', svg))
    assert geometry and not re.search(r"\d\.\d{2,}", geometry)  # coordinates at 0.1 pt
    assert natural_width(svg) == round(fig.get_size_inches()[0] * 96)


def test_figure_svg_is_deterministic() -> None:
    a = make_analysis()
    assert figure_svg(plot_energy(a), "e") == figure_svg(plot_energy(a), "e")


def test_rendering_never_imports_pyplot() -> None:
    """pyplot keeps global figure state; the library must build Figures directly."""
    if "matplotlib.pyplot" in sys.modules:
        pytest.skip("pyplot was imported by something else in this process")
    from spectra.report.html import render_html

    render_html(make_analysis())
    assert "matplotlib.pyplot" not in sys.modules
