"""How much of its rank a LoRA adapter uses: per module, the configured r next to rank@τ of its ΔW = scale·B@A.

numpy-free records arithmetic. An adapter's factored spectrum has exactly r values (σ beyond r are zero), so the
rank each module was given is len(s) of its LayerMetrics; nothing is read from adapter_config.json again.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from spectra.records import Analysis, LayerMetrics

SATURATED = 0.8  # rank@τ ≥ 80% of r: the spectrum is flat up to r, a higher r could help
FRACTION = 0.5  # rank@τ ≤ 50% of r: most of r is unused, the adapter could be resized
RESIZE_HINT = "spectra resize ADAPTER -o OUT --energy {tau:g}"


@dataclass(frozen=True, slots=True)
class RankUse:
    """One adapter module: its rank r and the rank@τ its update actually needs."""

    name: str  # checkpoint key of the adapted weight, verbatim
    kind: str
    layer: int | None
    r: int  # the adapter's rank for this module (r, or its rank_pattern entry)
    rank: int  # rank@τ of ΔW = scale·B@A
    share: float  # rank / r
    verdict: str  # "saturated" (share ≥ SATURATED), "fraction" (share ≤ FRACTION) or "partial"


@dataclass(frozen=True, slots=True)
class KindUse:
    """The modules of one kind: their ranks r, median rank@τ, and how many saturate or use a fraction of r."""

    kind: str
    n: int
    ranks: tuple[int, ...]  # distinct configured r, ascending
    median_rank: float
    max_rank: int
    n_saturated: int
    n_fraction: int


def is_adapter(analysis: Analysis) -> bool:
    """True when the tuned input is a PEFT adapter (its ΔW were computed from the factors)."""
    return analysis.tuned_info.format in ("peft-adapter", "peft-model")


def _verdict(share: float) -> str:
    return "saturated" if share >= SATURATED else "fraction" if share <= FRACTION else "partial"


def module_use(layer: LayerMetrics) -> RankUse:
    r = max(len(layer.s), 1)
    share = layer.rank / r
    return RankUse(layer.name, layer.kind, layer.layer, r, layer.rank, share, _verdict(share))


def rank_use(analysis: Analysis) -> tuple[RankUse, ...]:
    """Per adapter module, r next to rank@τ, in the analysis's reading order; empty when TUNED is not an adapter."""
    if not is_adapter(analysis):
        return ()
    return tuple(module_use(lm) for lm in analysis.layers)


def kind_use(uses: Sequence[RankUse]) -> tuple[KindUse, ...]:
    """`rank_use` rows summarised per module kind, in order of first appearance."""
    groups: dict[str, list[RankUse]] = {}
    for use in uses:
        groups.setdefault(use.kind, []).append(use)
    return tuple(
        KindUse(
            kind=kind,
            n=len(group),
            ranks=tuple(sorted({u.r for u in group})),
            median_rank=float(statistics.median(u.rank for u in group)),
            max_rank=max(u.rank for u in group),
            n_saturated=sum(u.verdict == "saturated" for u in group),
            n_fraction=sum(u.verdict == "fraction" for u in group),
        )
        for kind, group in groups.items()
    )


def configured_ranks(uses: Sequence[RankUse]) -> str:
    """The adapter's r as a phrase: "r = 16" or "r = 8 (24 modules), 32 (4 modules: rank_pattern)"."""
    counts: dict[int, int] = {}
    for use in uses:
        counts[use.r] = counts.get(use.r, 0) + 1
    if len(counts) <= 1:
        return f"r = {next(iter(counts), 0)}"
    common = max(counts, key=lambda r: (counts[r], r))
    others = ", ".join(f"{r} ({counts[r]} modules)" for r in sorted(counts) if r != common)
    return f"r = {common} ({counts[common]} modules); rank_pattern: {others}"


def use_sentences(analysis: Analysis) -> tuple[str, ...]:
    """The adapter user's answers, as short sentences: r against rank@τ, which kinds saturate r, which could shrink.

    Empty when TUNED is not an adapter.
    """
    uses = rank_use(analysis)
    if not uses:
        return ()
    tau = analysis.options.threshold
    ranks = [u.rank for u in uses]
    median = statistics.median(ranks)
    r_median = statistics.median(u.r for u in uses)
    lines = [
        f"This adapter has {configured_ranks(uses)}; its modules need median rank@{tau:.0%} {median:g} "
        f"(max {max(ranks)}), {median / r_median:.0%} of r."
    ]
    kinds = kind_use(uses)
    saturated = [k for k in kinds if k.n_saturated]
    fraction = [k for k in kinds if k.n_fraction]
    if saturated:
        lines.append(
            "Saturated (rank@τ ≥ 80% of r, a flat spectrum up to r; a higher r could help): "
            + ", ".join(f"{k.kind} ({k.n_saturated} of {k.n})" for k in saturated)
            + "."
        )
    if fraction:
        lines.append(
            "Using at most half of r (could be resized, e.g. `"
            + RESIZE_HINT.format(tau=tau)
            + "`): "
            + ", ".join(f"{k.kind} ({k.n_fraction} of {k.n}; max rank@τ {k.max_rank})" for k in fraction)
            + "."
        )
    if not saturated and not fraction:
        lines.append("Every module uses between half and 80% of its rank: r fits this update.")
    return tuple(lines)
