"""The adapter planner: match a PEFT LoRA adapter's modules to the base model's weights, as factored jobs.

An adapter is read as PEFT writes it (spectra.peft.read groups its tensors per module, with PEFT's scale and
orientation); here each LoRA module becomes a job whose operand names its A and B factors (ΔW = scale·B@A, never
formed: the engine's factored routes work on the factors) and the base weight it updates. Every tensor that is not
a LoRA factor pair of a plain LoRA (DoRA magnitudes, LoRA variants, modules_to_save copies, trainable tokens) is
reported as skipped with the reason, never read as something else.
"""

from __future__ import annotations

import logging

from spectra.io.checkpoint import Checkpoint
from spectra.peft.read import LoraModule, lora_modules, read_lora_settings
from spectra.plan.dense import filter_reason, match_names
from spectra.plan.jobs import Factored, Job, Plan
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
        CheckpointError: bad adapter_config.json, a non-LoRA adapter, or several adapters in one file.
    """
    settings = read_lora_settings(adapter.location, adapter.path)
    modules, skipped = lora_modules(adapter.entries, settings, adapter.path)
    names = {module: f"{module}.weight" for module in modules}
    base_of = match_names(set(base.entries), set(names.values())) if base is not None else {}
    jobs: list[Job] = []
    for module, found_module in modules.items():
        name = names[module]
        why = filter_reason(name, options) or (found_module if isinstance(found_module, Skipped) else None)
        found = why or _job(base, name, base_of.get(name), found_module, source)  # type: ignore[arg-type]
        if isinstance(found, Job):
            jobs.append(found)
        else:
            skipped.append(found)
    return Plan(tuple(jobs), tuple(skipped), adapter_notes(base))


def _job(base: Checkpoint | None, name: str, base_name: str | None, module: LoraModule, source: int) -> Job | Skipped:
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
    return Job(name, shape, Factored(module.a, module.b, module.scale, transpose, base_entry), None, source)


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
