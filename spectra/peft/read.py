"""Read a PEFT LoRA adapter's adapter_config.json into LoraSettings (the fields PEFT uses to build ΔW)."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectra.errors import CheckpointError
from spectra.names import ADAPTER_CONFIG
from spectra.peft.layout import VARIANTS, names, pattern_key


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """What spectra needs from adapter_config.json (the fields PEFT's LoraConfig uses to build ΔW)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    variant: str | None  # an unsupported LoRA variant switched on for every module, e.g. "DoRA"
    modules_to_save: tuple[str, ...]
    target_parameters: tuple[str, ...]

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """(r, lora_alpha) of `module` ("model.layers.0.self_attn.q_proj"), patterns applied as peft does."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.lora_alpha)
        return int(r), float(alpha)

    def scale(self, module: str) -> float:
        """PEFT's scaling of B@A for `module`: lora_alpha/r, or lora_alpha/√r with rsLoRA."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def read_lora_settings(folder: Path, label: str | None = None) -> LoraSettings:
    """Parse the adapter's adapter_config.json.

    Raises:
        CheckpointError: the config is missing or malformed, or the adapter is not a LoRA (IA3, LoKr, ...).
    """
    file = folder / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
        assert isinstance(config, dict)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AssertionError):
        raise CheckpointError(f"{file}: not a readable PEFT adapter config (a JSON object)") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        kind = peft_type or "unknown (no peft_type)"
        raise CheckpointError(
            f"{label or folder}: PEFT adapter type {kind} is not supported; spectra reads LoRA adapters"
        )
    try:
        settings = _settings(config)
    except (AttributeError, TypeError, ValueError, re.error) as exc:
        raise CheckpointError(f"{file}: malformed LoRA config ({exc})") from None
    return settings


def _settings(config: dict[str, Any]) -> LoraSettings:
    rank_pattern = {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()}
    alpha_pattern = {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
    for key in (*rank_pattern, *alpha_pattern):
        re.compile(key)  # peft uses pattern keys as regular expressions
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    if r < 1 or any(v < 1 for v in rank_pattern.values()):
        raise ValueError(f"ranks must be positive, got r={r}, rank_pattern={rank_pattern}")
    variants = [name for field, name in VARIANTS.items() if config.get(field)]  # init_lora_weights: init only
    return LoraSettings(
        r=r, lora_alpha=alpha, use_rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        variant=" + ".join(variants) or None, modules_to_save=names(config.get("modules_to_save")),
        target_parameters=names(config.get("target_parameters")),
    )
