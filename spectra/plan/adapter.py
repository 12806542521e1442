"""PEFT LoRA adapters: map lora_A/lora_B factors to base-model weights and hand out ΔW = scale·B@A, factored.

An adapter is read as PEFT writes it: `adapter_config.json` plus `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (also `.lora_A.<adapter>.weight`) and, for
embeddings, `.lora_embedding_A` / `.lora_embedding_B`. The scale is PEFT's: lora_alpha/r, or lora_alpha/√r with
`use_rslora`, with r and alpha looked up per module in `rank_pattern` / `alpha_pattern` exactly as peft's
`get_pattern_key` does. ΔW is never formed: its spectrum comes from the factors (spectrum.py). Every tensor that is
not a LoRA factor pair of a plain LoRA (DoRA magnitudes, LoRA variants, modules_to_save copies, trainable tokens)
is reported as skipped with the reason, never read as something else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from spectra.io.checkpoint import Checkpoint
from spectra.peft.read import LoraModule, lora_modules, read_lora_settings
from spectra.plan.dense import filter_reason, match_names, non_finite_error
from spectra.records import Delta, Options, Skipped

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AdapterPair:
    """One adapted module: its factor keys, the base weight it updates, and how ΔW is built from the factors."""

    name: str  # the base model's key, e.g. "model.layers.0.self_attn.q_proj.weight"
    base_name: str | None  # key in the base checkpoint (None without a base)
    shape: tuple[int, int]  # shape of ΔW, the base weight's
    a: str  # adapter key of A, shape (r, in) — (r, num_embeddings) for embeddings
    b: str  # adapter key of B, shape (out, r) — (embedding_dim, r) for embeddings
    scale: float
    transpose: bool  # ΔW = (scale·B@A)ᵀ: embeddings, fan_in_fan_out (GPT-2 Conv1D)


def pair_adapter(
    adapter: Checkpoint, base: Checkpoint | None, options: Options
) -> tuple[list[AdapterPair], list[Skipped]]:
    """Group the adapter's tensors per module; return the analysable LoRA modules and everything skipped.

    Names are the base model's keys (`<module>.weight`), matched to `base` by identical name or one prefix
    normalisation. Base weights the adapter does not touch are not listed (their ΔW is zero by construction).

    Args:
        adapter: an open "peft-adapter" checkpoint.
        base: the base checkpoint for shape checks and ‖W‖, or None.
        options: include/exclude are applied to the base-model names.

    Raises:
        CheckpointError: bad adapter_config.json, a non-LoRA adapter, or several adapters in one file.
    """
    settings = read_lora_settings(adapter.location, adapter.path)
    modules, skipped = lora_modules(adapter.entries, settings, adapter.path)
    names = {module: f"{module}.weight" for module in modules}
    base_of = match_names(set(base.entries), set(names.values())) if base is not None else {}
    pairs: list[AdapterPair] = []
    for module, found_module in modules.items():
        name = names[module]
        why = filter_reason(name, options) or (found_module if isinstance(found_module, Skipped) else None)
        found = why or _pair(base, name, base_of.get(name), found_module)  # type: ignore[arg-type]
        if isinstance(found, AdapterPair):
            pairs.append(found)
        else:
            skipped.append(found)
    return pairs, skipped


def _pair(base: Checkpoint | None, name: str, base_name: str | None, module: LoraModule) -> AdapterPair | Skipped:
    """Check one module's ΔW shape against the base weight (when given) and orient ΔW as the base stores it."""
    shape, transpose = module.shape, module.transpose
    if base is not None:
        if base_name is None:
            return Skipped(name, "only-in-tuned", f"adapted module {module.module!r} is not in the base checkpoint")
        base_shape = base.entries[base_name].shape
        if base_shape != shape and base_shape == shape[::-1]:  # PEFT sets fan_in_fan_out per layer type (Conv1D)
            shape, transpose = (shape[1], shape[0]), not transpose
        elif base_shape != shape:
            return Skipped(name, "shape-mismatch", f"base {base_shape} vs adapter ΔW {shape}")
        name = base_name  # the base model's key, verbatim
    return AdapterPair(name, base_name, shape, module.a.name, module.b.name, module.scale, transpose)


def make_factored_delta(adapter: Checkpoint, base: Checkpoint | None, pair: AdapterPair) -> Delta | Skipped:
    """Read one module's factors (and ‖W_base‖_F if a base is given); return ΔW = B'A' factored, or Skipped if 0.

    The factors are float64 with the scale folded into the first: ΔW = (scale·B) @ A, or Aᵀ @ (scale·B)ᵀ.
    """
    a, b = adapter.read(pair.a).double(), adapter.read(pair.b).double()
    for key, factor in ((pair.a, a), (pair.b, b)):
        bad = int(torch.count_nonzero(~torch.isfinite(factor)))
        if bad:
            raise non_finite_error(adapter.entries[key], key, "adapter", bad)
    if not (torch.any(a) and torch.any(b)):
        return Skipped(pair.name, "unchanged", "ΔW = 0 (lora_B is zero at PEFT's initialisation: untrained?)")
    b.mul_(pair.scale)
    factors = (a.mT, b.mT) if pair.transpose else (b, a)
    base_norm = None
    if base is not None and pair.base_name is not None:
        base_norm = float(torch.linalg.vector_norm(base.read(pair.base_name), dtype=torch.float64))
    dtype = adapter.entries[pair.b].dtype_name
    # Noise energy 0: rounding the stored factors perturbs B and A, so ΔW stays exactly rank ≤ r; there is no
    # full-rank storage floor for the spectrum to sink into, unlike a difference of two rounded dense weights.
    return Delta(pair.name, pair.shape, None, factors, base_norm, dtype, 0.0)


def adapter_notes(base: Checkpoint | None) -> tuple[str, ...]:
    """Lines for Analysis.notes: what an adapter analysis reports differently, and what it cannot report."""
    notes = [
        "ΔW comes from the adapter's LoRA factors (scale·B@A): each rank is at most the adapter's r, and "
        "there is no storage-rounding floor (noise fraction 0)"
    ]
    if base is None:
        notes.append(
            "no BASE given: relative change ‖ΔW‖/‖W‖ is not reported and the adapter's shapes were not "
            "checked against the base model; pass BASE for both"
        )
    return tuple(notes)
