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
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from spectra.errors import OptionsError, SpectraError
from spectra.io.files import write_atomic
from spectra.names import module_kinds, module_name
from spectra.peft.layout import (
    VARIANTS,
    Membership,
    Patterns,
    list_index,
    literal_pattern,
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

V = TypeVar("V", int, float)


def _alpha(r: int, rslora: bool) -> float | int:
    """lora_alpha giving the scale 2 (α/r = 2, or α/√r = 2 with rsLoRA)."""
    if not rslora:
        return 2 * r
    root = math.isqrt(r)
    return 2 * root if root * root == r else 2.0 * math.sqrt(r)


def _tidy(value: float) -> float | int:
    """An integral alpha written as an int, as PEFT's own configs do."""
    return int(value) if float(value).is_integer() else float(value)


@dataclass(slots=True)
class _Draft:
    """A candidate config's computed fields, and what each key it wrote is meant to match (for verification)."""

    targets: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)  # r, lora_alpha, rank_pattern, alpha_pattern
    listed: dict[str, set[str]] = field(default_factory=dict)  # target/exclude list entry -> modules
    patterned: dict[str, set[str]] = field(default_factory=dict)  # pattern key -> modules


@dataclass(frozen=True, slots=True)
class _Modules:
    """Every module (targeted or not) grouped by kind, and the kinds one short key names exactly."""

    kind_of: dict[str, str]
    of_kind: dict[str, list[str]]  # kind -> its modules, in the given order
    list_exact: frozenset[str]  # kinds whose list entry (target_modules) matches exactly that kind's modules
    key_exact: frozenset[str]  # kinds whose literal rank_pattern key matches exactly that kind's modules

    @classmethod
    def of(cls, kind_of: dict[str, str]) -> _Modules:
        of_kind: dict[str, list[str]] = {}
        for module, kind in kind_of.items():
            of_kind.setdefault(kind, []).append(module)
        listed = list_index(kind_of)
        keys = {literal_pattern(kind): kind for kind in of_kind}
        hits = Patterns(keys).hits(kind_of)
        return cls(
            kind_of,
            of_kind,
            frozenset(k for k, ms in of_kind.items() if listed.get(k) == set(ms)),
            frozenset(kind for key, kind in keys.items() if hits[key] == set(of_kind[kind])),
        )


MODES = ("kind", "module", "exact")  # tried in this order; the first that verifies is returned
# more rank_pattern + alpha_pattern keys than this, and keys naming one module each are merged into "(?:a|b|...)"
# keys of one value: PEFT tries every key per module with re.match, and beyond Python's cache of 512 compiled
# expressions it recompiles each one (thousands of keys made PEFT take minutes to build a model)
MAX_KEYS = 256
MAX_GROUP_CHARS = 8000  # per merged key (read_lora_settings refuses keys over 10,000 characters)


def _pattern(values: Mapping[str, V], modules: _Modules, mode: str, draft: _Draft) -> tuple[V, dict[str, V]]:
    """(default, pattern) giving every module of `values` its value as PEFT reads a rank_pattern/alpha_pattern.

    The default is the most common value (ties: the larger). Mode "kind": a kind whose modules share a value other
    than the default becomes one key (where it names exactly that kind), other keys drop the module name's first
    component ("layers.0.self_attn.q_proj", which older PEFT, needing a dot before keys, matches too); "module":
    every module's full name is a key; "exact": every module gets "^" + its escaped name, which matches that module
    alone even when its name ends another one's. Longer keys come first: PEFT takes the first that matches."""
    counts = Counter(values.values())
    default = max(counts, key=lambda v: (counts[v], v))
    pattern: dict[str, V] = {}
    for kind in sorted({modules.kind_of[m] for m in values}):
        active = [m for m in modules.of_kind[kind] if m in values]
        distinct = {values[m] for m in active}
        if mode == "kind" and len(distinct) == 1 and kind in modules.key_exact:
            if (value := distinct.pop()) != default:
                pattern[literal_pattern(kind)] = value
                draft.patterned[literal_pattern(kind)] = set(modules.of_kind[kind])
            continue
        for m in active:
            if values[m] != default or mode != "kind":
                key = (
                    "^" + re.escape(m)
                    if mode == "exact"
                    else literal_pattern(m.split(".", 1)[-1] if mode == "kind" else m)
                )
                pattern[key] = values[m]
                draft.patterned[key] = {m}
    return default, dict(sorted(pattern.items(), key=lambda item: -len(item[0])))


def _grouped(pattern: Mapping[str, V], draft: _Draft) -> dict[str, V]:
    """`pattern` with its one-module keys merged per value into "(?:a|b|...)" keys of at most MAX_GROUP_CHARS."""
    out: dict[str, V] = {}
    groups: dict[V, list[list[str]]] = {}
    for key, value in pattern.items():
        if len(draft.patterned[key]) > 1:
            out[key] = value  # a kind's key
            continue
        chunks = groups.setdefault(value, [[]])
        if sum(len(k) + 1 for k in chunks[-1]) + len(key) + 3 > MAX_GROUP_CHARS:  # "(?:" "|"... ")"
            chunks.append([])
        chunks[-1].append(key)
    for value, chunks in groups.items():
        for chunk in chunks:
            key = f"(?:{'|'.join(chunk)})"
            out[key] = value
            draft.patterned[key] = set().union(*(draft.patterned[k] for k in chunk))
    return out


def _alternatives(names: Sequence[str]) -> str:
    """A target_modules/exclude_modules expression (PEFT fullmatches it) naming exactly these modules."""
    return "|".join(re.escape(m) for m in names)


def _draft(modules: _Modules, ranks: Mapping[str, int], alphas: Mapping[str, float], mode: str, lists: bool) -> _Draft:
    """The computed fields realising `ranks` (> 0 only) and `alphas`; with `lists`, also target_modules (a kind's
    entry where it names exactly that kind, else the modules; mode "exact": an expression naming them) and
    exclude_modules (rank-0 modules a kind entry covers); without, `excluded` holds every rank-0 module."""
    draft = _Draft()
    r, rank_pattern = _pattern(ranks, modules, mode, draft)
    alpha, alpha_pattern = _pattern(alphas, modules, mode, draft)
    if len(rank_pattern) + len(alpha_pattern) > MAX_KEYS:
        rank_pattern, alpha_pattern = _grouped(rank_pattern, draft), _grouped(alpha_pattern, draft)
    draft.fields = {"r": r, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if not lists:
        draft.excluded = sorted(m for m in modules.kind_of if m not in ranks)
        draft.listed = {} if mode == "exact" else {m: {m} for m in draft.excluded}
        return draft
    if mode == "exact":
        draft.fields["target_modules"] = _alternatives([m for m in modules.kind_of if m in ranks])
        return draft
    for kind in sorted({modules.kind_of[m] for m in ranks}):
        of_kind = modules.of_kind[kind]
        if mode == "kind" and kind in modules.list_exact:
            draft.targets.append(kind)
            draft.listed[kind] = set(of_kind)
            draft.excluded += [m for m in of_kind if m not in ranks]
        else:
            draft.targets += [m for m in of_kind if m in ranks]
            draft.listed.update({m: {m} for m in of_kind if m in ranks})
    draft.excluded.sort()
    draft.listed.update({m: {m} for m in draft.excluded})
    draft.fields["target_modules"] = draft.targets
    return draft


@dataclass(frozen=True, slots=True)
class _Reader:
    """How PEFT reads one config's targeting and patterns, prepared once for many modules."""

    config: Mapping[str, Any]
    excluded: Membership
    targets: Membership
    saved: tuple[str, ...]
    rank_keys: Patterns
    alpha_keys: Patterns

    @classmethod
    def of(cls, config: Mapping[str, Any], legacy: bool) -> _Reader:
        return cls(
            config,
            Membership(config.get("exclude_modules")),
            Membership(config.get("target_modules"), none=True),
            names(config.get("modules_to_save")),
            Patterns(config["rank_pattern"], legacy),
            Patterns(config["alpha_pattern"], legacy),
        )

    def resolve(self, module: str) -> tuple[int, float] | None:
        """(r, lora_alpha) PEFT gives `module`, or None when it wraps nothing there (exclude_modules,
        modules_to_save, target_modules, then the first matching pattern keys)."""
        if module in self.excluded or saved_hits(self.saved, module):
            return None
        trusted = bool(self.config.get("layers_to_transform"))  # not mirrored; resized configs keep theirs
        if not trusted and module not in self.targets:
            return None
        r = pattern_value(self.config["rank_pattern"], self.rank_keys, module, self.config["r"])
        alpha = pattern_value(self.config["alpha_pattern"], self.alpha_keys, module, self.config["lora_alpha"])
        return int(r), float(alpha)


def _verify(
    config: Mapping[str, Any],
    draft: _Draft,
    expected: Mapping[str, tuple[int, float] | None],
    legacy: bool = False,
) -> list[str]:
    """Every way PEFT would read `config` differently from `expected` (module -> (r, alpha), None = no adapter) on
    those modules, and every key that matches other modules than intended; empty when exact."""
    problems = []
    reader = _Reader.of(config, legacy)
    for keys in (reader.rank_keys, reader.alpha_keys):
        for key, hits in keys.hits(expected).items():
            if hits != draft.patterned.get(key):
                problems.append(f"pattern key {key!r} matches {sorted(hits)[:5]}")
    index = list_index(expected)
    for entry, modules in draft.listed.items():
        if (matched := index.get(entry, set())) != modules:
            problems.append(f"list entry {entry!r} matches {sorted(matched)[:5]}")
    for module, want in expected.items():
        if (got := reader.resolve(module)) != want:
            problems.append(f"{module}: PEFT would use (r, alpha) = {got}, the config is meant to give {want}")
    return problems


def _notes(config: Mapping[str, Any], draft: _Draft, expected: Mapping[str, tuple[int, float] | None]) -> list[str]:
    legacy_ok = not _verify(config, draft, expected, legacy=True)
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
        alphas: module -> lora_alpha for the ranked modules; None gives every module the scale 2 (α = 2r, or
            α = 2√r with rsLoRA).
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
    modules = _Modules.of(kind_of)
    expected = {m: (active[m], float(alpha_of[m])) if m in active else None for m in kind_of}
    problems: list[str] = []
    for mode in MODES:
        draft = _draft(modules, active, alpha_of, mode, lists=True)
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
        if not (problems := _verify(config, draft, expected)):
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
        return "|".join([f"(?:{old})", _alternatives(modules)])
    return "|".join([*(rf"(?s:.*\.)?{re.escape(e)}" for e in names(old)), _alternatives(modules)])


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
    modules = _Modules.of({name: kind for name, (kind, _) in module_kinds(list(rank_of)).items()})
    expected = {m: (active[m], float(alpha_of[m])) if m in active else None for m in rank_of}
    problems: list[str] = []
    for mode in MODES:
        draft = _draft(modules, active, alpha_of, mode, lists=False)
        config = copy.deepcopy(dict(raw))
        config.update(draft.fields)
        if draft.excluded:
            config["exclude_modules"] = _excluding(raw.get("exclude_modules"), draft.excluded, mode == "exact")
            if not isinstance(config["exclude_modules"], list):
                draft.listed = {}
        if not (problems := _verify(config, draft, expected)):
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
