"""PEFT adapter_config dicts: built from per-module ranks (`build_adapter_config`) or from a user's own config with
new ranks (`resized_config`), verified against the module names, with their version-compatibility notes.

numpy-free and torch-free. PEFT's name matching is mirrored in `spectra.peft.layout` (and checked against PEFT
itself in the tests), so every key of `target_modules`, `exclude_modules`, `rank_pattern` and `alpha_pattern` is
verified before a config is returned: PEFT silently ignores a key that matches nothing. Verification costs a few
dictionary lookups per module (no regular expression per key × module), so Mixture-of-Experts models with tens of
thousands of matrices take well under a second.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from spectra.errors import OptionsError, SpectraError
from spectra.io.files import write_atomic
from spectra.names import module_kinds, module_name
from spectra.peft import keys
from spectra.peft.layout import (
    VARIANTS,
    Patterns,
    names,
    pattern_value,
    saved_hits,
)
from spectra.records import Recommendation

log = logging.getLogger(__name__)

EXCLUDE_NOTE = "Compatibility: the config uses exclude_modules for matrices given rank 0 (PEFT ≥ 0.14)."
LEGACY_NOTE = (
    "Compatibility: rank_pattern keys resolve as intended with PEFT ≥ 0.15 only (older versions require a dot "
    "before every key and would silently give some modules the default r)."
)
# fields build_adapter_config computes itself, and fields whose effect on matching spectra does not mirror
COMPUTED = frozenset(
    {"peft_type", "task_type", "base_model_name_or_path", "r", "lora_alpha", "use_rslora", "target_modules"}
    | {"rank_pattern", "alpha_pattern", "exclude_modules"}
)
UNMIRRORED = frozenset({"layers_to_transform", "layers_pattern", "target_parameters", *VARIANTS})


RSLORA_ALPHA = 2 * math.sqrt(8)  # rsLoRA's fixed α: the scale α/√r of α = 2r at the reference rank r = 8


def _alpha(r: int, rslora: bool) -> float | int:
    """lora_alpha for a recommended LoRA: α = 2r (scale 2) in plain LoRA; with rsLoRA α held fixed at RSLORA_ALPHA
    (scale 2 at r = 8, 2·√(8/r) above), which kept the update's size flat across ranks where α = 2r let it grow
    like √r and stop training (benchmarks/train_alpha.py, README "α and learning rate")."""
    return RSLORA_ALPHA if rslora else 2 * r


def _tidy(value: float) -> float | int:
    """An integral alpha written as an int, as PEFT's own configs do."""
    return int(value) if float(value).is_integer() else float(value)


def _notes(config: Mapping[str, Any], draft: keys.Draft, expected: Mapping[str, tuple[int, float] | None]) -> list[str]:
    legacy_ok = not keys.verify(config, draft, expected, legacy=True)
    return ([EXCLUDE_NOTE] if draft.excluded else []) + ([] if legacy_ok else [LEGACY_NOTE])


def _ranks(ranks: Mapping[str, int]) -> dict[str, int]:
    """module -> rank (module names: checkpoint keys without ".weight"), checked: integers ≥ 0, one at least > 0."""
    out = {module_name(name): r for name, r in ranks.items()}
    bad = [f"{m}={r!r}" for m, r in out.items() if isinstance(r, bool) or not isinstance(r, int) or r < 0]
    if bad:
        raise OptionsError(f"LoRA ranks must be integers ≥ 0, got {', '.join(bad[:3])}")
    if not any(out.values()):
        raise OptionsError("every module has rank 0: an adapter needs at least one module with a positive rank")
    return out


def _alphas(alphas: Mapping[str, float], ranks: Mapping[str, int]) -> dict[str, float | int]:
    out = {module_name(name): a for name, a in alphas.items()}
    missing = [m for m, r in ranks.items() if r > 0 and m not in out]
    bad = [
        f"{m}={a!r}"
        for m, a in out.items()
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0
    ]
    if missing or bad:
        raise OptionsError(f"lora_alpha must be given for every ranked module, finite and > 0: {(missing + bad)[:3]}")
    return {m: _tidy(out[m]) for m, r in ranks.items() if r > 0}


def build_adapter_config(
    kinds: Mapping[str, str],
    ranks: Mapping[str, int],
    *,
    rslora: bool,
    task_type: str | None,
    base_model: str | None,
    alphas: Mapping[str, float] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The PEFT adapter_config giving every module its rank, verified exact on the given module names, and the
    compatibility notes it needs (EXCLUDE_NOTE when it uses exclude_modules, LEGACY_NOTE when PEFT 0.13-0.14 would
    read it otherwise).

    Per-kind keys are used where they match exactly that kind's modules, else one key per module; the default `r`
    and `lora_alpha` are the most common values.

    Args:
        kinds: module -> module kind ("q_proj") for every module of the model LoRA could reach, targeted or not
            (keys are verified against all of them); names are module names or checkpoint keys ending in ".weight".
        ranks: module -> LoRA rank, 0 = leave the module out; modules of `kinds` only.
        rslora: rsLoRA scaling (α/√r).
        task_type: PEFT task type ("CAUSAL_LM", or None for a bare model; see `spectra.peft.task.infer_task_type`).
        base_model: written as base_model_name_or_path.
        alphas: module -> lora_alpha for the ranked modules; None: α = 2r (scale 2), or with rsLoRA α = 2√8 for
            every module (scale 2 at r = 8, 2·√(8/r) above).
        extra: more LoraConfig fields written as given (lora_dropout, lora_bias, fan_in_fan_out, modules_to_save,
            ...); not the computed ones, nor the layer filters and LoRA variants the verification does not mirror.

    Raises:
        SpectraError: two modules share a module name.
        OptionsError: ranks or alphas malformed, a ranked module missing from `kinds`, or a forbidden extra field.
    """
    kind_of = {module_name(name): kind for name, kind in kinds.items()}
    if len(kind_of) != len(kinds):
        raise SpectraError("two analysed matrices share a module name; PEFT could not tell them apart")
    rank_of = _ranks(ranks)
    if unknown := sorted(rank_of.keys() - kind_of.keys()):
        raise OptionsError(f"ranked modules missing from kinds: {unknown[:3]}")
    active = {m: r for m, r in rank_of.items() if r > 0}
    alpha_of = _alphas(alphas, active) if alphas is not None else {m: _alpha(r, rslora) for m, r in active.items()}
    extra = dict(extra or {})
    if forbidden := sorted(extra.keys() & (COMPUTED | UNMIRRORED)):
        raise OptionsError(f"extra adapter_config fields {forbidden} are computed or not supported")
    modules = keys.Modules.of(kind_of)
    expected = {m: (active[m], float(alpha_of[m])) if m in active else None for m in kind_of}
    problems: list[str] = []
    for mode in keys.MODES:
        draft = keys.draft_config(modules, active, alpha_of, mode, lists=True)
        config: dict[str, Any] = {
            "peft_type": "LORA",
            "task_type": task_type,
            "base_model_name_or_path": base_model,
            "r": draft.fields["r"],
            "lora_alpha": draft.fields["lora_alpha"],
            "use_rslora": rslora,
            "target_modules": draft.fields["target_modules"],
            "rank_pattern": draft.fields["rank_pattern"],
            "alpha_pattern": draft.fields["alpha_pattern"],
            **({"exclude_modules": draft.excluded} if draft.excluded else {}),
            **extra,
        }
        if not (problems := keys.verify(config, draft, expected)):
            return config, tuple(_notes(config, draft, expected))
        log.debug("config with %s keys rejected: %s", mode, "; ".join(problems[:5]))
    if any(saved_hits(names(extra.get("modules_to_save")), m) for m in active):
        raise OptionsError("a ranked module is also in modules_to_save; PEFT never puts a LoRA on those")
    raise RuntimeError(f"no PEFT config realises the ranks exactly: {'; '.join(problems[:5])}")  # a bug


def _kept_alphas(raw: Mapping[str, Any], ranks: Mapping[str, int]) -> dict[str, float]:
    """lora_alpha keeping each module's scale under `raw` (α/r, or α/√r with use_rslora) at its new rank."""
    old_r, old_a = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    r_keys, a_keys = Patterns(old_r), Patterns(old_a)
    root = math.sqrt if raw.get("use_rslora") else float
    out = {}
    for m, r in ranks.items():
        scale = pattern_value(old_a, a_keys, m, raw.get("lora_alpha", 8)) / root(
            pattern_value(old_r, r_keys, m, raw.get("r", 8))
        )
        out[m] = scale * root(r)
    return out


def _excluding(old: Any, modules: Sequence[str], exact: bool) -> Any:
    """exclude_modules extended by `modules` (full names): a list grows; a regular expression, or any value when
    `exact` (a list entry would also exclude names ending in "." + it), gains alternatives naming them alone."""
    if not exact and not isinstance(old, str):
        return [*names(old), *(m for m in modules if m not in names(old))]
    if isinstance(old, str):
        return "|".join([f"(?:{old})", keys.alternatives(modules)])
    return "|".join([*(rf"(?s:.*\.)?{re.escape(e)}" for e in names(old)), keys.alternatives(modules)])


def resized_config(
    raw: Mapping[str, Any], ranks: Mapping[str, int], alphas: Mapping[str, float] | None = None
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The user's adapter_config with new per-module ranks: only r, lora_alpha, rank_pattern and alpha_pattern are
    replaced (and modules given rank 0 appended to exclude_modules); target_modules, dropout, task type and every
    other field are kept. Verified like `build_adapter_config`: PEFT reads exactly these ranks and alphas.

    Args:
        raw: the adapter's config as read (`LoraSettings.raw`, validated by `read_lora_settings`).
        ranks: module -> new rank (0 = drop the module) for every LoRA module of the adapter.
        alphas: module -> new lora_alpha; None keeps each module's scale (α/r, or α/√r with use_rslora).

    Returns:
        The new config and its compatibility notes (EXCLUDE_NOTE, LEGACY_NOTE), as `build_adapter_config`.

    Raises:
        OptionsError: ranks or alphas malformed, or no module keeps a rank.
    """
    rank_of = _ranks(ranks)
    active = {m: r for m, r in rank_of.items() if r > 0}
    alpha_of = _alphas(alphas if alphas is not None else _kept_alphas(raw, active), active)
    modules = keys.Modules.of({name: kind for name, (kind, _) in module_kinds(list(rank_of)).items()})
    expected = {m: (active[m], float(alpha_of[m])) if m in active else None for m in rank_of}
    problems: list[str] = []
    for mode in keys.MODES:
        draft = keys.draft_config(modules, active, alpha_of, mode, lists=False)
        config = copy.deepcopy(dict(raw))
        config.update(draft.fields)
        if draft.excluded:
            config["exclude_modules"] = _excluding(raw.get("exclude_modules"), draft.excluded, mode == "exact")
            if not isinstance(config["exclude_modules"], list):
                draft.listed = {}
        if not (problems := keys.verify(config, draft, expected)):
            return config, tuple(_notes(config, draft, expected))
        log.debug("resized config rejected: %s", "; ".join(problems[:5]))
    raise RuntimeError(f"no PEFT config realises the resized ranks exactly: {'; '.join(problems[:5])}")


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
