"""Recommendation allocation -> PEFT adapter_config: the config dict that `peft.LoraConfig.from_pretrained` loads
unchanged, verified against the analysed module names, its version-compatibility notes, and the file (METHODS.md §4).

numpy-free and torch-free. PEFT's name matching is mirrored here (and checked against PEFT itself in the tests), so
every key of `target_modules`, `exclude_modules`, `rank_pattern` and `alpha_pattern` is verified against the
analysed names before a config is returned: PEFT silently ignores a key that matches nothing.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectra.errors import SpectraError
from spectra.io.files import write_atomic
from spectra.names import module_name
from spectra.peft.layout import list_hits, literal_pattern, pattern_hits
from spectra.records import LayerMetrics, Recommendation

log = logging.getLogger(__name__)

EXCLUDE_NOTE = "Compatibility: the config uses exclude_modules for matrices given rank 0 (PEFT ≥ 0.14)."
LEGACY_NOTE = (
    "Compatibility: rank_pattern keys resolve as intended with PEFT ≥ 0.15 only (older versions require a dot "
    "before every key and would silently give some modules the default r)."
)


def _alpha(r: int, rslora: bool) -> float | int:
    """lora_alpha giving the scale 2 (α/r = 2, or α/√r = 2 with rsLoRA)."""
    if not rslora:
        return 2 * r
    root = math.isqrt(r)
    return 2 * root if root * root == r else 2.0 * math.sqrt(r)


def _resolve(config: Mapping[str, Any], module: str, legacy: bool = False) -> tuple[int, float] | None:
    """(r, lora_alpha) PEFT gives `module` under `config`, or None when it wraps nothing there."""
    excluded = config.get("exclude_modules") or []
    if any(module in list_hits(e, [module]) for e in excluded):
        return None
    if not any(module in list_hits(t, [module]) for t in config["target_modules"]):
        return None
    r_key = next((k for k in config["rank_pattern"] if pattern_hits(k, [module], legacy)), None)
    a_key = next((k for k in config["alpha_pattern"] if pattern_hits(k, [module], legacy)), None)
    r = config["rank_pattern"][r_key] if r_key is not None else config["r"]
    alpha = config["alpha_pattern"][a_key] if a_key is not None else config["lora_alpha"]
    return int(r), float(alpha)


@dataclass(frozen=True, slots=True)
class _Keys:
    """What each config key is meant to match among the analysed modules, for verification."""

    listed: dict[str, set[str]]  # target_modules / exclude_modules entry -> modules
    patterned: dict[str, set[str]]  # rank_pattern / alpha_pattern key -> modules


def _adapter_config(
    kind_of: Mapping[str, str],
    ranks: Mapping[str, int],
    *,
    rslora: bool,
    task_type: str | None,
    base_model: str | None,
    compress: bool,
) -> tuple[dict[str, Any], _Keys]:
    """The PEFT config realising `ranks` (module -> rank, 0 = leave out) and what each key should match.

    `kind_of` maps every analysed module, targeted or not, to its kind. With `compress`, a kind whose key matches
    exactly that kind's modules becomes one entry (in target_modules, and in rank_pattern when all its modules
    share a rank other than the default `r`), and other pattern keys drop the module name's first component;
    otherwise every module is named in full. The default `r` is the most common rank (ties: the larger)."""
    active = {m: r for m, r in ranks.items() if r > 0}
    counts = Counter(active.values())
    default = max(counts, key=lambda r: (counts[r], r))
    keys = _Keys({}, {})
    targets: list[str] = []
    excluded: list[str] = []
    pattern: dict[str, int] = {}
    for kind in sorted({kind_of[m] for m in active}):
        of_kind = {m for m, k in kind_of.items() if k == kind}
        ranked = [m for m in ranks if kind_of[m] == kind and m in active]
        if compress and list_hits(kind, kind_of) == of_kind:
            targets.append(kind)
            keys.listed[kind] = of_kind
            excluded += [m for m in of_kind if m not in active]
        else:
            targets += ranked
            keys.listed.update({m: {m} for m in ranked})
        values = {active[m] for m in ranked}
        if compress and len(values) == 1 and pattern_hits(literal_pattern(kind), kind_of) == of_kind:
            if values != {default}:
                pattern[literal_pattern(kind)] = values.pop()
                keys.patterned[literal_pattern(kind)] = of_kind
            continue
        for m in ranked:  # compressed: "layers.0.self_attn.q_proj", so older PEFT (a dot before keys) matches too
            key = literal_pattern(m.split(".", 1)[-1] if compress else m)
            if active[m] != default or not compress:
                pattern[key] = active[m]
                keys.patterned[key] = {m}
    keys.listed.update({m: {m} for m in excluded})
    pattern = dict(sorted(pattern.items(), key=lambda item: -len(item[0])))  # PEFT takes the first key that matches
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": default,
        "lora_alpha": _alpha(default, rslora),
        "use_rslora": rslora,
        "target_modules": targets,
        "rank_pattern": pattern,
        "alpha_pattern": {key: _alpha(r, rslora) for key, r in pattern.items()},
    }
    if excluded:
        config["exclude_modules"] = sorted(excluded)
    return config, keys


def _verify(
    config: Mapping[str, Any],
    keys: _Keys,
    ranks: Mapping[str, int],
    rslora: bool,
    modules: Sequence[str],
    legacy: bool = False,
) -> list[str]:
    """Every way PEFT would read `config` differently from `ranks` on the analysed `modules`; empty when exact."""
    problems = []
    for key in [*config["rank_pattern"], *config["alpha_pattern"]]:
        if (hits := pattern_hits(key, modules, legacy)) != keys.patterned.get(key):
            problems.append(f"pattern key {key!r} matches {sorted(hits)}")
    for entry in [*config["target_modules"], *config.get("exclude_modules", [])]:
        if (hits := list_hits(entry, modules)) != keys.listed.get(entry):
            problems.append(f"list entry {entry!r} matches {sorted(hits)}")
    for module in modules:
        r = ranks.get(module, 0)
        want = (r, float(_alpha(r, rslora))) if r > 0 else None
        if (got := _resolve(config, module, legacy)) != want:
            problems.append(f"{module}: PEFT would use (r, alpha) = {got}, the allocation says {want}")
    return problems


def build_adapter_config(
    layers: Sequence[LayerMetrics],
    allocation: Mapping[str, int],
    *,
    rslora: bool,
    task_type: str | None,
    base_model: str | None,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The PEFT adapter_config for `allocation`, verified exact on the analysed names, and the compatibility notes
    it needs (EXCLUDE_NOTE when it uses exclude_modules, LEGACY_NOTE when PEFT 0.13-0.14 would read it otherwise).

    Per-kind keys are used where they match exactly that kind's modules, else one key per module; the default `r`
    is the most common rank, with lora_alpha giving the scale 2 (α = 2r, or α = 2√r with rsLoRA).

    Args:
        layers: every analysed matrix, targeted or not (name and kind are read); keys may end in ".weight".
        allocation: checkpoint key -> LoRA rank, 0 = leave the matrix out.
        rslora: rsLoRA scaling (α/√r).
        task_type: PEFT task type ("CAUSAL_LM", or None for a bare model).
        base_model: written as base_model_name_or_path.

    Raises:
        SpectraError: two analysed matrices share a module name.
    """
    kind_of = {module_name(lm.name): lm.kind for lm in layers}
    if len(kind_of) != len(layers):
        raise SpectraError("two analysed matrices share a module name; PEFT could not tell them apart")
    ranks = {module_name(name): r for name, r in allocation.items()}
    problems: list[str] = []
    for compress in (True, False):
        config, keys = _adapter_config(
            kind_of, ranks, rslora=rslora, task_type=task_type, base_model=base_model, compress=compress
        )
        problems = _verify(config, keys, ranks, rslora, list(kind_of))
        if not problems:
            legacy_ok = not _verify(config, keys, ranks, rslora, list(kind_of), legacy=True)
            notes = ([EXCLUDE_NOTE] if "exclude_modules" in config else []) + ([] if legacy_ok else [LEGACY_NOTE])
            return config, tuple(notes)
        log.debug("config with %s keys rejected: %s", "per-kind" if compress else "per-module", "; ".join(problems[:5]))
    raise RuntimeError(f"no PEFT config realises the allocation exactly: {'; '.join(problems[:5])}")


def write_adapter_config(recommendation: Recommendation, path: str | Path) -> Path:
    """Write `recommendation.config` as adapter_config.json, atomically; returns the file written.

    Args:
        recommendation: the result of `recommend`.
        path: a folder (created if missing; the file goes inside, as PEFT expects) or a `.json` file path.

    Raises:
        SpectraError: the file cannot be written.
    """
    path = Path(path)
    target = path if path.suffix.lower() == ".json" else path / "adapter_config.json"
    return write_atomic(target, json.dumps(recommendation.config, indent=2) + "\n")
