"""Read a PEFT LoRA adapter's adapter_config.json into LoraSettings (the fields PEFT uses to build ΔW)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectra.errors import CheckpointError
from spectra.io.header import TensorEntry
from spectra.names import ADAPTER_CONFIG
from spectra.peft.layout import LORA_KEY, PREFIX, VARIANTS, names, pattern_key, targets_parameter
from spectra.records import Skipped


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
        r=r,
        lora_alpha=alpha,
        use_rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        variant=" + ".join(variants) or None,
        modules_to_save=names(config.get("modules_to_save")),
        target_parameters=names(config.get("target_parameters")),
    )


@dataclass(frozen=True, slots=True)
class LoraModule:
    """One module's LoRA factors as PEFT stores them, and ΔW = scale·B@A oriented as the module's weight."""

    module: str  # PEFT module name, e.g. "model.layers.0.self_attn.q_proj"
    a: TensorEntry  # lora_A: (r, in); lora_embedding_A: (r, num_embeddings)
    b: TensorEntry  # lora_B: (out, r); lora_embedding_B: (embedding_dim, r)
    r: int
    scale: float  # lora_alpha/r, or lora_alpha/√r with rsLoRA
    shape: tuple[int, int]  # shape of ΔW as PEFT's layer stores the weight
    transpose: bool  # ΔW = (scale·B@A)ᵀ: embeddings, fan_in_fan_out (GPT-2 Conv1D)


def lora_modules(
    entries: Mapping[str, TensorEntry], settings: LoraSettings, label: str
) -> tuple[dict[str, LoraModule | Skipped], list[Skipped]]:
    """Group an adapter's tensors per module: module -> its LoraModule (or why it cannot be read as one), and the
    tensors that are not LoRA factors at all (DoRA magnitudes aside, modules_to_save copies, biases, tokens).

    Args:
        entries: the adapter file's tensors (its header).
        settings: the adapter's config.
        label: names the adapter in errors.

    Raises:
        CheckpointError: the file holds several adapters.
    """
    groups, skipped = _group(entries, settings, label)
    modules: dict[str, LoraModule | Skipped] = {}
    for module, parts in groups.items():
        name = f"{module}.weight"
        modules[module] = _unsupported(name, module, parts, settings) or _factors(
            entries, name, module, parts, settings
        )
    return modules, skipped


def _group(
    entries: Mapping[str, TensorEntry], settings: LoraSettings, label: str
) -> tuple[dict[str, dict[str, str]], list[Skipped]]:
    """module -> {part: key} for LoRA tensors; every other tensor is skipped with the reason."""
    modules: dict[str, dict[str, str]] = {}
    skipped: list[Skipped] = []
    adapter_names: set[str] = set()
    for key in entries:
        match = LORA_KEY.match(key)
        if match is None:
            skipped.append(Skipped(key, "unsupported", _not_lora(key, settings)))
        elif match["param"] == "bias":
            skipped.append(Skipped(key, "not-2d", "LoRA bias (lora_bias=True); the weight's ΔW is analysed"))
        else:
            adapter_names.add(match["adapter"] or "")
            modules.setdefault(match["module"], {})[match["part"]] = key
    if len(adapter_names) > 1:
        listed = ", ".join(sorted(n or "(none)" for n in adapter_names))
        raise CheckpointError(f"{label}: holds several adapters ({listed}); save one adapter per folder")
    return modules, skipped


def _not_lora(key: str, settings: LoraSettings) -> str:
    module = key.removeprefix(PREFIX).rsplit(".", 1)[0]
    if ".base_layer." in key:
        return "a copy of the base layer's weight saved with the adapter (save_embedding_layers), not a LoRA update"
    if "trainable_tokens" in key:
        return "trainable token deltas (trainable_token_indices), not LoRA factors"
    if any(
        re.fullmatch(rf"(.*\.)?{re.escape(m)}(\.modules_to_save(\..+)?)?", module) for m in settings.modules_to_save
    ):
        return "a modules_to_save copy: a fully trained weight, not LoRA factors; analyse the merged model for its ΔW"
    return "not a LoRA factor (lora_A / lora_B / lora_embedding_A / lora_embedding_B)"


def _unsupported(name: str, module: str, parts: dict[str, str], settings: LoraSettings) -> Skipped | None:
    if settings.variant is not None:
        return Skipped(name, "unsupported", f"{settings.variant} adapter: ΔW is not scale·B@A")
    if "lora_magnitude_vector" in parts:
        return Skipped(name, "unsupported", "DoRA (lora_magnitude_vector): ΔW is not scale·B@A")
    if any(targets_parameter(module, t) for t in settings.target_parameters):
        return Skipped(name, "unsupported", "LoRA on a parameter (target_parameters, e.g. MoE experts)")
    linear, embedding = {"lora_A", "lora_B"} & parts.keys(), {"lora_embedding_A", "lora_embedding_B"} & parts.keys()
    if len(linear) + len(embedding) != 2 or (linear and embedding):
        return Skipped(name, "unsupported", f"incomplete LoRA factors ({', '.join(sorted(parts))})")
    return None


def _factors(
    entries: Mapping[str, TensorEntry], name: str, module: str, parts: dict[str, str], settings: LoraSettings
) -> LoraModule | Skipped:
    """Check ranks and shapes of one module's factors and orient ΔW."""
    embedding = "lora_embedding_A" in parts
    a = entries[parts["lora_embedding_A" if embedding else "lora_A"]]
    b = entries[parts["lora_embedding_B" if embedding else "lora_B"]]
    if len(a.shape) != 2 or len(b.shape) != 2:
        return Skipped(name, "not-2d", f"LoRA factors A {a.shape}, B {b.shape} (convolution?)")
    if not (a.is_float and b.is_float):
        return Skipped(name, "not-float", f"LoRA factors stored as {a.dtype_name}/{b.dtype_name}")
    r, _ = settings.rank_and_alpha(module)
    if not a.shape[0] == b.shape[1] == r:
        return Skipped(name, "shape-mismatch", f"A {a.shape}, B {b.shape}, adapter_config r={r} for this module")
    transpose = embedding or settings.fan_in_fan_out
    shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
    return LoraModule(module, a, b, r, settings.scale(module), shape, transpose)
