"""Rank rules for extraction and resizing: which LoRA rank each module gets, from its spectrum or from a config.

A `RankRule` holds exactly one rule. Per-module rules need nothing but the module (`rank N`: the layout is known
before any decomposition) or its own σ (`energy τ`); global rules weigh every module against the others and need
the σ of all of them first (`auto`: spectra's recommendation; `budget P`: the budgeted allocator). `from_config`
takes the ranks of an adapter_config.json (e.g. one `spectra recommend` wrote), as PEFT would read them.

numpy only: the rules read Spectrum records and return module ranks.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from spectra.analysis.metrics import compute_metrics, energy_rank
from spectra.errors import CheckpointError, OptionsError, SpectraError
from spectra.lora.allocate import allocate_ranks
from spectra.lora.recommend import RecommendSettings, recommend
from spectra.names import ADAPTER_CONFIG, module_kinds, module_name, printable
from spectra.peft.layout import ConfigReader
from spectra.records import LayerMetrics, Options, Spectrum

MAX_CONFIG_BYTES: Final = 16 * 2**20


@dataclass(frozen=True, slots=True)
class RankRule:
    """Exactly one way of choosing each module's LoRA rank; validated on construction (OptionsError).

    Attributes:
        rank: the same rank N ≥ 1 for every module (capped at min(m, n) and at the module's numerical rank).
        auto: spectra's own recommendation (`spectra.lora.recommend` with default RecommendSettings: ⌈stable
            rank⌉ per module, below break-even, capped at 256; kinds at the noise floor left out).
        energy: per module, the smallest rank holding this share τ ∈ (0, 1] of its ‖ΔW‖_F².
        budget: a parameter budget P ≥ 1 spent globally in decreasing σ²/(m+n) order (`allocate_ranks`).
        from_config: an adapter_config.json (or its folder) whose r/rank_pattern give the ranks, as PEFT reads
            them; modules it does not target are left out.
    """

    rank: int | None = None
    auto: bool = False
    energy: float | None = None
    budget: int | None = None
    from_config: str | None = None

    def __post_init__(self) -> None:
        given = [self.rank is not None, self.auto, self.energy is not None, self.budget is not None]
        given.append(self.from_config is not None)
        if sum(given) != 1:
            raise OptionsError(
                "give exactly one rank rule: rank N, auto, energy TAU, budget PARAMS or from_config FILE "
                "(CLI: --rank N|auto, --energy, --budget, --from-config)"
            )
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise OptionsError(f"rank must be a positive integer, got {self.rank!r}")
        if self.energy is not None and not 0.0 < self.energy <= 1.0:  # also rejects NaN
            raise OptionsError(f"energy must be in (0, 1], got {self.energy} (0.9 keeps 90% of each ‖ΔW‖²)")
        if self.budget is not None and (
            isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1
        ):
            raise OptionsError(f"budget must be a positive number of parameters, got {self.budget!r}")

    @classmethod
    def parse(
        cls,
        rank: str | None = None,
        energy: float | None = None,
        budget: int | None = None,
        from_config: str | None = None,
    ) -> RankRule:
        """The rule of the CLI flags: `rank` is "auto" or an integer as text.

        Raises:
            OptionsError: none or several rules, or a malformed value.
        """
        if rank is not None and rank.strip().lower() == "auto":
            return cls(auto=True, energy=energy, budget=budget, from_config=from_config)
        number = None
        if rank is not None:
            try:
                number = int(rank)
            except ValueError:
                raise OptionsError(f"--rank takes a positive integer or 'auto', got {rank!r}") from None
        return cls(rank=number, energy=energy, budget=budget, from_config=from_config)

    @property
    def needs_spectra(self) -> bool:
        """True when ranks depend on σ (energy, auto, budget): a first pass computes every module's σ."""
        return self.auto or self.energy is not None or self.budget is not None

    def describe(self) -> str:
        """The rule as the user gave it, e.g. "rank 64" or "energy 0.9"."""
        if self.rank is not None:
            return f"rank {self.rank}"
        if self.auto:
            return "rank auto (spectra's recommendation)"
        if self.energy is not None:
            return f"energy {self.energy:g}"
        if self.budget is not None:
            return f"budget {self.budget} parameters"
        return f"ranks from {self.from_config}"

    def to_json(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "auto": self.auto,
            "energy": self.energy,
            "budget": self.budget,
            "from_config": self.from_config,
        }


def layer_metrics(spectra: Sequence[Spectrum], options: Options) -> list[LayerMetrics]:
    """LayerMetrics of each spectrum (in the given order), kinds derived from all their names together."""
    kinds = module_kinds([s.name for s in spectra])
    return [compute_metrics(s, options, *kinds[s.name]) for s in spectra]


def spectral_ranks(rule: RankRule, spectra: Sequence[Spectrum], options: Options) -> tuple[dict[str, int], str | None]:
    """name -> rank (0: leave the module out) under a σ-based rule, and the recommendation's reason for `auto`.

    Ranks are capped at min(m, n) and at len(s) (the directions a spectrum holds).

    Args:
        rule: a rule with `needs_spectra`.
        spectra: one Spectrum per changed module that may be targeted.
        options: the analysis settings (threshold and noise flags of the metrics `auto` reads).

    Raises:
        OptionsError: a budget that buys no direction.
        SpectraError: `auto` finds no module kind worth targeting.
    """
    if rule.energy is not None:
        ranks = {s.name: energy_rank(s.s, rule.energy, s.energy) for s in spectra}
        return _capped(ranks, spectra), None
    layers = layer_metrics(spectra, options)
    if rule.budget is not None:
        ranks = allocate_ranks(layers, rule.budget)
        if not any(ranks.values()):
            cheapest = min(sum(s.shape) for s in spectra)
            raise OptionsError(f"budget {rule.budget} buys no rank: the cheapest module costs {cheapest} per rank")
        return _capped(ranks, spectra), None
    advice = recommend(layers, RecommendSettings(include_embeddings=True, task_type=None))
    if advice is None:
        raise SpectraError("the recommendation targets no module (every kind at the noise floor?); use --rank N")
    ranks = {s.name: advice.allocation.get(s.name, 0) for s in spectra}
    return _capped(ranks, spectra), advice.reason


def _capped(ranks: Mapping[str, int], spectra: Sequence[Spectrum]) -> dict[str, int]:
    return {s.name: min(int(ranks.get(s.name, 0)), min(s.shape), len(s.s)) for s in spectra}


def read_rank_config(path: str | Path) -> dict[str, Any]:
    """The JSON object of an adapter_config.json (a file of any name, or a folder holding adapter_config.json).

    Raises:
        CheckpointError: missing, unreadable, not a JSON object, or not a LoRA config.
    """
    file = Path(path)
    if file.is_dir():
        file = file / ADAPTER_CONFIG
    what = f"{printable(str(file))}: not a readable LoRA adapter_config.json"
    try:
        if not file.is_file():
            raise CheckpointError(f"{what}: missing, or not a regular file")
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{what}: larger than {MAX_CONFIG_BYTES >> 20} MiB")
        config = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{what}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{what}: {printable(str(exc))[:200]}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{what}: the JSON is a {type(config).__name__}, not an object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"{what}: peft_type is {printable(peft_type)}, not LORA")
    return config


def config_ranks(config: Mapping[str, Any], names: Sequence[str], label: str) -> dict[str, int]:
    """name -> the rank PEFT gives that module under `config` (0 where it targets nothing), for checkpoint keys.

    Raises:
        CheckpointError: a rank that is not a positive integer, or a pattern key PEFT could not compile.
    """
    try:
        reader = ConfigReader.of(config)
        found = {name: reader.resolve(module_name(name)) for name in names}
    except (re.error, TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{label}: an r, target_modules or rank_pattern entry is not valid: {exc}") from None
    ranks = {}
    for name, resolved in found.items():
        if resolved is not None and (resolved[0] < 1 or not math.isfinite(resolved[1])):
            raise CheckpointError(f"{label}: {printable(name)} gets r={resolved[0]}; ranks must be positive integers")
        ranks[name] = 0 if resolved is None else resolved[0]
    return ranks
