"""Per-module LoRA ranks from singular spectra: the uniform-rank trade-off and the budgeted allocation that takes
singular directions globally in decreasing σ²/(m+n) order (README, The recommendation).

numpy only; reads σ, ‖ΔW‖_F and the shape of each LayerMetrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spectra.analysis.baselines import max_lora_rank
from spectra.errors import OptionsError
from spectra.records import LayerMetrics, RankOption


@dataclass(frozen=True, slots=True)
class SpectraTable:
    """Per-matrix arrays the routines share: cumulative energies (cum[k] = Σ_{i≤k} σᵢ², cum[0] = 0) and shapes."""

    cum: tuple[np.ndarray, ...]
    s2: tuple[np.ndarray, ...]  # σᵢ² of the numerically nonzero σ (above σ₁·max(m, n)·ε), descending
    energy: np.ndarray  # ‖ΔW‖_F² per matrix (frobenius_norm², computed directly, not from σ)
    cost: np.ndarray  # m + n: LoRA parameters per unit of rank
    size: np.ndarray  # m · n
    side: np.ndarray  # min(m, n)
    limit: np.ndarray  # the largest rank still cheaper than the dense matrix: r·(m+n) < m·n (break-even)

    @classmethod
    def of(cls, layers: Sequence[LayerMetrics]) -> SpectraTable:
        """The table of `layers` (s, frobenius_norm and shape are read)."""
        s2 = []
        for layer in layers:  # sorted defensively; short s (adapters) means the rest are zero
            s = np.sort(np.abs(np.asarray(layer.s, dtype=np.float64)))[::-1]
            tol = s[0] * max(layer.shape) * np.finfo(np.float64).eps if s.size else 0.0  # as numpy.matrix_rank
            s2.append(np.square(s[s > tol]))
        shapes = np.array([lm.shape for lm in layers], dtype=np.int64).reshape(-1, 2)
        return cls(
            cum=tuple(np.concatenate(([0.0], np.cumsum(x))) for x in s2),
            s2=tuple(s2),
            energy=np.array([lm.frobenius_norm**2 for lm in layers], dtype=np.float64),
            cost=shapes.sum(axis=1),
            size=shapes.prod(axis=1),
            side=shapes.min(axis=1),
            limit=np.array([max_lora_rank((int(m), int(n))) for m, n in shapes], dtype=np.int64),
        )

    def captured(self, ranks: np.ndarray) -> float:
        """Σ_m Σ_{i≤r_m} σ² for per-matrix ranks r_m (unnormalised)."""
        return float(sum(c[min(int(r), c.size - 1)] for c, r in zip(self.cum, ranks, strict=True)))

    def option(self, r: int) -> RankOption:
        """The trade-off row of a uniform rank `r` on every matrix of the table."""
        total, full = float(self.energy.sum()), int(self.size.sum())
        kept = self.captured(np.full(len(self.cum), r)) / total if total > 0 else 0.0
        params = r * int(self.cost.sum())
        return RankOption(r=r, captured=min(kept, 1.0), params=params, params_fraction=params / full if full else 0.0)


def candidate_ranks(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    if limit < 1:
        return []
    return [2**k for k in range(limit.bit_length()) if 2**k < limit] + [limit]


def uniform_tradeoff(layers: Sequence[LayerMetrics], max_side: int | None = None) -> tuple[RankOption, ...]:
    """The uniform-rank trade-off table: for r = 1, 2, 4, ..., the energy-weighted share of Σ_m ‖ΔW_m‖_F² that a
    rank-r LoRA on every matrix can capture, its parameter count Σ_m r·(m+n), and that count over Σ_m m·n.

    The table stops at break-even: beyond the largest rank r with r·(m+n) < m·n on every matrix, a uniform LoRA
    costs at least a dense fine-tune of some matrix, and is not a LoRA there.

    Args:
        layers: the matrices LoRA would target.
        max_side: last candidate rank; None (and any larger value) uses the break-even limit above. Candidates are
            the powers of two below it, then it.
    """
    if not layers:
        return ()
    table = SpectraTable.of(layers)
    even = int(table.limit.min())
    limit = even if max_side is None else min(max_side, even)
    return tuple(table.option(r) for r in candidate_ranks(limit))


def smallest_uniform_rank(table: SpectraTable, goal: float, limit: int) -> int | None:
    """The smallest integer r in [1, limit] whose uniform option captures ≥ `goal` (a share), or None.

    Any integer, not a power of two: captured energy is nondecreasing in r, so bisection finds it exactly."""
    if limit < 1 or table.option(limit).captured < goal:
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        if table.option(mid).captured >= goal:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _directions(table: SpectraTable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, position, cost) of every nonzero singular direction below its matrix's break-even limit, in
    decreasing σ²/(m+n) order.

    Ties break by matrix then position, so each matrix's directions come in its own order (σ sorted).
    """
    s2 = [x[: int(c)] for x, c in zip(table.s2, table.limit, strict=True)]
    owner = np.concatenate([np.full(x.size, i, np.int64) for i, x in enumerate(s2)] + [np.zeros(0, np.int64)])
    position = np.concatenate([np.arange(x.size) for x in s2] + [np.zeros(0, np.int64)])
    merit = np.concatenate([*s2, np.zeros(0)]) / table.cost[owner]
    order = np.lexsort((position, owner, -merit))
    return owner[order], position[order], table.cost[owner[order]]


def _fill(directions: tuple[np.ndarray, np.ndarray, np.ndarray], start: np.ndarray, budget: int) -> np.ndarray:
    """Ranks after taking, beyond `start`, directions in merit order while they fit in `budget` (skipping those
    that no longer fit, so the leftover is spent on cheaper matrices). Each matrix's taken directions stay a prefix:
    once one of its directions does not fit, none of its later ones (same cost) can."""
    owner, position, cost = directions
    ranks = start.copy()
    todo = np.flatnonzero(position >= start[owner])
    left = budget
    while todo.size:
        spent = np.cumsum(cost[todo])
        n = int(np.searchsorted(spent, left, side="right"))
        ranks += np.bincount(owner[todo[:n]], minlength=ranks.size)
        left -= int(spent[n - 1]) if n else 0
        rest = todo[n:]
        todo = rest[cost[rest] <= left]
    return ranks


def _allocate(table: SpectraTable, budget: int) -> np.ndarray:
    """Greedy in σ²/(m+n) order, or the best uniform rank within budget topped up greedily, whichever captures more.

    The greedy prefix (up to the first direction that does not fit) is optimal among allocations costing no more
    than it (Lagrangian argument: it maximises Σσ² − λ·cost at λ = its last merit), so the result is within one
    direction's σ² of the optimum; the leftover (< one matrix's m+n) is spent on cheaper matrices. That leftover can
    let a uniform rank beat pure greedy on tiny matrices (costs 30 and 40, budget 70), hence the second start,
    which makes the result never worse than any uniform rank of equal or lower cost."""
    directions = _directions(table)
    n_nonzero = np.minimum(np.array([x.size for x in table.s2], dtype=np.int64), table.limit)
    best = _fill(directions, np.zeros_like(n_nonzero), budget)
    uniform_r = budget // int(table.cost.sum()) if table.cost.sum() else 0
    if uniform_r > 0:
        start = np.minimum(uniform_r, n_nonzero)
        other = _fill(directions, start, budget - int(start @ table.cost))
        if table.captured(other) > table.captured(best):
            best = other
    return best


def allocate_ranks(layers: Sequence[LayerMetrics], budget: int) -> dict[str, int]:
    """Matrix name -> LoRA rank (0 = not worth a direction) maximising the captured energy Σ_m Σ_{i≤r_m} σ_{m,i}²
    at a cost Σ_m r_m·(m+n) ≤ `budget`: singular directions are taken globally in decreasing σ²/(m+n) order.
    No matrix gets a rank at or above its break-even m·n/(m+n) (a LoRA that costs the dense matrix).

    Args:
        layers: the matrices LoRA may target; values beyond len(s) are zero and never bought.
        budget: LoRA parameters to spend, ≥ 0.

    Raises:
        OptionsError: a negative budget.
    """
    if budget < 0:
        raise OptionsError(f"budget must be a non-negative parameter count, got {budget}")
    if not layers:
        return {}
    ranks = _allocate(SpectraTable.of(layers), int(budget))
    return {layer.name: int(r) for layer, r in zip(layers, ranks, strict=True)}
