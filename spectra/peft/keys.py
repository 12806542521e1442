"""How per-module ranks and alphas become PEFT config keys (target_modules, exclude_modules, rank_pattern,
alpha_pattern), and the check that PEFT reads the result back exactly, on every module given.

Torch-free. Candidate configs go from compact (one key per module kind) to exact (anchored keys naming one module
each); `verify` compares what PEFT would give every module (through `spectra.peft.layout.ConfigReader`) with what
was meant, and what each key matches with what it was written for.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from spectra.peft.layout import ConfigReader, Patterns, list_index, literal_pattern

V = TypeVar("V", int, float)


@dataclass(slots=True)
class Draft:
    """A candidate config's computed fields, and what each key it wrote is meant to match (for verification)."""

    targets: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)  # r, lora_alpha, rank_pattern, alpha_pattern
    listed: dict[str, set[str]] = field(default_factory=dict)  # target/exclude list entry -> modules
    patterned: dict[str, set[str]] = field(default_factory=dict)  # pattern key -> modules


@dataclass(frozen=True, slots=True)
class Modules:
    """Every module (targeted or not) grouped by kind, and the kinds one short key names exactly."""

    kind_of: dict[str, str]
    of_kind: dict[str, list[str]]  # kind -> its modules, in the given order
    list_exact: frozenset[str]  # kinds whose list entry (target_modules) matches exactly that kind's modules
    key_exact: frozenset[str]  # kinds whose literal rank_pattern key matches exactly that kind's modules

    @classmethod
    def of(cls, kind_of: dict[str, str]) -> Modules:
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


def _pattern(values: Mapping[str, V], modules: Modules, mode: str, draft: Draft) -> tuple[V, dict[str, V]]:
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


def _grouped(pattern: Mapping[str, V], draft: Draft) -> dict[str, V]:
    """`pattern` with its one-module keys merged per value into "(?:a|b|...)" keys of at most MAX_GROUP_CHARS."""
    out: dict[str, V] = {}
    groups: dict[V, list[list[str]]] = {}
    size: dict[V, int] = {}  # characters of the value's last chunk, as written: "(?:" + "a|b" + ")"
    for key, value in pattern.items():
        if len(draft.patterned[key]) > 1:
            out[key] = value  # a kind's key
            continue
        chunks = groups.setdefault(value, [[]])
        if size.get(value, 3) + len(key) + 1 > MAX_GROUP_CHARS:
            chunks.append([])
            size[value] = 3
        chunks[-1].append(key)
        size[value] = size.get(value, 3) + len(key) + 1
    for value, chunks in groups.items():
        for chunk in chunks:
            key = f"(?:{'|'.join(chunk)})"
            out[key] = value
            draft.patterned[key] = set().union(*(draft.patterned[k] for k in chunk))
    return out


def alternatives(names: Sequence[str]) -> str:
    """A target_modules/exclude_modules expression (PEFT fullmatches it) naming exactly these modules."""
    return "|".join(re.escape(m) for m in names)


def draft_config(
    modules: Modules, ranks: Mapping[str, int], alphas: Mapping[str, float], mode: str, lists: bool
) -> Draft:
    """The computed fields realising `ranks` (> 0 only) and `alphas`; with `lists`, also target_modules (a kind's
    entry where it names exactly that kind, else the modules; mode "exact": an expression naming them) and
    exclude_modules (rank-0 modules a kind entry covers); without, `excluded` holds every rank-0 module."""
    draft = Draft()
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
        draft.fields["target_modules"] = alternatives([m for m in modules.kind_of if m in ranks])
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


def verify(
    config: Mapping[str, Any],
    draft: Draft,
    expected: Mapping[str, tuple[int, float] | None],
    legacy: bool = False,
) -> list[str]:
    """Every way PEFT would read `config` differently from `expected` (module -> (r, alpha), None = no adapter) on
    those modules, and every key that matches other modules than intended; empty when exact."""
    problems = []
    reader = ConfigReader.of(config, legacy)
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
