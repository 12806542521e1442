"""Spectrum -> LayerMetrics: energy ranks, baselines and LoRA coverage, in float64 numpy (no torch).

Definitions and reference values are in METHODS.md §1–§3.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from functools import lru_cache
from typing import Final

import numpy as np

from spectra.analysis import baselines
from spectra.names import RANK_RTOL as RANK_RTOL
from spectra.names import is_embedding
from spectra.names import module_kinds as module_kinds
from spectra.names import reading_order as reading_order
from spectra.records import GroupSummary, LayerMetrics, Options, Spectrum, Summary

log = logging.getLogger(__name__)

# ⟨ΔW, E⟩/‖E‖² of a ΔW that holds the base's quantisation error E whole is ≈ 1 (s·B@A is nearly orthogonal to E);
# an unrelated ΔW gives ≈ 0 ± ‖ΔW‖/(‖E‖·√sampled elements)
QUANT_COEFFICIENT: Final = (0.5, 1.5)
# ‖ΔW‖/‖W‖ that 4-bit blockwise quantisation alone leaves (nf4 ≈ 0.09–0.12, fp4 ≈ 0.11–0.19 at block size 64, for
# Gaussian to heavy-tailed weights): the band of the check that runs when bitsandbytes is not installed
FOUR_BIT_RELATIVE: Final = (0.06, 0.25)


def _cumulative_energy(s: np.ndarray) -> np.ndarray:
    """Σ_{i≤k} σᵢ² for k = 1..len(s), float64."""
    return np.cumsum(np.square(np.asarray(s, dtype=np.float64)))


def energy_rank(s: np.ndarray, threshold: float, energy: float | None = None) -> int:
    """Smallest k whose top-k singular values hold `threshold` of the energy; 0 only for a zero ΔW.

    Args:
        s: singular values, shape (r,), sorted descending; values beyond r (up to min(shape)) are zero.
        threshold: share of the energy to explain, in (0, 1].
        energy: ‖ΔW‖_F² computed directly from ΔW; None uses Σ σᵢ².
    """
    cum = _cumulative_energy(s)
    if not cum.size or cum[-1] <= 0.0:
        return 0
    total = float(cum[-1]) if energy is None else float(energy)
    if total <= 0.0:
        return 0
    k = int(np.searchsorted(cum, threshold * total * (1.0 - RANK_RTOL), side="left")) + 1
    return min(max(k, 1), cum.size)


def captured_energy(s: np.ndarray, ranks: Sequence[int], energy: float) -> dict[int, float]:
    """Share E(r) = Σ_{i≤r} σᵢ² / ‖ΔW‖_F² kept by the best rank-r approximation, per r (0.0 if ΔW = 0).

    Args:
        s: singular values, shape (k,), sorted descending; r may exceed k (the rest are zero).
        ranks: ranks r ≥ 1 to evaluate.
        energy: ‖ΔW‖_F², computed directly.
    """
    cum = _cumulative_energy(s)
    if energy <= 0.0 or not cum.size:
        return {int(r): 0.0 for r in ranks}
    return {int(r): min(float(cum[min(int(r), cum.size) - 1]) / energy, 1.0) for r in ranks}


def stable_rank(s: np.ndarray, energy: float) -> float:
    """‖ΔW‖_F² / σ₁²; 0.0 for a zero ΔW.

    Args:
        s: singular values, shape (k,), sorted descending.
        energy: ‖ΔW‖_F², computed directly.
    """
    top = float(s[0]) if len(s) else 0.0
    return float(energy) / top**2 if top > 0.0 else 0.0


def effective_rank(s: np.ndarray) -> float:
    """Roy–Vetterli effective rank exp(−Σ pᵢ log pᵢ), pᵢ = σᵢ / Σσ over the nonzero σ; 0.0 for a zero ΔW.

    Args:
        s: singular values, shape (k,), any order.
    """
    s = np.asarray(s, dtype=np.float64)
    s = s[s > 0.0]
    if not s.size:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def random_rank(shape: tuple[int, int], threshold: float) -> int:
    """Expected energy rank of an m×n Gaussian matrix (Marchenko–Pastur limit), in [1, min(m, n)].

    Args:
        shape: (m, n) in either order.
        threshold: share of the energy to explain, in (0, 1].
    """
    return _mp_rank(min(shape), max(shape), float(threshold))


@lru_cache(maxsize=1024)
def _mp_rank(m: int, n: int, threshold: float) -> int:
    """⌈m·F(θ)⌉ where E(θ) = threshold, with x = 1 + q − 2√q·cos θ (METHODS.md §3), both in closed form.

    In θ the Marchenko–Pastur energy density x·p(x)·dx is (2/π)·sin²θ·dθ, so E(θ), the energy share above x(θ),
    is (π − θ)/π + sin 2θ/(2π), decreasing in θ: θ is found by bisection to machine precision. The eigenvalue
    share above x(θ) is F(θ) = (2/π)∫_θ^π sin²t/(a − b·cos t) dt with a = 1 + q, b = 2√q; dividing
    1 − cos²t by a − b·cos t leaves cos t/b + a/b² + (1 − a²/b²)/(a − b·cos t), whose last term integrates to an
    arctangent (√(a² − b²) = 1 − q; the term vanishes at q = 1).
    """
    q, sq = m / n, math.sqrt(m / n)
    lo, hi = 0.0, math.pi
    if threshold < 1.0:
        while hi - lo > 1e-15:
            mid = 0.5 * (lo + hi)
            if (math.pi - mid) / math.pi + math.sin(2.0 * mid) / (2.0 * math.pi) >= threshold:
                lo = mid
            else:
                hi = mid
    theta = lo
    a, b = 1.0 + q, 2.0 * sq
    # π/2 − arctan(K·tan(θ/2)) with K = (1 + √q)/(1 − √q), written to stay finite at θ = 0, θ = π and q = 1
    angle = math.atan2((1.0 - sq) * math.cos(theta / 2), (1.0 + sq) * math.sin(theta / 2))
    share = 2.0 / math.pi * (-math.sin(theta) / b + a * (math.pi - theta) / b**2 - (1.0 - q) / (2.0 * q) * angle)
    return min(max(math.ceil(m * share), 1), m)


def gavish_donoho_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """Number of σ above the Gavish–Donoho hard threshold ω(β)·median(σ), noise level unknown.

    Args:
        s: singular values, shape (k,), k ≤ min(shape); the missing ones are zero and count in the median.
        shape: (m, n) of ΔW, either order.
    """
    beta = min(shape) / max(shape)
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    s = np.asarray(s, dtype=np.float64)
    padded = np.concatenate([s, np.zeros(max(min(shape) - s.size, 0))])
    return int(np.count_nonzero(s > omega * float(np.median(padded)))) if padded.size else 0


def compute_metrics(spectrum: Spectrum, options: Options, kind: str, layer: int | None) -> LayerMetrics:
    """Every per-matrix measure of one spectrum, as Python scalars (JSON round-trips exactly).

    Args:
        spectrum: singular values and directly computed ‖ΔW‖_F² of one ΔW.
        options: the analysis settings (threshold, lora_ranks).
        kind, layer: module kind and block index, from `module_kinds`.
    """
    s, energy, (m, n) = spectrum.s, float(spectrum.energy), spectrum.shape
    norm = math.sqrt(energy)
    base = spectrum.base_norm
    quant_fraction, quantized, quant_energy = quantization_error(spectrum, options.threshold)
    noise = float(spectrum.noise_energy) + quant_energy
    noise_fraction = 0.0 if noise == 0.0 else (noise / energy if energy > 0.0 else math.inf)
    rank = energy_rank(s, options.threshold, energy)
    ranks = {rule: baselines.rule_rank(rule, s, (m, n), energy, rank) for rule in baselines.RULES}
    return LayerMetrics(
        name=spectrum.name,
        shape=(m, n),
        kind=kind,
        layer=layer,
        rank=rank,
        stable_rank=stable_rank(s, energy),
        effective_rank=effective_rank(s),
        spectral_norm=float(s[0]) if len(s) else 0.0,
        frobenius_norm=norm,
        relative_change=norm / float(base) if base else None,
        captured=captured_energy(s, options.lora_ranks, energy),
        lora_params={r: r * (m + n) for r in options.lora_ranks},
        random_rank=random_rank((m, n), options.threshold),
        noise_fraction=noise_fraction,
        noisy=noise_fraction >= max(1.0 - options.threshold, 0.01),
        gd_rank=gavish_donoho_rank(s, (m, n)),
        dtype=spectrum.dtype,
        method=spectrum.method,
        s=s,
        quant_error_fraction=quant_fraction,
        quantized_base=quantized,
        mp_rank=ranks["mp"],
        mp_edge=baselines.mp_edge(s, (m, n)),
        stable_rank_ceil=ranks["stable"],
        rank_captured=baselines.kept(s, rank, energy),
        gd_captured=baselines.kept(s, ranks["gd"], energy),
        mp_captured=baselines.kept(s, ranks["mp"], energy),
        stable_captured=baselines.kept(s, ranks["stable"], energy),
    )


def quantization_error(spectrum: Spectrum, threshold: float) -> tuple[float | None, str | None, float]:
    """(share of ‖ΔW‖_F² that is the base's quantisation error, the quantisation when ΔW carries it, its energy).

    From the probe of a linear weight (spectra.plan.quant.probe): the error E of the best-matching type is in ΔW
    when ⟨ΔW, E⟩/‖E‖² is within QUANT_COEFFICIENT of 1, and it matters when it alone could move the rank (the
    `noisy` criterion: share ≥ 1 − threshold, at least 1%). Such a matrix is flagged with the type, and E's
    energy joins its noise floor: it is 4-bit (or 8-bit) storage noise of the base the adapter was trained on.
    (None, None, 0.0) without a probe.
    """
    probe, energy = spectrum.quant, float(spectrum.energy)
    if probe is None or energy <= 0.0:
        return None, None, 0.0
    carried = probe.coefficient**2 * probe.energy
    share = min(carried / energy, 1.0)
    low, high = QUANT_COEFFICIENT
    if low <= probe.coefficient <= high and share >= max(1.0 - threshold, 0.01):
        return share, probe.kind, min(carried, energy)
    return share, None, 0.0


def quantization_notes(layers: Sequence[LayerMetrics], options: Options) -> tuple[str, ...]:
    """The Analysis note (at most one) when ΔW looks like a merged QLoRA model's: matrices flagged by the probe,
    or, when no probe ran (bitsandbytes not installed), linear matrices whose ΔW is as large as 4-bit quantisation
    error (FOUR_BIT_RELATIVE of ‖W_base‖) and as spread as noise (rank ≥ 0.7 × a random matrix's)."""
    flagged = [lm for lm in layers if lm.quantized_base is not None]
    if flagged:
        probed = sum(lm.quant_error_fraction is not None for lm in layers)
        kind = Counter(lm.quantized_base for lm in flagged).most_common(1)[0][0]
        share = float(np.median([lm.quant_error_fraction or 0.0 for lm in flagged]))
        given = options.base_quantization
        if given is not None:
            return (
                f"{len(flagged)} of {probed} linear matrices still carry a {kind} quantisation error of their "
                f"base weights (median {share:.0%} of ‖ΔW‖²) after diffing against {given}: was the base "
                f"quantised with {kind}? Try --base-quantization {kind} (and --quant-block-size, --double-quant)",
            )
        return (
            f"{len(flagged)} of {probed} linear matrices carry their base weights' {kind} quantisation error "
            f"(median {share:.0%} of ‖ΔW‖²), as a model merged from a QLoRA adapter does: their ranks measure "
            f"the quantisation, not the fine-tune; rerun with --base-quantization {kind} "
            "(Options.base_quantization) to diff against the quantised base",
        )
    if options.base_quantization is not None or any(lm.quant_error_fraction is not None for lm in layers):
        return ()
    low, high = FOUR_BIT_RELATIVE
    linear = [lm for lm in layers if not is_embedding(lm.kind) and lm.relative_change is not None]
    alike = [lm for lm in linear if low <= (lm.relative_change or 0.0) <= high and lm.rank >= 0.7 * lm.random_rank]
    if not alike or 2 * len(alike) < len(linear):
        return ()
    return (
        f"ΔW of {len(alike)} of {len(linear)} linear matrices is {low:.0%}–{high:.0%} of ‖W_base‖ and as spread "
        "as noise, as the 4-bit quantisation error of a model merged from a QLoRA adapter would be; install "
        "bitsandbytes (pip install 'spectra-lm[quant]') so spectra can check, and try --base-quantization nf4",
    )


def _summarize_group(key: str, layers: Sequence[LayerMetrics], lora_ranks: Sequence[int]) -> GroupSummary:
    """Medians of rank and rank / random rank, and energy-weighted captured energy, over `layers`."""
    energies = [lm.frobenius_norm**2 for lm in layers]
    total = float(sum(energies))
    kept = {r: 0.0 for r in lora_ranks}
    for lm, e in zip(layers, energies, strict=True):
        for r, share in captured_energy(lm.s, lora_ranks, e).items():
            kept[r] += share * e
    ranks = [lm.rank for lm in layers]
    return GroupSummary(
        key=key,
        n=len(layers),
        median_rank=float(np.median(ranks)) if ranks else 0.0,
        max_rank=max(ranks, default=0),
        median_rank_ratio=float(np.median([lm.rank / lm.random_rank for lm in layers])) if layers else 0.0,
        captured={r: kept[r] / total if total > 0.0 else 0.0 for r in kept},
        energy=total,
        n_noisy=sum(lm.noisy for lm in layers),
    )


def summarize(layers: Sequence[LayerMetrics], lora_ranks: Sequence[int]) -> Summary:
    """Model-level summaries: all matrices, one group per module kind (first-appearance order), one per block.

    Matrices outside any block (layer None, e.g. lm_head) count in the overall and per-kind groups only.

    Args:
        layers: per-matrix metrics.
        lora_ranks: LoRA ranks r at which the energy-weighted captured share is reported.
    """
    ranks = sorted({int(r) for r in lora_ranks})
    kinds: dict[str, list[LayerMetrics]] = {}
    blocks: dict[int, list[LayerMetrics]] = {}
    for lm in layers:
        kinds.setdefault(lm.kind, []).append(lm)
        if lm.layer is not None:
            blocks.setdefault(lm.layer, []).append(lm)
    return Summary(
        overall=_summarize_group("all", layers, ranks),
        kinds=tuple(_summarize_group(k, group, ranks) for k, group in kinds.items()),
        layers=tuple(_summarize_group(str(i), blocks[i], ranks) for i in sorted(blocks)),
    )
