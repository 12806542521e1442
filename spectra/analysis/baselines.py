"""Rank rules that separate signal from the noise bulk of a singular spectrum (METHODS.md §3–§4), numpy only.

The energy rank r_τ sizes a LoRA to *reconstruct* ΔW, noise bulk included; a full fine-tune's bulk is optimizer
noise, so r_τ grows with it. These rules count only the directions that stand out of the bulk:

- "gd": Gavish–Donoho hard threshold ω(β)·median(σ), noise level unknown (`gavish_donoho_rank`).
- "mp": the count of σ above the Marchenko–Pastur bulk edge, with the bulk's scale fitted to the median σ²
  (`mp_edge`): an m×n (m ≤ n, β = m/n) matrix of i.i.d. noise of variance v has σ²/(n·v) distributed as
  Marchenko–Pastur with ratio β, whose median is μ_β (`mp_median`); so v̂ = median(σ²)/(n·μ_β) and the edge is
  σ_edge = √(n·v̂)·(1 + √β). The median is set by the bulk (a few signal directions move it by at most their
  count's share of the quantiles), never by σ₁.
- "stable": ⌈‖ΔW‖_F²/σ₁²⌉, the stable rank rounded up.
"""

from __future__ import annotations

import math

import numpy as np

RULES = ("energy", "gd", "mp", "stable")  # rank rules by name: energy@τ is the reconstruction rank


def _padded(s: np.ndarray, side: int) -> np.ndarray:
    """σ as float64 with the missing ones (a short spectrum: adapters) filled in as zeros, up to `side`."""
    s = np.abs(np.asarray(s, dtype=np.float64))
    return np.concatenate([s, np.zeros(max(side - s.size, 0))])


def mp_share_above(x: float, beta: float) -> float:
    """Share of Marchenko–Pastur eigenvalues (ratio β ∈ (0, 1], unit variance) above x, in closed form.

    With x = 1 + β − 2√β·cos θ the share is (2/π)·(−sin θ/b + a(π − θ)/b² − (1 − β)/(2β)·φ), a = 1 + β,
    b = 2√β, φ = π/2 − arctan(K·tan(θ/2)), K = (1 + √β)/(1 − √β) (the derivation is in metrics._mp_rank).
    """
    sq = math.sqrt(beta)
    lo, hi = (1.0 - sq) ** 2, (1.0 + sq) ** 2
    if x <= lo:
        return 1.0
    if x >= hi:
        return 0.0
    theta = math.acos(min(max((1.0 + beta - x) / (2.0 * sq), -1.0), 1.0))
    a, b = 1.0 + beta, 2.0 * sq
    angle = math.atan2((1.0 - sq) * math.cos(theta / 2), (1.0 + sq) * math.sin(theta / 2))
    share = 2.0 / math.pi * (-math.sin(theta) / b + a * (math.pi - theta) / b**2 - (1.0 - beta) / (2.0 * beta) * angle)
    return min(max(share, 0.0), 1.0)


def mp_median(beta: float) -> float:
    """Median μ_β of the Marchenko–Pastur law with ratio β ∈ (0, 1] and unit variance (bisection, to 1e-13)."""
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"beta must be in (0, 1], got {beta}")
    if beta < 1e-9:  # the law collapses onto 1
        return 1.0
    sq = math.sqrt(beta)
    lo, hi = (1.0 - sq) ** 2, (1.0 + sq) ** 2
    while hi - lo > 1e-13:
        mid = 0.5 * (lo + hi)
        if mp_share_above(mid, beta) > 0.5:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def mp_edge(s: np.ndarray, shape: tuple[int, int]) -> float:
    """The σ at the upper edge of the Marchenko–Pastur bulk fitted to the median of σ²: √(n·v̂)·(1 + √β) with
    v̂ = median(σ²)/(n·μ_β), m ≤ n, β = m/n (module docstring). 0.0 when the median σ is 0 (a low-rank ΔW: then
    every nonzero σ is above the edge).

    Args:
        s: singular values (any order); fewer than min(shape) means the rest are zero.
        shape: (m, n) of ΔW, either order.
    """
    m, n = min(shape), max(shape)
    if m == 0:
        return 0.0
    beta = m / n
    med = float(np.median(np.square(_padded(s, m))))
    return math.sqrt(med / mp_median(beta)) * (1.0 + math.sqrt(beta))


def mp_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """Number of σ strictly above `mp_edge` (the signal directions that stand out of the fitted noise bulk).

    Args:
        s: singular values (any order); fewer than min(shape) means the rest are zero.
        shape: (m, n) of ΔW, either order.
    """
    s = np.abs(np.asarray(s, dtype=np.float64))
    return int(np.count_nonzero(s > mp_edge(s, shape))) if s.size else 0


def gavish_donoho_rank(s: np.ndarray, shape: tuple[int, int]) -> int:
    """Number of σ above the Gavish–Donoho hard threshold ω(β)·median(σ), noise level unknown,
    ω(β) ≈ 0.56β³ − 0.95β² + 1.82β + 1.43, β = m/n ≤ 1.

    Args:
        s: singular values, k ≤ min(shape); the missing ones are zero and count in the median.
        shape: (m, n) of ΔW, either order.
    """
    beta = min(shape) / max(shape) if max(shape) else 1.0
    omega = 0.56 * beta**3 - 0.95 * beta**2 + 1.82 * beta + 1.43
    s = np.abs(np.asarray(s, dtype=np.float64))
    padded = _padded(s, min(shape))
    return int(np.count_nonzero(s > omega * float(np.median(padded)))) if padded.size else 0


def stable_rank_ceil(s: np.ndarray, energy: float) -> int:
    """⌈‖ΔW‖_F²/σ₁²⌉ (relative tolerance 1e-9, so a planted rank-k flat spectrum gives k); 0 for a zero ΔW."""
    top = float(np.max(np.abs(np.asarray(s, dtype=np.float64)))) if len(s) else 0.0
    if top <= 0.0 or energy <= 0.0:
        return 0
    return max(math.ceil(energy / top**2 * (1.0 - 1e-9)), 1)


def rule_rank(rule: str, s: np.ndarray, shape: tuple[int, int], energy: float, energy_rank: int) -> int:
    """The rank `rule` (one of RULES) gives this spectrum; `energy_rank` is passed through for "energy"."""
    if rule == "energy":
        return energy_rank
    if rule == "gd":
        return gavish_donoho_rank(s, shape)
    if rule == "mp":
        return mp_rank(s, shape)
    if rule == "stable":
        return stable_rank_ceil(s, energy)
    raise ValueError(f"unknown rank rule {rule!r}; one of {', '.join(RULES)}")


def kept(s: np.ndarray, rank: int, energy: float) -> float:
    """Energy share Σ_{i≤rank} σᵢ²/‖ΔW‖_F² of the best rank-`rank` approximation (0.0 for a zero ΔW)."""
    if energy <= 0.0 or rank <= 0:
        return 0.0
    top = np.sort(np.abs(np.asarray(s, dtype=np.float64)))[::-1][:rank]
    return min(float(np.sum(np.square(top))) / energy, 1.0)


def break_even(shape: tuple[int, int]) -> float:
    """m·n/(m+n): a LoRA of rank r ≥ this has at least as many parameters as the dense matrix."""
    m, n = shape
    return m * n / (m + n) if m + n else 0.0


def max_lora_rank(shape: tuple[int, int]) -> int:
    """The largest r whose LoRA is cheaper than the dense matrix: r·(m+n) < m·n (0 when none is)."""
    m, n = shape
    return max((m * n - 1) // (m + n), 0) if m + n else 0
