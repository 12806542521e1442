"""list[LayerMetrics] -> Recommendation: the uniform-rank trade-off, per-module ranks under a parameter budget,
and the targets, reason and advice around them (METHODS.md §4).

numpy only. The adapter_config itself (and `write_adapter_config`, re-exported here) lives in `spectra.peft.config`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from spectra.errors import OptionsError
from spectra.names import CAVEAT as CAVEAT
from spectra.names import RANK_RTOL, is_embedding
from spectra.peft.config import build_adapter_config
from spectra.peft.config import write_adapter_config as write_adapter_config  # re-exported: the CLI imports it here
from spectra.records import LayerMetrics, RankOption, Recommendation

log = logging.getLogger(__name__)

MIN_KIND_SHARE = 0.01  # "meaningful energy": a module kind holding < 1% of the candidates' Σ‖ΔW‖_F² is not targeted

ADVICE = (
    "Practice, not derived from this spectrum (Biderman et al. 2024): target all linear modules "
    "(q, k, v, o, gate, up, down) with α = 2r; LoRA suits instruction tuning better than continued pretraining.",
    "Practice, not derived from this spectrum (Hayou et al. 2024, LoRA+): learning rate of B = 16 × that of A.",
    "Practice, not derived from this spectrum (Biderman et al. 2024): LoRA is more sensitive to the learning rate "
    "than full fine-tuning and usually wants a higher one (often about 10×); sweep it and use the highest that "
    "trains stably.",
)
RSLORA_ADVICE = (
    "Practice, not derived from this spectrum (Kalajdzievski 2023, rsLoRA): the scale is α/√r; α = 2√r gives "
    "every module the scale 2 that α = 2r gives plain LoRA."
)


@dataclass(frozen=True, slots=True)
class _Spectra:
    """Per-matrix arrays the routines share: cumulative energies (cum[k] = Σ_{i≤k} σᵢ², cum[0] = 0) and shapes."""

    cum: tuple[np.ndarray, ...]
    s2: tuple[np.ndarray, ...]  # σᵢ² of the numerically nonzero σ (above σ₁·max(m, n)·ε), descending
    energy: np.ndarray  # ‖ΔW‖_F² per matrix (frobenius_norm², computed directly, not from σ)
    cost: np.ndarray  # m + n: LoRA parameters per unit of rank
    size: np.ndarray  # m · n
    side: np.ndarray  # min(m, n)

    @classmethod
    def of(cls, layers: Sequence[LayerMetrics]) -> _Spectra:
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
        )

    def captured(self, ranks: np.ndarray) -> float:
        """Σ_m Σ_{i≤r_m} σ² for per-matrix ranks r_m (unnormalised)."""
        return float(sum(c[min(int(r), c.size - 1)] for c, r in zip(self.cum, ranks, strict=True)))

    def option(self, r: int) -> RankOption:
        total, full = float(self.energy.sum()), int(self.size.sum())
        kept = self.captured(np.full(len(self.cum), r)) / total if total > 0 else 0.0
        params = r * int(self.cost.sum())
        return RankOption(r=r, captured=min(kept, 1.0), params=params, params_fraction=params / full if full else 0.0)


def _candidates(limit: int) -> list[int]:
    """1, 2, 4, ... below `limit`, then `limit` itself."""
    if limit < 1:
        return []
    return [2**k for k in range(limit.bit_length()) if 2**k < limit] + [limit]


def uniform_tradeoff(layers: Sequence[LayerMetrics], max_side: int | None = None) -> tuple[RankOption, ...]:
    """The uniform-rank trade-off table: for r = 1, 2, 4, ..., the energy-weighted share of Σ_m ‖ΔW_m‖_F² that a
    rank-r LoRA on every matrix can capture, its parameter count Σ_m r·(m+n), and that count over Σ_m m·n.

    Args:
        layers: the matrices LoRA would target.
        max_side: last candidate rank; None uses the smallest matrix side min(m, n) over `layers`. Candidates are
            the powers of two below it, then it.
    """
    if not layers:
        return ()
    spectra = _Spectra.of(layers)
    limit = int(spectra.side.min()) if max_side is None else max_side
    return tuple(spectra.option(r) for r in _candidates(limit))


def _directions(spectra: _Spectra) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, position, cost) of every nonzero singular direction, in decreasing σ²/(m+n) order.

    Ties break by matrix then position, so each matrix's directions come in its own order (σ sorted).
    """
    owner = np.concatenate([np.full(x.size, i, np.int64) for i, x in enumerate(spectra.s2)] + [np.zeros(0, np.int64)])
    position = np.concatenate([np.arange(x.size) for x in spectra.s2] + [np.zeros(0, np.int64)])
    merit = np.concatenate([*spectra.s2, np.zeros(0)]) / spectra.cost[owner]
    order = np.lexsort((position, owner, -merit))
    return owner[order], position[order], spectra.cost[owner[order]]


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


def _allocate(spectra: _Spectra, budget: int) -> np.ndarray:
    """Greedy in σ²/(m+n) order, or the best uniform rank within budget topped up greedily, whichever captures more.

    The greedy prefix (up to the first direction that does not fit) is optimal among allocations costing no more
    than it (Lagrangian argument: it maximises Σσ² − λ·cost at λ = its last merit), so the result is within one
    direction's σ² of the optimum; the leftover (< one matrix's m+n) is spent on cheaper matrices. That leftover can
    let a uniform rank beat pure greedy on tiny matrices (costs 30 and 40, budget 70), hence the second start,
    which makes the result never worse than any uniform rank of equal or lower cost."""
    directions = _directions(spectra)
    n_nonzero = np.array([x.size for x in spectra.s2], dtype=np.int64)
    best = _fill(directions, np.zeros_like(n_nonzero), budget)
    uniform_r = budget // int(spectra.cost.sum()) if spectra.cost.sum() else 0
    if uniform_r > 0:
        start = np.minimum(uniform_r, n_nonzero)
        other = _fill(directions, start, budget - int(start @ spectra.cost))
        if spectra.captured(other) > spectra.captured(best):
            best = other
    return best


def allocate_ranks(layers: Sequence[LayerMetrics], budget: int) -> dict[str, int]:
    """Matrix name -> LoRA rank (0 = not worth a direction) maximising the captured energy Σ_m Σ_{i≤r_m} σ_{m,i}²
    at a cost Σ_m r_m·(m+n) ≤ `budget`: singular directions are taken globally in decreasing σ²/(m+n) order.

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
    ranks = _allocate(_Spectra.of(layers), int(budget))
    return {layer.name: int(r) for layer, r in zip(layers, ranks, strict=True)}


def _select_targets(layers: Sequence[LayerMetrics], include_embeddings: bool) -> tuple[list[LayerMetrics], list[str]]:
    """The matrices of the module kinds LoRA should target, and "kind (why not)" for the others.

    A kind is targeted when it is not an embedding/output head (unless asked), not every matrix of it is at the
    rounding-noise floor (`noisy`), and it holds at least MIN_KIND_SHARE of the remaining kinds' energy."""
    kinds: dict[str, list[LayerMetrics]] = {}
    for layer in layers:
        kinds.setdefault(layer.kind, []).append(layer)
    dropped, candidates = [], {}
    for kind, group in kinds.items():
        if is_embedding(kind) and not include_embeddings:
            dropped.append(f"{kind} (embedding or output head)")
        elif all(lm.noisy for lm in group):
            dropped.append(f"{kind} (at the rounding-noise floor)")
        else:
            candidates[kind] = group
    energy = {kind: sum(lm.frobenius_norm**2 for lm in group) for kind, group in candidates.items()}
    total = sum(energy.values())
    targets = []
    for kind, group in candidates.items():
        if total > 0 and energy[kind] >= MIN_KIND_SHARE * total:
            targets.extend(group)
        else:
            dropped.append(f"{kind} ({energy[kind] / total if total else 0:.1%} of the energy)")
    return targets, dropped


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _uniform_rank(spectra: _Spectra, target: float, max_rank: int) -> tuple[int, int | None]:
    """(recommended uniform rank, smallest power of two reaching `target` or None if none does)."""
    top = int(spectra.side.max())
    needed = next((r for r in _candidates(top) if spectra.option(r).captured >= target * (1 - RANK_RTOL)), None)
    if needed is not None and needed <= max_rank:
        return needed, needed
    return min(max_rank, top), needed


def recommend(
    layers: Sequence[LayerMetrics],
    *,
    target: float = 0.9,
    max_rank: int = 256,
    budget: int | None = None,
    rslora: bool = False,
    include_embeddings: bool = False,
    base_model: str | None = None,
    task_type: str | None = "CAUSAL_LM",
) -> Recommendation | None:
    """The LoRA to use for this fine-tune: a uniform rank, per-module ranks under a budget, and a PEFT config.

    Returns None when there are no layers or no module kind qualifies as a target (see `_select_targets`).

    Args:
        layers: per-matrix metrics of the analysis (s, frobenius_norm, shape, kind, noisy are read).
        target: energy share in (0, 1] the uniform rank must capture over the targeted matrices.
        max_rank: cap on the uniform rank, ≥ 1; when it binds, `cap_binds` is set and `reason` says so.
        budget: LoRA parameters for the per-module allocation; None spends what the uniform rank costs.
        rslora: use rsLoRA scaling (α/√r) with α = 2√r, the same scale as α = 2r in plain LoRA.
        include_embeddings: also target embeddings and the output head.
        base_model: written as base_model_name_or_path.
        task_type: PEFT task type ("CAUSAL_LM", or None for a bare model).

    Raises:
        OptionsError: target, max_rank or budget out of range, or a budget that buys no direction.
    """
    if not 0.0 < target <= 1.0:
        raise OptionsError(f"target must be in (0, 1], got {target} (0.9 means 90% of the energy)")
    if max_rank < 1 or (budget is not None and budget < 1):
        raise OptionsError(f"max_rank and budget must be positive, got max_rank={max_rank}, budget={budget}")
    targets, dropped = _select_targets(layers, include_embeddings)
    if not targets:
        log.info("no recommendation: %s", "no layers" if not layers else "no kind to target: " + ", ".join(dropped))
        return None
    spectra = _Spectra.of(targets)
    uniform_rank, needed = _uniform_rank(spectra, target, max_rank)
    uniform = spectra.option(uniform_rank)
    tradeoff = uniform_tradeoff(targets)
    if uniform_rank not in {o.r for o in tradeoff}:
        tradeoff = tuple(sorted((*tradeoff, uniform), key=lambda o: o.r))
    spend = uniform.params if budget is None else budget
    allocation = allocate_ranks(targets, spend)
    if not any(allocation.values()):
        raise OptionsError(f"budget {spend} buys no rank: the cheapest matrix costs {spectra.cost.min()} per rank")
    ranks = np.array(list(allocation.values()))
    total = float(spectra.energy.sum())
    kinds = {lm.name: lm.kind for lm in layers}
    config, notes = build_adapter_config(kinds, allocation, rslora=rslora, task_type=task_type, base_model=base_model)
    cap_binds = uniform.captured < target * (1 - RANK_RTOL)
    allocation_captured = min(spectra.captured(ranks) / total, 1.0)
    if cap_binds:
        first = (
            f"LoRA at the rank cap {uniform_rank} captures only {uniform.captured:.1%} of the update's energy "
            f"(target {target:.0%})"
            + (f"; reaching it needs uniform rank {needed}" if needed else "")
            + ": this update has higher rank than LoRA represents at this cap (LoRA learns less)."
        )
    else:
        first = (
            f"Uniform rank {uniform_rank} captures {uniform.captured:.1%} of the update's energy in the "
            f"targeted matrices (target {target:.0%})."
        )
    same_r = spend // int(spectra.cost.sum())
    versus = spectra.option(int(same_r)).captured if same_r else 0.0
    second = (
        f"Per-module ranks at the same cost ({_count(spend)} parameters) capture {allocation_captured:.1%}"
        if budget is None
        else f"Per-module ranks within {_count(spend)} parameters capture {allocation_captured:.1%}, against "
        f"{versus:.1%} for uniform rank {same_r}, the largest that fits"
    )
    n_zero = sum(1 for r in ranks if r == 0)
    second += f"; {n_zero} matrices get rank 0." if n_zero else "."
    reason = " ".join([first, second] + ([f"Not targeted: {', '.join(dropped)}."] if dropped else []))
    advice = (
        *ADVICE,
        *([RSLORA_ADVICE] if rslora else []),
        *notes,
    )
    return Recommendation(
        target=target,
        max_rank=max_rank,
        uniform_rank=uniform_rank,
        uniform_captured=uniform.captured,
        cap_binds=cap_binds,
        tradeoff=tradeoff,
        budget=spend,
        allocation=allocation,
        allocation_captured=allocation_captured,
        allocation_params=int(ranks @ spectra.cost),
        target_modules=tuple(config["target_modules"]),
        config=config,
        reason=reason,
        advice=advice,
        caveat=CAVEAT,
    )
