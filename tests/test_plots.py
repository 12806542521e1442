"""plots: the Marchenko–Pastur profile against closed forms and a Gaussian SVD, and each figure's drawn data.

The Analysis records come from `builders.make_analysis` (planted spectra through the metrics code), not the pipeline.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure

from builders import KINDS, empty_analysis, make_analysis
from spectra.report.plots import (
    draw_indices,
    marchenko_pastur_profile,
    plot_captured,
    plot_energy,
    plot_rank_by_depth,
    plot_rank_heatmap,
    plot_spectra,
)

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


def test_plot_spectra_draws_median_matrix_and_mp_line() -> None:
    a = make_analysis(n_layers=3)
    fig = plot_spectra(a)
    axes = [ax for ax in fig.axes if ax.lines]
    assert len(axes) == len(KINDS)
    ax = axes[1]  # v_proj: planted ranks 7, 9, 11 -> median is layer 1
    median = next(lm for lm in a.layers if lm.kind == "v_proj" and lm.layer == 1)
    bold = [line for line in ax.lines if line.get_linewidth() > 1.5]
    assert len(bold) == 1
    np.testing.assert_allclose(bold[0].get_ydata(), median.s / median.s[0])
    dashed = [line for line in ax.lines if line.get_linestyle() == "--"]
    np.testing.assert_allclose(dashed[0].get_ydata(), marchenko_pastur_profile((64, 48)))
    assert ax.get_yscale() == "log" and ax.get_xlabel() and ax.get_ylabel()
    assert f"rank {median.rank}" in ax.get_title()


def test_plot_spectra_downsamples_long_spectra() -> None:
    fig = plot_spectra(make_analysis(shape=(4096, 4096), length=4096))
    assert max(len(line.get_xdata()) for ax in fig.axes for line in ax.lines) <= 400


def test_plot_energy_crosses_threshold_at_planted_rank() -> None:
    a = make_analysis(n_layers=1)  # one matrix per kind, so the kind's curve is that matrix's E(k)
    ax = plot_energy(a).axes[0]
    curves = {line.get_label(): line for line in ax.lines}
    for lm in a.layers:
        y = np.asarray(curves[lm.kind].get_ydata())
        assert y[lm.rank - 1] >= 90.0 > y[lm.rank - 2]
    assert {round(line.get_xdata()[0]) for line in ax.lines if line.get_linestyle() == ":"} == {4, 8, 16}
    assert ax.get_xscale() == "log" and "%" in ax.get_ylabel()


def test_plot_rank_heatmap_cells_are_planted_ranks() -> None:
    a = make_analysis()
    fig = plot_rank_heatmap(a)
    rank_ax, ratio_ax = fig.axes[:2]
    shown = sorted(int(t.get_text()) for t in rank_ax.texts)
    assert shown == sorted(lm.rank for lm in a.layers)
    ratios = sorted(round(lm.rank / lm.random_rank, 2) for lm in a.layers)
    assert sorted(float(t.get_text()) for t in ratio_ax.texts) == ratios
    assert [t.get_text() for t in rank_ax.get_xticklabels()] == list(KINDS)


def test_plot_rank_by_depth_lines_follow_layers() -> None:
    a = make_analysis(n_layers=4)
    ax = plot_rank_by_depth(a).axes[0]
    q = next(line for line in ax.lines if line.get_label() == "q_proj")
    assert list(q.get_xdata()) == [0, 1, 2, 3]
    assert list(q.get_ydata()) == [lm.rank for lm in a.layers if lm.kind == "q_proj"]


def test_plot_captured_bars_match_summary() -> None:
    a = make_analysis()
    ax = plot_captured(a).axes[0]
    heights = [p.get_height() for p in ax.patches]
    groups = [*a.summary.kinds, a.summary.overall]
    expected = [100 * g.captured[r] for r in a.options.lora_ranks for g in groups]
    np.testing.assert_allclose(heights, expected)


@pytest.mark.parametrize("plot", [plot_spectra, plot_energy, plot_rank_heatmap, plot_rank_by_depth, plot_captured])
def test_plots_handle_an_empty_analysis(plot: object) -> None:
    assert callable(plot)
    assert isinstance(plot(empty_analysis()), Figure)


def test_rendering_never_imports_pyplot() -> None:
    """pyplot keeps global figure state; the library must build Figures directly."""
    if "matplotlib.pyplot" in sys.modules:
        pytest.skip("pyplot was imported by something else in this process")
    from spectra.report.html import render_html

    render_html(make_analysis())
    assert "matplotlib.pyplot" not in sys.modules
