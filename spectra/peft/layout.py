"""The one mirror of PEFT's rules: adapter key layout and orientation, and how config keys match module names.

PEFT silently ignores a config key that matches nothing, so spectra verifies every key it writes against these
rules, and the tests check them against PEFT itself. Module names are checkpoint keys without ".weight".

Matching many modules against many keys (a Mixture-of-Experts model has thousands of each) stays near-linear:
`Patterns` finds a module's rank_pattern keys through an index (a regular expression only for keys that need one),
`list_index` answers target_modules/exclude_modules entries by set lookup. The tests check both against PEFT.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

V = TypeVar("V")

# <prefix><module>.<part>[.<adapter name>][.weight|.bias]; the adapter name is never "weight" or "bias"
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\."
    r"(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
PREFIX = "base_model.model."
# LoraConfig fields that switch on a LoRA variant whose ΔW is not scale·B@A (or whose modules are not the base's)
VARIANTS = {
    "use_dora": "DoRA",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "aLoRA (activated LoRA)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "layer_replication": "layer_replication",
}
# the parts of one module's LoRA as PEFT saves them (get_peft_model_state_dict): linear layers, embeddings
PARTS = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "bias": "lora_B.bias"}
EMBEDDING_PARTS = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}


def adapter_key(module: str, part: str, embedding: bool = False) -> str:
    """Key of one LoRA tensor in adapter_model.safetensors, as PEFT saves it.

    "model.layers.0.self_attn.q_proj", "lora_A" -> "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
    part "bias" -> "...lora_B.bias" (lora_bias=True); embeddings: "...embed_tokens.lora_embedding_A" (no ".weight").

    Raises:
        ValueError: an unknown part, or a bias on an embedding (PEFT has no lora_bias for embeddings).
    """
    parts = EMBEDDING_PARTS if embedding else PARTS
    if part not in parts:
        raise ValueError(f"no LoRA part {part!r} for {'an embedding' if embedding else 'a linear layer'}")
    return f"{PREFIX}{module}.{parts[part]}"


def factor_shapes(shape: tuple[int, int], r: int, transpose: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(A, B) shapes as stored for a rank-r ΔW of `shape` (the module's weight as the checkpoint stores it).

    PEFT's ΔW is scale·B@A, or (scale·B@A)ᵀ with `transpose`: embeddings (lora_embedding_A is (r, num_embeddings),
    lora_embedding_B (embedding_dim, r)) and fan_in_fan_out layers (GPT-2's Conv1D stores the weight (in, out))."""
    m, n = shape
    return ((r, m), (n, r)) if transpose else ((r, n), (m, r))


def delta_shape(a_shape: tuple[int, ...], b_shape: tuple[int, ...], transpose: bool) -> tuple[int, int]:
    """Shape of ΔW (as the module's weight is stored) from the stored A and B shapes; inverse of `factor_shapes`."""
    return (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])


def pattern_regex(key: str, legacy: bool = False) -> str:
    """The expression PEFT matches a rank_pattern/alpha_pattern key with (get_pattern_key; `legacy`: 0.13-0.14)."""
    return rf".*\.{key}$" if legacy else rf"(.*\.)?({key})$"


def pattern_key(patterns: Iterable[str], module: str) -> str:
    """peft.utils.other.get_pattern_key: the first pattern p (a regex) with `(.*\\.)?(p)$` matching, else `module`."""
    for key in patterns:
        if re.match(pattern_regex(key), module):
            return key
    return module


def pattern_value(pattern: Mapping[str, V], keys: Patterns, module: str, default: V) -> V:
    """What PEFT reads for `module` from a rank_pattern/alpha_pattern: pattern.get(get_pattern_key(...), default)."""
    key = keys.first(module)
    return pattern.get(module if key is None else key, default)


def literal_pattern(name: str) -> str:
    """A rank_pattern key for a literal name: dots left as they are (PEFT's own examples), other specials escaped."""
    return re.escape(name).replace(r"\.", ".")


_SPECIAL = frozenset("^$*+?{}[]|()")
_LITERAL_ESCAPES = frozenset(string.punctuation)
_PLAIN = re.compile(r"[^\\^$*+?{}\[\]|()]*")


def _fixed(key: str) -> tuple[bool, int, tuple[tuple[int, int], ...], str] | None:
    """(anchored, length, literal spans, their text) of a key that matches one fixed string shape: an optional
    leading `^`, then literal characters and `.` (any character but a newline); None for any other expression
    (classes, groups, quantifiers, flags...)."""
    anchored = key.startswith("^")
    key = key[anchored:]
    if _PLAIN.fullmatch(key):  # the common case, e.g. "layers.0.self_attn.q_proj"
        spans, at = [], 0
        for part in key.split("."):
            if part:
                spans.append((at, at + len(part)))
            at += len(part) + 1
        return anchored, len(key), tuple(spans), key.replace(".", "")
    chars: list[str | None] = []
    i = 0
    while i < len(key):
        c = key[i]
        if c == "\\":
            if i + 1 == len(key) or key[i + 1] not in _LITERAL_ESCAPES:
                return None  # \d, \w, \1, \A, a trailing backslash: not a literal
            chars.append(key[i + 1])
            i += 2
            continue
        if c in _SPECIAL:
            return None
        chars.append(None if c == "." else c)
        i += 1
    spans = []
    for j, char in enumerate(chars):
        if char is not None:
            if spans and spans[-1][1] == j:
                spans[-1] = (spans[-1][0], j + 1)
            else:
                spans.append((j, j + 1))
    return anchored, len(chars), tuple(spans), "".join(c for c in chars if c is not None)


def _split(regex: str) -> list[str]:
    """`regex` cut at every unescaped "|" (callers then check the parts hold no groups or classes)."""
    if "\\" not in regex:
        return regex.split("|")
    parts, current, i = [], "", 0
    while i < len(regex):
        step = 2 if regex[i] == "\\" else 1
        if regex[i] == "|":
            parts.append(current)
            current = ""
        else:
            current += regex[i : i + step]
        i += step
    return [*parts, current]


def _shapes(key: str) -> list[tuple[bool, int, tuple[tuple[int, int], ...], str]] | None:
    """The fixed shapes a key matches: one, or one per alternative of a "(?:a|b|...)" group of fixed keys (what
    spectra writes for many modules sharing a value); None for any other expression."""
    if key.startswith("(?:") and key.endswith(")"):
        shapes = [_fixed(part) for part in _split(key[3:-1])]
        return None if None in shapes else shapes  # type: ignore[return-value]
    fixed = _fixed(key)
    return None if fixed is None else [fixed]


class Patterns:
    """rank_pattern/alpha_pattern keys read once, matched as PEFT's get_pattern_key does (first key in order).

    A key made of literal characters and `.` wildcards, possibly after a `^` (every key spectra writes, most keys
    users write), matches a newline-free module exactly when the module's last len(key) characters fit it and a
    dot or the start precedes them (the start only, after `^`), so such keys, and each alternative of a
    "(?:a|b|...)" group of them, are indexed by (length, literal positions): a module finds its keys in a few
    dictionary lookups, without a regular expression. Other keys, and module names holding a newline (where `.` and
    `$` differ), are matched with PEFT's own expression, compiled once.

    Raises:
        re.error: a key is not a valid expression inside PEFT's `(.*\\.)?(key)$`.
    """

    def __init__(self, keys: Iterable[str], legacy: bool = False) -> None:
        self.keys = list(dict.fromkeys(keys))
        self.legacy = legacy
        self._regex: dict[int, re.Pattern[str]] = {}
        self._groups: dict[tuple[bool, int, tuple[tuple[int, int], ...]], dict[str, list[int]]] = {}
        self._other: list[int] = []
        for order, key in enumerate(self.keys):
            shapes = _shapes(key)
            if shapes is None:
                self._other.append(order)
                self._compiled(order)  # fail now on an invalid key
            for anchored, length, spans, text in shapes or ():
                self._groups.setdefault((anchored, length, spans), {}).setdefault(text, []).append(order)

    def _compiled(self, order: int) -> re.Pattern[str]:
        if order not in self._regex:
            self._regex[order] = re.compile(pattern_regex(self.keys[order], self.legacy))
        return self._regex[order]

    def _orders(self, module: str) -> list[int]:
        """Positions (in config order) of the keys matching `module`."""
        if "\n" in module:
            return [i for i in range(len(self.keys)) if self._compiled(i).match(module)]
        found = [i for i in self._other if self._compiled(i).match(module)]
        size = len(module)
        for (anchored, length, spans), table in self._groups.items():
            start = size - length  # `^` needs the whole name; the legacy `.*\\.^` never matches
            if start < 0 or (start > 0 and (anchored or module[start - 1] != ".")) or (self.legacy and start == 0):
                continue
            found += table.get("".join(module[start + a : start + b] for a, b in spans), ())
        return sorted(set(found))

    def matches(self, module: str) -> list[str]:
        """Every key matching `module`, in the config's order (PEFT uses the first)."""
        return [self.keys[i] for i in self._orders(module)]

    def first(self, module: str) -> str | None:
        """The key PEFT's get_pattern_key picks for `module`, or None when none matches."""
        orders = self._orders(module)
        return self.keys[orders[0]] if orders else None

    def hits(self, modules: Iterable[str]) -> dict[str, set[str]]:
        """key -> the modules it matches (every key present, possibly with an empty set)."""
        found: dict[str, set[str]] = {k: set() for k in self.keys}
        for module in modules:
            for key in self.matches(module):
                found[key].add(module)
        return found


def pattern_hits(key: str, modules: Iterable[str], legacy: bool = False) -> set[str]:
    """Modules a rank_pattern/alpha_pattern key matches, as peft.utils.other.get_pattern_key does (PEFT ≥ 0.15;
    `legacy`: PEFT 0.13-0.14, whose pattern `.*\\.{key}$` needs a dot before the key)."""
    return Patterns([key], legacy).hits(modules)[key]


def suffixes(module: str) -> list[str]:
    """The list entries that name `module` in target_modules/exclude_modules: itself and every dot-suffix."""
    return [module] + [module[i + 1 :] for i, c in enumerate(module) if c == "."]


def list_index(modules: Iterable[str]) -> dict[str, set[str]]:
    """target_modules/exclude_modules entry -> the modules it matches (entries matching none are absent)."""
    index: dict[str, set[str]] = {}
    for module in modules:
        for entry in suffixes(module):
            index.setdefault(entry, set()).add(module)
    return index


def list_hits(entry: str, modules: Iterable[str]) -> set[str]:
    """Modules a target_modules/exclude_modules list entry matches, as peft's check_target_module_exists does."""
    return {m for m in modules if m == entry or m.endswith(f".{entry}")}


def _literals(regex: str) -> frozenset[str] | None:
    """The names an alternation of escaped literals ("a\\.b|c") fullmatches, or None for any other expression."""
    found = set()
    for part in _split(regex):
        fixed = _fixed(part)
        if fixed is None or fixed[0] or len(fixed[3]) != fixed[1]:  # `^`, or a `.` wildcard
            return None
        found.add(fixed[3])
    return frozenset(found)


class Membership:
    """Whether PEFT's check_target_module_exists puts a module in a target_modules or exclude_modules value.

    None matches nothing, a string is a regular expression that must match the whole name, a list matches a name
    equal to an entry or ending in "." + entry. `trust` is what the mirror cannot tell: "all-linear" (PEFT expands it
    from the model's layer types) answers True; None answers `none`.
    """

    def __init__(self, value: Any, none: bool = False) -> None:
        self.value = value
        self._none = none
        self._regex = re.compile(value) if isinstance(value, str) and value != "all-linear" else None
        self._names = _literals(value) if self._regex is not None else None  # spectra's own: a set lookup
        self._entries = frozenset(str(v) for v in value) if isinstance(value, (list, tuple, set)) else frozenset()

    def __contains__(self, module: object) -> bool:
        if not isinstance(module, str):
            return False
        if self.value is None:
            return self._none
        if self._names is not None:
            return module in self._names
        if self._regex is not None:
            return self._regex.fullmatch(module) is not None
        if isinstance(self.value, str):
            return True  # "all-linear"
        return any(s in self._entries for s in suffixes(module))


@dataclass(frozen=True, slots=True)
class ConfigReader:
    """How PEFT reads one config for a module (check_target_module_exists, then get_pattern_key for r and
    lora_alpha), prepared once for many modules. Layer filters (layers_to_transform) are not mirrored: a config
    with one is trusted to target the modules asked about."""

    config: Mapping[str, Any]
    excluded: Membership
    targets: Membership
    saved: tuple[str, ...]
    rank_keys: Patterns
    alpha_keys: Patterns

    @classmethod
    def of(cls, config: Mapping[str, Any], legacy: bool = False) -> ConfigReader:
        return cls(
            config,
            Membership(config.get("exclude_modules")),
            Membership(config.get("target_modules"), none=True),
            names(config.get("modules_to_save")),
            Patterns(config.get("rank_pattern") or {}, legacy),
            Patterns(config.get("alpha_pattern") or {}, legacy),
        )

    def resolve(self, module: str) -> tuple[int, float] | None:
        """(r, lora_alpha) PEFT gives `module`, or None when it wraps nothing there (exclude_modules,
        modules_to_save, target_modules, then the first matching pattern keys)."""
        if module in self.excluded or saved_hits(self.saved, module):
            return None
        if not self.config.get("layers_to_transform") and module not in self.targets:
            return None
        r = pattern_value(self.config.get("rank_pattern") or {}, self.rank_keys, module, self.config.get("r", 8))
        alpha = pattern_value(
            self.config.get("alpha_pattern") or {}, self.alpha_keys, module, self.config.get("lora_alpha", 8)
        )
        return int(r), float(alpha)


def saved_hits(entries: Iterable[str], module: str) -> bool:
    """True when a modules_to_save entry (a regex) covers `module`: PEFT then never puts a LoRA on it."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in entries)


def targets_parameter(module: str, target: str) -> bool:
    """peft's target_parameters match: `<module>.<param>` equals `target` or ends with `.target`."""
    key = f"{module.replace('.base_layer', '')}.{target.rpartition('.')[2]}"
    return key == target or key.endswith("." + target)


def names(value: Any) -> tuple[str, ...]:
    """A config field that is None, one name, or a list of names."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return () if value is None else (str(value),)
