"""The one mirror of PEFT's rules: adapter key layout, and how config keys match module names.

PEFT silently ignores a config key that matches nothing, so spectra verifies every key it writes against these
rules, and the tests check them against PEFT itself. Module names are checkpoint keys without ".weight".
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

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


def pattern_key(patterns: Iterable[str], module: str) -> str:
    """peft.utils.other.get_pattern_key: the first pattern p (a regex) with `(.*\\.)?(p)$` matching, else `module`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def literal_pattern(name: str) -> str:
    """A rank_pattern key for a literal name: dots left as they are (PEFT's own examples), other specials escaped."""
    return re.escape(name).replace(r"\.", ".")


def pattern_hits(key: str, modules: Iterable[str], legacy: bool = False) -> set[str]:
    """Modules a rank_pattern/alpha_pattern key matches, as peft.utils.other.get_pattern_key does (PEFT ≥ 0.15;
    `legacy`: PEFT 0.13-0.14, whose pattern `.*\\.{key}$` needs a dot before the key)."""
    pattern = rf".*\.{key}$" if legacy else rf"(.*\.)?({key})$"
    return {m for m in modules if re.match(pattern, m)}


def list_hits(entry: str, modules: Iterable[str]) -> set[str]:
    """Modules a target_modules/exclude_modules list entry matches, as peft's check_target_module_exists does."""
    return {m for m in modules if m == entry or m.endswith(f".{entry}")}


def targets_parameter(module: str, target: str) -> bool:
    """peft's target_parameters match: `<module>.<param>` equals `target` or ends with `.target`."""
    key = f"{module.replace('.base_layer', '')}.{target.rpartition('.')[2]}"
    return key == target or key.endswith("." + target)


def names(value: Any) -> tuple[str, ...]:
    """A config field that is None, one name, or a list of names."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return () if value is None else (str(value),)
