"""Read a PEFT LoRA adapter: adapter_config.json into LoraSettings (validated; no `assert`, so `python -O` keeps
every check), and the adapter's tensors grouped per module into LoraModule."""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spectra.errors import CheckpointError
from spectra.io.header import TensorEntry
from spectra.names import ADAPTER_CONFIG, printable
from spectra.peft.layout import (
    LORA_KEY,
    PREFIX,
    VARIANTS,
    Patterns,
    delta_shape,
    names,
    pattern_regex,
    pattern_value,
    targets_parameter,
)
from spectra.records import Skipped

MAX_CONFIG_BYTES = 16 * 2**20  # adapter configs are a few kB; refuse anything absurd before reading it
MAX_REGEX_CHARS = 10_000  # a pattern key or target_modules expression; module names are a few hundred characters


@dataclass(frozen=True, slots=True)
class LoraSettings:
    """What spectra needs from adapter_config.json (the fields PEFT's LoraConfig uses to build ΔW), and the raw
    config itself (resizing keeps the user's other fields)."""

    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    variant: str | None  # an unsupported LoRA variant switched on for every module, e.g. "QA-LoRA"
    modules_to_save: tuple[str, ...]
    target_parameters: tuple[str, ...]
    dora: bool = False  # use_dora: every module's ΔW is DoRA's, from its lora_magnitude_vector and the base weight
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # adapter_config.json as read
    _rank_keys: Patterns = field(init=False, repr=False, compare=False)
    _alpha_keys: Patterns = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rank_keys", Patterns(self.rank_pattern))
        object.__setattr__(self, "_alpha_keys", Patterns(self.alpha_pattern))

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """(r, lora_alpha) of `module` ("model.layers.0.self_attn.q_proj"), patterns applied as peft does."""
        r = pattern_value(self.rank_pattern, self._rank_keys, module, self.r)
        alpha = pattern_value(self.alpha_pattern, self._alpha_keys, module, self.lora_alpha)
        return int(r), float(alpha)

    def scale(self, module: str) -> float:
        """PEFT's scaling of B@A for `module`: lora_alpha/r, or lora_alpha/√r with rsLoRA."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def read_lora_settings(folder: Path, label: str | None = None) -> LoraSettings:
    """Parse and validate the adapter's adapter_config.json.

    Raises:
        CheckpointError: the config is missing, not a regular file, not a JSON object, malformed (r, lora_alpha,
            rank_pattern, alpha_pattern, pattern keys PEFT could not compile), or the adapter is not a LoRA.
    """
    file = folder / ADAPTER_CONFIG
    config = _load(file)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        kind = printable(str(peft_type).upper()) if peft_type else "unknown (no peft_type)"
        raise CheckpointError(
            f"{label or folder}: PEFT adapter type {kind} is not supported; spectra reads LoRA adapters"
        )
    return _settings(config, file)


def _load(file: Path) -> dict[str, Any]:
    """The config file's JSON object; refuses FIFOs and devices (never opened), huge files and deep nesting."""
    unreadable = f"{file}: not a readable PEFT adapter config (a JSON object)"
    try:
        if not file.is_file():
            raise CheckpointError(f"{unreadable}: missing, or not a regular file")
        if file.stat().st_size > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{unreadable}: larger than {MAX_CONFIG_BYTES // 2**20} MiB")
        config = json.loads(file.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{unreadable}: {exc.strerror or exc}") from None
    except RecursionError:
        raise CheckpointError(f"{unreadable}: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert
        raise CheckpointError(f"{unreadable}: {printable(str(exc))}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{unreadable}: the JSON is a {type(config).__name__}, not an object")
    return config


def _number(value: Any, integer: bool) -> bool:
    """True for a finite, positive JSON number (an int, not a bool, when `integer`)."""
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return False
    return value > 0 and (integer or math.isfinite(value))


def _settings(config: dict[str, Any], file: Path) -> LoraSettings:
    """LoraSettings from a parsed config, every field PEFT reads for ΔW checked; one CheckpointError otherwise."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{file}: malformed LoRA config: {printable(what)}")

    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    if not _number(r, integer=True):
        raise bad(f"r must be a positive integer, got {r!r:.60}")
    if not _number(alpha, integer=False):
        raise bad(f"lora_alpha must be a positive finite number, got {alpha!r:.60}")
    patterns: dict[str, dict[str, Any]] = {}
    for name, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = config.get(name) or {}
        if not isinstance(pattern, dict):
            raise bad(f"{name} must be an object (pattern -> value), got a {type(pattern).__name__}")
        for key, value in pattern.items():
            if not _number(value, integer):
                raise bad(f"{name}[{key!r:.60}] must be a positive {'integer' if integer else 'finite number'}")
            _compile(f"{name} key {key!r:.60}", pattern_regex(key), bad)
        patterns[name] = pattern
    for name in ("target_modules", "exclude_modules"):
        if isinstance(config.get(name), str) and config[name] != "all-linear":
            _compile(f"{name} {config[name]!r:.60}", config[name], bad)
    # init_lora_weights: init only; DoRA is read (LoraModule.magnitude), every other variant refused
    variants = [name for key, name in VARIANTS.items() if config.get(key) and key != "use_dora"]
    return LoraSettings(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(config.get("use_rslora")),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")),
        rank_pattern=dict(patterns["rank_pattern"]),
        alpha_pattern={k: float(v) for k, v in patterns["alpha_pattern"].items()},
        variant=" + ".join(variants) or None,
        modules_to_save=names(config.get("modules_to_save")),
        target_parameters=names(config.get("target_parameters")),
        dora=bool(config.get("use_dora")),
        raw=config,
    )


def _compile(what: str, regex: str, bad: Callable[[str], CheckpointError]) -> None:
    """Compile an expression as PEFT will; a global inline flag mid-expression fails on every Python version."""
    if len(regex) > MAX_REGEX_CHARS:
        raise bad(f"{what} is longer than {MAX_REGEX_CHARS} characters")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # Python 3.10 warns where 3.11 raises
            warnings.simplefilter("ignore", FutureWarning)  # "possible nested set": PEFT compiles it alike
            re.compile(regex)
    except (re.error, DeprecationWarning, RecursionError, OverflowError) as exc:
        raise bad(f"{what} is not a valid regular expression for PEFT ({exc})") from None


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
    magnitude: TensorEntry | None = None  # DoRA's lora_magnitude_vector (out_features,); None for a plain LoRA


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
    magnitude = "lora_magnitude_vector" in parts
    if magnitude and not settings.dora:
        why = "DoRA magnitude (lora_magnitude_vector) in an adapter without use_dora: PEFT would not load it as DoRA"
        return Skipped(name, "unsupported", why)
    if settings.dora and not magnitude:
        return Skipped(name, "unsupported", "DoRA adapter (use_dora) without this module's lora_magnitude_vector")
    if any(targets_parameter(module, t) for t in settings.target_parameters):
        return Skipped(name, "unsupported", "LoRA on a parameter (target_parameters, e.g. MoE experts)")
    linear, embedding = {"lora_A", "lora_B"} & parts.keys(), {"lora_embedding_A", "lora_embedding_B"} & parts.keys()
    if len(linear) + len(embedding) != 2 or (linear and embedding):
        return Skipped(name, "unsupported", f"incomplete LoRA factors ({', '.join(sorted(parts))})")
    if settings.dora and embedding:
        return Skipped(name, "unsupported", "DoRA on an embedding: spectra reads DoRA on linear layers only")
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
    shape = delta_shape(a.shape, b.shape, transpose)
    magnitude = entries[parts["lora_magnitude_vector"]] if settings.dora else None
    if magnitude is not None and (magnitude.shape != (b.shape[0],) or not magnitude.is_float):
        detail = f"lora_magnitude_vector {magnitude.shape} {magnitude.dtype_name}, expected ({b.shape[0]},) floats"
        return Skipped(name, "shape-mismatch", detail)
    return LoraModule(module, a, b, r, settings.scale(module), shape, transpose, magnitude)
