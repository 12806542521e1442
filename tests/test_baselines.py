"""baselines: the Marchenko–Pastur law against float64 quadrature and sampled noise; the rank rules on planted
signal + Gaussian noise, whose answer is known; the rules inside compute_metrics and recommend."""

from __future__ import annotations

import math

import numpy as np
import pytest

from builders import layer_metrics
from spectra import OptionsError, RecommendSettings, recommend
from spectra.analysis import baselines
from spectra.analysis.baselines import (
    gavish_donoho_rank,
    kept,
    max_lora_rank,
    mp_edge,
    mp_median,
    mp_rank,
    mp_share_above,
    rule_rank,
    stable_rank_ceil,
)
from spectra.analysis.metrics import gavish_donoho_rank as metrics_gd_rank

BETAS = (0.1, 0.25, 0.5, 1.0)


def _mp_quadrature(beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(x, share above x) of the Marchenko–Pastur density, by float64 trapezoid quadrature in θ (x = 1 + β −
    2√β·cos θ removes the endpoint singularities): p(x)dx = sqrt((b−x)(x−a))/(2πβx) · 2√β·sin θ dθ."""
    theta = np.linspace(0.0, math.pi, 200_001)
    x = 1 + beta - 2 * math.sqrt(beta) * np.cos(theta)
    lo, hi = (1 - math.sqrt(beta)) ** 2, (1 + math.sqrt(beta)) ** 2
    root = np.sqrt(np.clip((hi - x) * (x - lo), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):  # x = 0 at θ = 0 when β = 1: take the finite limit
        density = root / (2 * math.pi * beta * x) * 2 * math.sqrt(beta) * np.sin(theta)
    density[~np.isfinite(density)] = density[1]
    pieces = (density[1:] + density[:-1]) / 2 * np.diff(theta)
    above = np.concatenate([np.cumsum(pieces[::-1])[::-1], [0.0]])
    return x, above


@pytest.mark.parametrize("beta", BETAS)
def test_mp_share_and_median_match_quadrature(beta: float) -> None:
    x, above = _mp_quadrature(beta)
    assert above[0] == pytest.approx(1.0, abs=1e-6)  # the density integrates to 1
    for i in range(0, x.size, 20_000):
        assert mp_share_above(float(x[i]), beta) == pytest.approx(float(above[i]), abs=1e-6)
    median = float(np.interp(0.5, above[::-1], x[::-1]))
    assert mp_median(beta) == pytest.approx(median, abs=1e-5)
    assert mp_share_above(-1.0, beta) == 1.0 and mp_share_above(10.0, beta) == 0.0


def test_mp_median_matches_sampled_noise() -> None:
    rng = np.random.default_rng(0)
    m, n = 300, 1200
    eig = np.linalg.svd(rng.standard_normal((m, n)), compute_uv=False) ** 2 / n
    assert float(np.median(eig)) == pytest.approx(mp_median(m / n), rel=0.02)
    with pytest.raises(ValueError):
        mp_median(0.0)


def _planted(m: int, n: int, r: int, strength: float, seed: int, noise: float = 1.0) -> np.ndarray:
    """σ of S + N: S has r singular values `strength`·√n·(1+√β) (times 1..2) on random directions, N i.i.d."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    edge = noise * math.sqrt(n) * (1 + math.sqrt(m / n))
    signal = u @ np.diag(strength * edge * np.linspace(1, 2, r)) @ v.T
    return np.linalg.svd(signal + noise * rng.standard_normal((m, n)), compute_uv=False)


@pytest.mark.parametrize(("m", "n", "r"), [(200, 400, 5), (256, 256, 8), (100, 500, 1)])
def test_mp_rank_counts_the_planted_signal(m: int, n: int, r: int) -> None:
    s = _planted(m, n, r, strength=2.0, seed=r)
    assert mp_rank(s, (m, n)) == r
    assert mp_rank(s, (n, m)) == r  # either orientation
    assert gavish_donoho_rank(s, (m, n)) == r  # GD's threshold is above the edge: same count here
    for seed in range(3):  # pure noise: the bulk stays below the fitted edge (Tracy–Widom: rarely one over)
        assert mp_rank(_planted(m, n, 1, strength=0.0, seed=10 + seed), (m, n)) <= 1


def test_mp_edge_is_fitted_to_the_bulk_not_sigma_1() -> None:
    m, n, scale = 200, 800, 0.03
    noise = np.random.default_rng(3).standard_normal((m, n)) * scale
    s = np.linalg.svd(noise, compute_uv=False)
    true_edge = scale * math.sqrt(n) * (1 + math.sqrt(m / n))
    assert mp_edge(s, (m, n)) == pytest.approx(true_edge, rel=0.02)
    loud = s.copy()
    loud[:3] *= 100  # a few huge directions barely move a median fit
    assert mp_edge(loud, (m, n)) == pytest.approx(mp_edge(s, (m, n)), rel=0.02)


def test_rules_on_short_and_degenerate_spectra() -> None:
    assert mp_rank(np.array([3.0, 2.0]), (64, 64)) == 2  # an adapter's 2 σ: the median is 0, every σ is signal
    assert mp_edge(np.array([3.0, 2.0]), (64, 64)) == 0.0
    assert mp_rank(np.zeros(0), (4, 4)) == 0 and gavish_donoho_rank(np.zeros(0), (4, 4)) == 0
    assert stable_rank_ceil(np.ones(8), 8.0) == 8  # flat rank 8: exactly 8, not 9
    assert stable_rank_ceil(np.array([2.0, 1.0]), 5.0) == 2 and stable_rank_ceil(np.zeros(3), 0.0) == 0
    assert kept(np.array([3.0, 1.0]), 1, 10.0) == pytest.approx(0.9) and kept(np.array([1.0]), 0, 1.0) == 0.0
    s = np.random.default_rng(4).random(50)
    assert gavish_donoho_rank(s, (50, 70)) == metrics_gd_rank(s, (50, 70))  # the same rule as metrics'
    assert rule_rank("energy", s, (50, 70), 1.0, 17) == 17
    with pytest.raises(ValueError, match="unknown rank rule"):
        rule_rank("nuclear", s, (50, 70), 1.0, 1)


def test_break_even() -> None:
    assert max_lora_rank((384, 384)) == 191 and 191 * 768 < 384 * 384 <= 192 * 768
    assert max_lora_rank((1536, 384)) == 307 and baselines.break_even((1536, 384)) == pytest.approx(307.2)
    assert max_lora_rank((2, 2)) == 0 and max_lora_rank((1, 1000)) == 0  # no LoRA is cheaper than these


def test_compute_metrics_reports_the_rules() -> None:
    m, n, r = 200, 400, 5
    s = _planted(m, n, r, strength=2.0, seed=1)
    lm = layer_metrics("model.layers.0.mlp.up_proj.weight", (m, n), s)
    energy = float(np.sum(s**2))
    assert lm.mp_rank == r and lm.gd_rank == r
    assert lm.mp_edge == pytest.approx(mp_edge(s, (m, n)))
    assert lm.stable_rank_ceil == math.ceil(energy / s[0] ** 2)
    assert lm.mp_captured == pytest.approx(float(np.sum(s[:r] ** 2)) / energy)
    assert lm.gd_captured == lm.mp_captured and lm.rank_captured >= 0.9
    assert lm.rank > 10 * r  # the energy rank reconstructs the noise too


def test_recommend_rule_counts_signal_directions() -> None:
    layers = [
        layer_metrics(f"model.layers.{i}.mlp.up_proj.weight", (200, 400), _planted(200, 400, 3 + i, 2.0, seed=i))
        for i in range(3)
    ]
    energy = recommend(layers, max_rank=1000, rule="energy")
    mp = recommend(layers, rule="mp")
    assert energy is not None and mp is not None and mp.rule == "mp"
    assert [mp.allocation[lm.name] for lm in layers] == [3, 4, 5]  # per-module: the planted ranks
    assert mp.allocation_params == 12 * 600 and mp.not_low_rank == ()
    assert energy.uniform_rank > 100 and energy.allocation_params > 10 * mp.allocation_params  # it fits the noise
    assert "Marchenko–Pastur" in mp.reason and "keeps" in mp.reason
    assert mp.uniform_captured >= mp.allocation_captured - 1e-12  # the smallest uniform rank keeping as much
    stable = recommend(layers, RecommendSettings(rule="stable"))
    assert stable is not None and all(v >= 1 for v in stable.allocation.values())
    with pytest.raises(OptionsError, match="rule must be one of"):
        RecommendSettings(rule="nuclear")
