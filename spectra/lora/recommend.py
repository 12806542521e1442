"""list[LayerMetrics] -> Recommendation: which matrices LoRA should target, the uniform rank reaching the energy
target, per-module ranks under a parameter budget, the PEFT config, and the reason and advice around them (README,
The recommendation).

numpy only. The ranks come from `spectra.lora.allocate`; the adapter_config itself (and `write_adapter_config`,
re-exported here) from `spectra.peft.config`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from spectra.analysis.baselines import RULES, max_lora_rank, rule_rank
from spectra.analysis.metrics import energy_rank
from spectra.errors import OptionsError
from spectra.lora.allocate import SpectraTable, allocate_ranks, smallest_uniform_rank, uniform_tradeoff
from spectra.names import CAVEAT, RANK_RTOL, is_embedding
from spectra.peft.config import build_adapter_config
from spectra.peft.config import write_adapter_config as write_adapter_config  # re-exported: callers import it here
from spectra.records import LayerMetrics, RankOption, Recommendation

log = logging.getLogger(__name__)

DEFAULT_RULE = "stable"  # validated on the demo fine-tune (benchmarks/validate_rules.py, README)
MIN_KIND_SHARE = 0.01  # "meaningful energy": a module kind holding < 1% of the candidates' Σ‖ΔW‖_F² is not targeted
TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "SEQ_2_SEQ_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # PEFT's
VARIANTS = ("per-module", "uniform")  # what the written config holds

ADVICE = (
    "Practice, not derived from this spectrum (Biderman et al. 2024): target all linear modules "
    "(q, k, v, o, gate, up, down); LoRA suits instruction tuning better than continued pretraining.",
    "Practice, not derived from this spectrum (Hayou et al. 2024, LoRA+): learning rate of B = 16 × that of A.",
    "Measured on spectra's demo task (benchmarks/train_alpha.py), not derived from this spectrum: at r ≤ 16 with "
    "α = 2r the best LoRA learning rate was about 10× full fine-tuning's (2× that was already worse); with rsLoRA "
    "and α fixed, at r = 64–256, it was 2.5–5× full fine-tuning's; with α = 2r at r ≥ 64 a higher learning rate "
    "collapses training instead of helping. Sweep around these values.",
)
RSLORA_ABOVE = 16  # above this rank the recommended config uses rsLoRA with a fixed α (measured, see ADVICE)
RULE_NAMES = {
    "energy": "energy@target: reconstruction of ΔW",
    "gd": "Gavish–Donoho hard threshold",
    "mp": "σ above the Marchenko–Pastur edge fitted to the median",
    "stable": "⌈stable rank⌉",
}
RSLORA_ADVICE = (
    "Measured on spectra's demo task (benchmarks/train_alpha.py), not derived from this spectrum: with α = 2r the "
    "update grows like √r at a fixed learning rate, and at the rate that suits r = 8 a LoRA with α = 2r kept half of "
    "r = 8's gain at r = 32 and none at r = 64; rsLoRA (use_rslora, scale α/√r) with α held fixed at 2√8 ≈ 5.66 "
    "kept the update's size flat across ranks and matched the full fine-tune at r = 64 and 256, so this config uses "
    "it (not α = 2r, nor α = 2√r, which give every rank the scale 2)."
)


@dataclass(frozen=True, slots=True)
class RecommendSettings:
    """Every setting of a recommendation; the `spectra recommend` flags map 1:1 onto these fields. Validated on
    construction.

    Attributes:
        target: energy share in (0, 1] the uniform rank must capture over the targeted matrices.
        max_rank: cap on the uniform rank, ≥ 1; when it binds, `cap_binds` is set and `reason` says so.
        budget: LoRA parameters for the per-module allocation, ≥ 1; None spends what the uniform rank costs.
        rslora: use rsLoRA scaling (α/√r) with α fixed at 2√8 (scale 2 at r = 8) instead of α = 2r; None (the
            default) uses it when the config's largest rank exceeds RSLORA_ABOVE (16), where α = 2r stopped
            training on the measured task.
        include_embeddings: also target embeddings and the output head.
        base_model: written as base_model_name_or_path.
        task_type: PEFT task type written to the config (one of TASK_TYPES), or None for a bare model (PEFT's plain
            PeftModel, which fits any model; `analyze` passes the one inferred from the base's config.json).
        variant: which LoRA the config holds: "per-module" (the allocation, as rank_pattern) or "uniform" (the
            uniform rank on every targeted matrix).
        rule: how each matrix's rank is chosen (spectra.analysis.baselines.RULES): "energy" = the smallest uniform
            rank reconstructing `target` of ΔW's energy; "gd" (Gavish–Donoho), "mp" (σ above the fitted
            Marchenko–Pastur edge), "stable" (⌈stable rank⌉) = per-module ranks counting the directions above
            the noise bulk, with `target` unused.
    """

    target: float = 0.9
    max_rank: int = 256
    budget: int | None = None
    rslora: bool | None = None
    include_embeddings: bool = False
    base_model: str | None = None
    task_type: str | None = None
    variant: str = "per-module"
    rule: str = DEFAULT_RULE

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise OptionsError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if not 0.0 < self.target <= 1.0:  # also rejects NaN
            raise OptionsError(f"target must be in (0, 1], got {self.target} (0.9 means 90% of the energy)")
        if self.max_rank < 1:
            raise OptionsError(f"max_rank must be at least 1, got {self.max_rank}")
        if self.budget is not None and self.budget < 1:
            raise OptionsError(f"budget must be a positive number of parameters, got {self.budget}")
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise OptionsError(f"task_type must be one of {', '.join(TASK_TYPES)} or none, got {self.task_type!r}")
        if self.variant not in VARIANTS:
            raise OptionsError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")


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
    tiny = [lm for lm in targets if max_lora_rank(lm.shape) < 1]
    if tiny:
        dropped.append(f"{len(tiny)} matrices too small for a LoRA (rank 1 costs as much as the dense matrix)")
    return [lm for lm in targets if max_lora_rank(lm.shape) >= 1], dropped


def _uniform_choice(table: SpectraTable, goal: float, settings: RecommendSettings) -> tuple[RankOption, int | None]:
    """(the recommended uniform rank's trade-off row, the smallest integer rank reaching `goal` or None).

    The rank is the smallest r capturing `goal` (a 0.1-point miss costs one rank, not a doubling), capped at
    max_rank and at break-even (the largest r with r·(m+n) < m·n on every targeted matrix)."""
    allowed = max(min(settings.max_rank, int(table.limit.min())), 1)
    needed = smallest_uniform_rank(table, goal * (1 - RANK_RTOL), int(table.side.max()))
    if needed is not None and needed <= allowed:
        return table.option(needed), needed
    return table.option(allowed), needed


def _rule_ranks(targets: Sequence[LayerMetrics], rule: str) -> np.ndarray:
    """The rank `rule` gives each target, uncapped."""
    return np.array(
        [rule_rank(rule, lm.s, lm.shape, lm.frobenius_norm**2, lm.rank) for lm in targets], dtype=np.int64
    ).reshape(-1)


def _not_low_rank(targets: Sequence[LayerMetrics], wanted: np.ndarray, table: SpectraTable) -> list[str]:
    """Names of the targets whose wanted rank reaches break-even m·n/(m+n): not low-rank at this criterion."""
    return [lm.name for lm, r, c in zip(targets, wanted, table.limit, strict=True) if r > c]


def _tradeoff(targets: Sequence[LayerMetrics], uniform: RankOption) -> tuple[RankOption, ...]:
    """The trade-off table of the targets, with the recommended rank's row added when it is not a candidate."""
    tradeoff = uniform_tradeoff(targets)
    if uniform.r in {o.r for o in tradeoff}:
        return tradeoff
    return tuple(sorted((*tradeoff, uniform), key=lambda o: o.r))


def _allocation(targets: Sequence[LayerMetrics], table: SpectraTable, spend: int) -> dict[str, int]:
    """Per-module ranks within `spend` parameters; an OptionsError when the budget buys no direction at all."""
    allocation = allocate_ranks(targets, spend)
    if not any(allocation.values()):
        raise OptionsError(f"budget {spend} buys no rank: the cheapest matrix costs {table.cost.min()} per rank")
    return allocation


def _peft_config(
    layers: Sequence[LayerMetrics], allocation: Mapping[str, int], settings: RecommendSettings
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The PEFT config realising `allocation` over every analysed matrix, and its compatibility notes."""
    kinds = {lm.name: lm.kind for lm in layers}
    return build_adapter_config(
        kinds, allocation, rslora=uses_rslora(allocation, settings), task_type=settings.task_type,
        base_model=settings.base_model,
    )  # fmt: skip


def uses_rslora(allocation: Mapping[str, int], settings: RecommendSettings) -> bool:
    """settings.rslora, or when it is None (auto): whether a rank of `allocation` exceeds RSLORA_ABOVE."""
    if settings.rslora is not None:
        return settings.rslora
    return max(allocation.values(), default=0) > RSLORA_ABOVE


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


def _uniform_sentence(uniform: RankOption, needed: int | None, cap_binds: bool, target: float, rule: str) -> str:
    if rule != "energy":
        return (
            f"Rule {rule!r} ({RULE_NAMES[rule]}) keeps {target:.1%} of the update's energy; uniform rank "
            f"{uniform.r} captures {uniform.captured:.1%}" + (" (capped)." if cap_binds else ".")
        )
    if cap_binds:
        return (
            f"LoRA at the rank cap {uniform.r} captures only {uniform.captured:.1%} of the update's energy "
            f"(target {target:.0%})"
            + (f"; reaching it needs uniform rank {needed}" if needed else "")
            + ": this update has higher rank than LoRA represents at this cap (LoRA learns less)."
        )
    return (
        f"Uniform rank {uniform.r}, the smallest reaching the target, reconstructs {uniform.captured:.1%} of the "
        f"update's energy in the targeted matrices (energy@{target:.0%}: the rank that reconstructs ΔW, noise "
        "included, which can exceed the rank the task needs)."
    )


def _dense_sentence(names: Sequence[str], rule: str, n_targets: int) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    criterion = "energy target" if rule == "energy" else f"rule {rule!r}"
    return (
        f"{len(names)} of {n_targets} matrices are not low-rank at the {criterion} (the rank it asks for reaches "
        f"m·n/(m+n), where a LoRA costs the dense matrix): {shown}. Fine-tune those modules fully "
        "(modules_to_save) or lower the target; their LoRA rank is capped below break-even."
    )


def _allocation_sentence(table: SpectraTable, spend: int, budgeted: bool, captured: float, ranks: np.ndarray) -> str:
    if budgeted:
        same_r = spend // int(table.cost.sum())
        versus = table.option(int(same_r)).captured if same_r else 0.0
        sentence = (
            f"Per-module ranks within {_count(spend)} parameters capture {captured:.1%}, against "
            f"{versus:.1%} for uniform rank {same_r}, the largest that fits"
        )
    else:
        sentence = f"Per-module ranks at the same cost ({_count(spend)} parameters) capture {captured:.1%}"
    n_zero = sum(1 for r in ranks if r == 0)
    return sentence + (f"; {n_zero} matrices get rank 0." if n_zero else ".")


def recommend(
    layers: Sequence[LayerMetrics], settings: RecommendSettings | None = None, **changes: Any
) -> Recommendation | None:
    """The LoRA to use for this fine-tune: a uniform rank, per-module ranks under a budget, and a PEFT config.

    Returns None when there are no layers or no module kind qualifies as a target (see `_select_targets`).

    Args:
        layers: per-matrix metrics of the analysis (s, frobenius_norm, shape, kind, noisy are read).
        settings: target, rank cap, budget and config options; default `RecommendSettings()`.
        **changes: RecommendSettings fields to set on top of `settings`, e.g. `recommend(layers, budget=6000)`.

    Raises:
        OptionsError: a setting out of range (see RecommendSettings), or a budget that buys no direction.
    """
    settings = replace(settings or RecommendSettings(), **changes)
    targets, dropped = _select_targets(layers, settings.include_embeddings)
    if not targets:
        log.info("no recommendation: %s", "no layers" if not layers else "no kind to target: " + ", ".join(dropped))
        return None
    table = SpectraTable.of(targets)
    total = float(table.energy.sum())
    if settings.rule == "energy":
        wanted = np.array([energy_rank(lm.s, settings.target, lm.frobenius_norm**2) for lm in targets], np.int64)
        goal = settings.target
        rule_alloc = None
    else:
        wanted = _rule_ranks(targets, settings.rule)
        rule_alloc = np.minimum(np.minimum(wanted, table.limit), settings.max_rank)
        goal = min(table.captured(rule_alloc) / total, 1.0) if total > 0 else 0.0
    uniform, needed = _uniform_choice(table, goal, settings)
    dense = _not_low_rank(targets, wanted, table)
    if settings.rule == "energy" and needed is not None and needed > int(table.limit.min()):
        dense = dense or [lm.name for lm, c in zip(targets, table.limit, strict=True) if c < needed]
    if rule_alloc is not None and settings.budget is None:
        spend = int(rule_alloc @ table.cost)
        allocation = {lm.name: int(r) for lm, r in zip(targets, rule_alloc, strict=True)}
        if not any(allocation.values()):
            allocation = {lm.name: 1 if c >= 1 else 0 for lm, c in zip(targets, table.limit, strict=True)}
            spend = int(np.array(list(allocation.values())) @ table.cost)
    else:
        spend = uniform.params if settings.budget is None else settings.budget
        allocation = _allocation(targets, table, spend)
    ranks = np.array(list(allocation.values()))
    chosen = allocation if settings.variant == "per-module" else {lm.name: uniform.r for lm in targets}
    config, notes = _peft_config(layers, chosen, settings)
    cap_binds = uniform.captured < goal * (1 - RANK_RTOL)
    allocation_captured = min(table.captured(ranks) / total, 1.0) if total > 0 else 0.0
    sentences = [
        _uniform_sentence(uniform, needed, cap_binds, goal, settings.rule),
        _allocation_sentence(table, spend, settings.budget is not None, allocation_captured, ranks),
        *([_dense_sentence(dense, settings.rule, len(targets))] if dense else []),
        *([f"Not targeted: {', '.join(dropped)}."] if dropped else []),
    ]
    return Recommendation(
        target=settings.target,
        max_rank=settings.max_rank,
        uniform_rank=uniform.r,
        uniform_captured=uniform.captured,
        cap_binds=cap_binds,
        tradeoff=_tradeoff(targets, uniform),
        budget=spend,
        allocation=allocation,
        allocation_captured=allocation_captured,
        allocation_params=int(ranks @ table.cost),
        target_modules=tuple(config["target_modules"]),
        config=config,
        reason=" ".join(sentences),
        advice=(*ADVICE, *([RSLORA_ADVICE] if config.get("use_rslora") else []), *notes),
        caveat=CAVEAT,
        variant=settings.variant,
        rule=settings.rule,
        not_low_rank=tuple(dense),
    )
