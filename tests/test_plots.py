"""plots: the Marchenko–Pastur profile against closed forms and a Gaussian SVD, and each figure's drawn data.

`make_analysis` (also used by test_report.py) builds Analysis records by hand from planted spectra, so these tests
depend on records only, not on the pipeline.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
from matplotlib.figure import Figure

from spectra.records import (
    Analysis,
    CheckpointInfo,
    GroupSummary,
    LayerMetrics,
    Options,
    Recommendation,
    Skipped,
    Summary,
)
from spectra.report.plots import (
    draw_indices,
    marchenko_pastur_profile,
    plot_captured,
    plot_energy,
    plot_rank_by_depth,
    plot_rank_heatmap,
    plot_spectra,
)

KINDS = ("q_proj", "v_proj", "down_proj")


def planted_spectrum(rank: int, length: int, tail: float = 1e-3) -> np.ndarray:
    """`rank` singular values 1.0 plus a tiny tail: rank@0.9 is ceil(0.9·rank), +1 where 0.9·rank is whole."""
    return np.concatenate([np.ones(rank), tail * np.maximum(np.exp(-np.arange(length - rank) / 5.0), 1e-6)])


def _energy_rank(s: np.ndarray, threshold: float) -> int:
    cum = np.cumsum(s**2)
    return int(np.searchsorted(cum, threshold * cum[-1] * (1 - 1e-9))) + 1


def make_layer(
    name: str,
    kind: str,
    layer: int | None,
    s: np.ndarray,
    shape: tuple[int, int],
    options: Options,
    noisy: bool = False,
) -> LayerMetrics:
    """LayerMetrics of a planted spectrum, every number computed here by plain numpy."""
    energy = float(np.sum(s**2))
    p = s[s > 0] / s[s > 0].sum()
    return LayerMetrics(
        name=name,
        shape=shape,
        kind=kind,
        layer=layer,
        rank=_energy_rank(s, options.threshold),
        stable_rank=energy / s[0] ** 2,
        effective_rank=float(np.exp(-np.sum(p * np.log(p)))),
        spectral_norm=float(s[0]),
        frobenius_norm=math.sqrt(energy),
        relative_change=math.sqrt(energy) / 50.0,
        captured={r: float(np.sum(s[:r] ** 2) / energy) for r in options.lora_ranks},
        lora_params={r: r * sum(shape) for r in options.lora_ranks},
        random_rank=25,
        noise_fraction=0.2 if noisy else 1e-4,
        noisy=noisy,
        gd_rank=min(int(np.sum(s > 0.5)), len(s)),
        dtype="bf16",
        method="gram-f64",
        s=s,
    )


def _group(key: str, layers: Sequence[LayerMetrics], ranks: Sequence[int]) -> GroupSummary:
    energies = [lm.frobenius_norm**2 for lm in layers]
    total = sum(energies)
    return GroupSummary(
        key=key,
        n=len(layers),
        median_rank=float(np.median([lm.rank for lm in layers])),
        max_rank=max(lm.rank for lm in layers),
        median_rank_ratio=float(np.median([lm.rank / lm.random_rank for lm in layers])),
        captured={r: sum(lm.captured[r] * e for lm, e in zip(layers, energies, strict=True)) / total for r in ranks},
        energy=total,
        n_noisy=sum(lm.noisy for lm in layers),
    )


def make_analysis(
    n_layers: int = 2,
    kinds: Sequence[str] = KINDS,
    shape: tuple[int, int] = (64, 48),
    names: dict[tuple[int, str], str] | None = None,
    recommendation: Recommendation | None = None,
    length: int | None = None,
    notes: tuple[str, ...] = ("relative change is not reported for adapters",),
    skipped: tuple[Skipped, ...] = (Skipped("model.norm.weight", "not-2d"),),
) -> Analysis:
    """n_layers × kinds matrices; matrix (layer i, kind j) has 4 + 3·j + 2·i equal singular values (and a tail).

    The matrix of layer 0 and the last kind is flagged noisy. `names` overrides checkpoint keys.
    """
    options = Options(threshold=0.9, lora_ranks=(4, 8, 16), device="cpu", precision="exact")
    length = length or min(shape)
    layers = []
    for i in range(n_layers):
        for j, kind in enumerate(kinds):
            name = (names or {}).get((i, kind), f"model.layers.{i}.{kind}.weight")
            s = planted_spectrum(4 + 3 * j + 2 * i, length) * (1.0 + i)
            layers.append(make_layer(name, kind, i, s, shape, options, noisy=(i == 0 and j == len(kinds) - 1)))
    ranks = options.lora_ranks
    summary = Summary(
        overall=_group("all", layers, ranks),
        kinds=tuple(_group(k, [lm for lm in layers if lm.kind == k], ranks) for k in kinds),
        layers=tuple(_group(str(i), [lm for lm in layers if lm.layer == i], ranks) for i in range(n_layers)),
    )
    info = CheckpointInfo(path="base.safetensors", format="safetensors", n_tensors=7, n_bytes=123_456, dtypes=("bf16",))
    return Analysis(
        base="runs/base & co/base.safetensors",
        tuned="runs/tuned.safetensors",
        options=options,
        layers=tuple(layers),
        skipped=skipped,
        summary=summary,
        recommendation=recommendation,
        base_info=info,
        tuned_info=info,
        device="cpu",
        elapsed_s=1.25,
        version="0.1.0",
        created="2025-01-02T03:04:05Z",
        notes=notes,
    )


def empty_analysis() -> Analysis:
    """Nothing analysed: every tensor skipped."""
    return replace(make_analysis(), layers=(), summary=Summary(GroupSummary("all", 0, 0.0, 0, 0.0, {}, 0.0, 0), (), ()))


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
    assert sorted(float(t.get_text()) for t in ratio_ax.texts) == sorted(round(lm.rank / 25, 2) for lm in a.layers)
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
