"""The adapter planner: match a PEFT LoRA adapter's modules to the base model's weights, as factored jobs.

An adapter is read as PEFT writes it (spectra.peft.read groups its tensors per module, with PEFT's scale and
orientation); here each LoRA module becomes a job whose operand names its A and B factors (ΔW = scale·B@A, never
formed: the engine's factored routes work on the factors) and the base weight it updates. A DoRA adapter
(use_dora) becomes dense jobs instead: its ΔW = m ⊙ (W + s·B@A)/‖W + s·B@A‖ − W needs the base weight and is not
low-rank. Every tensor that is not a LoRA factor pair of a plain LoRA or DoRA module (LoRA variants,
modules_to_save copies, trainable tokens) is reported as skipped with the reason, never read as something else.
"""

from __future__ import annotations

import logging

from spectra.errors import CheckpointError
from spectra.io.checkpoint import Checkpoint
from spectra.peft.read import LoraModule, lora_modules, read_lora_settings
from spectra.plan.dense import filter_reason, match_names
from spectra.plan.jobs import Dora, Factored, Job, Plan
from spectra.plan.quant import base_quant
from spectra.records import Options, Skipped

log = logging.getLogger(__name__)


def plan_adapter(adapter: Checkpoint, base: Checkpoint | None, options: Options, *, source: int = 0) -> Plan:
    """A factored job per LoRA module of the adapter, everything skipped with reasons, and the adapter notes.

    Names are the base model's keys (`<module>.weight`), matched to `base` by identical name or one prefix
    normalisation. Base weights the adapter does not touch are not listed (their ΔW is zero by construction).

    Args:
        adapter: an open "peft-adapter" checkpoint.
        base: the base checkpoint for shape checks and ‖W‖, or None.
        options: include/exclude are applied to the base-model names.
        source: the adapter's index among the tuned inputs, stored in every job.

    Raises:
        CheckpointError: bad adapter_config.json, a non-LoRA adapter, several adapters in one file, or a DoRA
            adapter without `base`.
        OptionsError: options.base_quantization for a DoRA adapter without bitsandbytes installed.
    """
    settings = read_lora_settings(adapter.location, adapter.path)
    if settings.dora and base is None:
        raise CheckpointError(
            f"{adapter.path}: a DoRA adapter (use_dora): its ΔW = m ⊙ (W + s·B@A)/‖W + s·B@A‖ − W depends on the "
            "base weights W; pass the base model as BASE (spectra rank BASE ADAPTER)"
        )
    modules, skipped = lora_modules(adapter.entries, settings, adapter.path)
    names = {module: f"{module}.weight" for module in modules}
    base_of = match_names(set(base.entries), set(names.values())) if base is not None else {}
    jobs: list[Job] = []
    for module, found_module in modules.items():
        name = names[module]
        why = filter_reason(name, options) or (found_module if isinstance(found_module, Skipped) else None)
        found = why or _job(base, name, base_of.get(name), found_module, options, source)  # type: ignore[arg-type]
        if isinstance(found, Job):
            jobs.append(found)
        else:
            skipped.append(found)
    return Plan(tuple(jobs), tuple(skipped), adapter_notes(base, settings.dora, options))


def _job(
    base: Checkpoint | None, name: str, base_name: str | None, module: LoraModule, options: Options, source: int
) -> Job | Skipped:
    """Check one module's ΔW shape against the base weight (when given) and orient ΔW as the base stores it."""
    shape, transpose = module.shape, module.transpose
    base_entry = None
    if base is not None:
        if base_name is None:
            return Skipped(name, "only-in-tuned", f"adapted module {module.module!r} is not in the base checkpoint")
        base_entry = base.entries[base_name]
        if base_entry.shape != shape and base_entry.shape == shape[::-1]:  # PEFT sets fan_in_fan_out per layer type
            shape, transpose = (shape[1], shape[0]), not transpose
        elif base_entry.shape != shape:
            return Skipped(name, "shape-mismatch", f"base {base_entry.shape} vs adapter ΔW {shape}")
        name = base_name  # the base model's key, verbatim
    if module.magnitude is not None and base_entry is not None:
        quantized = base_quant(name, options)
        operand = Dora(module.a, module.b, module.magnitude, module.scale, transpose, base_entry, quantized)
        return Job(name, shape, operand, None, source)
    return Job(name, shape, Factored(module.a, module.b, module.scale, transpose, base_entry), None, source)


def adapter_notes(base: Checkpoint | None, dora: bool = False, options: Options | None = None) -> tuple[str, ...]:
    """Lines for Analysis.notes: what an adapter analysis reports differently, and what it cannot report."""
    if dora:
        quantized = options is not None and options.base_quantization is not None
        return (
            "DoRA adapter: ΔW = m ⊙ (W + s·B@A)/‖W + s·B@A‖ − W (PEFT's merge; the norm of each output feature's "
            "weights) is formed densely per matrix from the base weights"
            + (", quantised as --base-quantization says," if quantized else "")
            + " and analysed like a full fine-tune's ΔW: it is not low-rank, so ranks can exceed the adapter's r; "
            "no storage-rounding floor (noise fraction 0: the stored W, B, A and m are what PEFT merges)",
        )
    notes = [
        "ΔW comes from the adapter's LoRA factors (scale·B@A): each rank is at most the adapter's r, and "
        "there is no storage-rounding floor (noise fraction 0)"
    ]
    if options is not None and options.base_quantization is not None:
        notes.append("--base-quantization has no effect on a LoRA adapter: its ΔW = scale·B@A whatever the base")
    if base is None:
        notes.append(
            "no BASE given: relative change ‖ΔW‖/‖W‖ is not reported and the adapter's shapes were not "
            "checked against the base model; pass BASE for both"
        )
    return tuple(notes)
