"""In-memory inputs: an nn.Module, a state dict or a PeftModel as BASE or TUNED, analysed right after training.

The planners mirror the file planners (same pairing, filters, skip reasons and vocabulary notes) but their jobs hold
the tensors themselves (`Tensors`, `TensorFactors`): nothing is saved or copied up front, and each ΔW is formed
where the job is materialised, upcast before subtracting, as for files. Such jobs are not picklable to other
processes, so they run in the local executor only. A PeftModel is read through its LoRA layers (duck-typed: peft is
not imported): ΔW = scale·B@A from the active adapter's factors, the base weight from the layer it wraps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from spectra.errors import CheckpointError, MismatchError
from spectra.io.header import DTYPES
from spectra.names import natural_key
from spectra.plan.dense import _vocabulary_resized, filter_reason, match_names
from spectra.plan.jobs import Job, Plan, TensorFactors, Tensors
from spectra.plan.noise import rounding_noise_energy
from spectra.records import CheckpointInfo, Delta, ModelConfig, Options, Skipped

DTYPE_NAMES = {dtype: name for dtype, name in DTYPES.values()}
PEFT_PREFIX = "base_model.model."  # PeftModel module names = this + the base model's


def is_in_memory(source: object) -> bool:
    """True for an input that is not a path: an nn.Module (PeftModel included) or a mapping of tensors."""
    return isinstance(source, torch.nn.Module | Mapping)


def is_peft_model(source: object) -> bool:
    return isinstance(source, torch.nn.Module) and hasattr(source, "peft_config")


def state_dict(source: object, role: str) -> dict[str, torch.Tensor]:
    """The tensors of a module (its state_dict: views, no copies) or a mapping, by name.

    Raises:
        CheckpointError: not a module or a mapping of names to tensors.
    """
    if isinstance(source, torch.nn.Module):
        tensors: Mapping[Any, Any] = source.state_dict()
    elif isinstance(source, Mapping):
        tensors = source
    else:
        raise CheckpointError(f"{role}: expected a path, an nn.Module or a state dict, got {type(source).__name__}")
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{role}: a state dict maps names to tensors; entry {bad[0]!r} is not one")
    return dict(tensors)


def label(source: object) -> str:
    """How an in-memory input is named in records and reports, e.g. "<in-memory LlamaForCausalLM>"."""
    if isinstance(source, torch.nn.Module):
        inner = getattr(getattr(source, "base_model", None), "model", None) if is_peft_model(source) else None
        name = type(inner or source).__name__
        return f"<in-memory {'PeftModel of ' if inner is not None else ''}{name}>"
    return f"<in-memory state dict, {len(source) if isinstance(source, Mapping) else 0} tensors>"


def model_config(source: object) -> ModelConfig | None:
    """What a Hugging Face model's `config` says (name, architectures, model type), or None. A model built from a
    config rather than loaded has no `architectures` yet: its class name stands in (LlamaForCausalLM)."""
    if is_peft_model(source):
        source = getattr(getattr(source, "base_model", None), "model", source)
    config = getattr(source, "config", None)
    if config is None:
        return None
    architectures = getattr(config, "architectures", None) or (type(source).__name__,)
    return ModelConfig(
        name_or_path=getattr(config, "_name_or_path", None) or None,
        model_type=getattr(config, "model_type", None),
        architectures=tuple(str(a) for a in architectures),
        is_encoder_decoder=getattr(config, "is_encoder_decoder", None),
    )


def memory_info(source: object, tensors: Mapping[str, torch.Tensor]) -> CheckpointInfo:
    fmt = "peft-model" if is_peft_model(source) else "module" if isinstance(source, torch.nn.Module) else "state-dict"
    dtypes = sorted({DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")) for t in tensors.values()})
    n_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return CheckpointInfo(label(source), fmt, len(tensors), n_bytes, tuple(dtypes), model_config(source))


def _unfit(name: str, t: torch.Tensor) -> Skipped | None:
    if not t.is_floating_point():
        return Skipped(name, "not-float", f"dtype {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != 2:
        return Skipped(name, "not-2d", f"{t.dim()}-D, shape {tuple(t.shape)}")
    if 0 in t.shape:
        return Skipped(name, "not-2d", f"empty matrix, shape {tuple(t.shape)}")
    return None


def plan_tensors(
    base: Mapping[str, torch.Tensor], tuned: Mapping[str, torch.Tensor], options: Options, *, source: int = 0
) -> Plan:
    """`plan_pair` over two state dicts: a job per analysable pair (holding both tensors), everything skipped."""
    base_of = match_names(set(base), set(tuned))
    skipped = [Skipped(b, "only-in-base") for b in sorted(set(base) - set(base_of.values()), key=natural_key)]
    jobs: list[Job] = []
    for name in sorted(tuned, key=natural_key):
        t, base_name = tuned[name], base_of.get(name)
        why = filter_reason(name, options) or _unfit(name, t)
        if why is not None or base_name is None:
            skipped.append(why or Skipped(name, "only-in-tuned"))
            continue
        b, note = base[base_name], None
        if b.shape != t.shape:
            note = _vocabulary_resized(name, tuple(b.shape), tuple(t.shape))
            if note is None:
                skipped.append(Skipped(name, "shape-mismatch", f"base {tuple(b.shape)} vs tuned {tuple(t.shape)}"))
                continue
        rows = min(t.shape[0], b.shape[0])
        jobs.append(Job(name, (rows, t.shape[1]), Tensors(t, b, rows), note, source))
    return Plan(tuple(jobs), tuple(skipped), tuple(j.note for j in jobs if j.note is not None))


def _factors(module: torch.nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
    """(A, B, transpose) of one LoRA layer for `adapter`: Linear (lora_A/lora_B) or Embedding (lora_embedding_*)."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a and isinstance(lora_b, torch.nn.ModuleDict):
        a, b = lora_a[adapter].weight, lora_b[adapter].weight
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dim() == b.dim() == 2:
            return a, b, bool(getattr(module, "fan_in_fan_out", False))
    emb_a, emb_b = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
    if isinstance(emb_a, torch.nn.ParameterDict) and adapter in emb_a and isinstance(emb_b, torch.nn.ParameterDict):
        return emb_a[adapter], emb_b[adapter], True  # ΔW = (B @ A)ᵀ: rows are vocabulary entries
    return None


def plan_peft_model(model: torch.nn.Module, options: Options, *, source: int = 0) -> Plan:
    """A factored job per LoRA layer of a PeftModel's active adapter, named by the base model's keys."""
    adapter = str(getattr(model, "active_adapter", "default"))
    jobs: list[Job] = []
    skipped: list[Skipped] = []
    for module_name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict) or adapter not in scaling or not hasattr(module, "base_layer"):
            continue
        name = f"{module_name.removeprefix(PEFT_PREFIX)}.weight"
        found = _factors(module, adapter)
        if filter_reason(name, options) is not None or found is None:
            skipped.append(filter_reason(name, options) or Skipped(name, "unsupported", "not a Linear/Embedding LoRA"))
            continue
        a, b, transpose = found
        base = getattr(module.base_layer, "weight", None)
        shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        operand = TensorFactors(
            a, b, float(scaling[adapter]), transpose, base if isinstance(base, torch.Tensor) else None
        )
        jobs.append(Job(name, shape, operand, None, source))
    jobs.sort(key=lambda j: natural_key(j.name))
    return Plan(tuple(jobs), tuple(skipped))


def labels(base: Any, tuned: Sequence[Any]) -> tuple[str | None, list[str]]:
    """Names for records: a label for an in-memory input, the path as given otherwise."""

    def one(x: Any) -> str:
        return label(x) if is_in_memory(x) else os.fspath(x)

    return (None if base is None else one(base)), [one(t) for t in tuned]


def plan_in_memory(
    base: Any, tuned: Sequence[Any], options: Options
) -> tuple[list[Plan], CheckpointInfo | None, list[CheckpointInfo]]:
    """Plan in-memory inputs: a PeftModel from its LoRA layers, otherwise ΔW of two state dicts; their infos.

    Raises:
        CheckpointError: a path mixed with in-memory inputs, a non-tensor entry, no BASE for a plain module.
        MismatchError: nothing to analyse.
    """
    if any(not is_in_memory(x) for x in (*tuned, *([] if base is None else [base]))):
        raise CheckpointError(
            "mixing a path with an in-memory model: pass both as modules or state dicts (e.g. "
            "safetensors.torch.load_file(path)), or save the model and pass both paths"
        )
    base_sd = None if base is None else state_dict(base, "BASE")
    plans, infos = [], []
    for source, t in enumerate(tuned):
        t_sd = state_dict(t, "TUNED")
        if is_peft_model(t):
            plan = plan_peft_model(t, options, source=source)
        elif base_sd is None:
            raise CheckpointError(f"{label(t)}: not a PeftModel, so a BASE is needed to form ΔW; pass BASE")
        else:
            plan = plan_tensors(base_sd, t_sd, options, source=source)
        if not plan.jobs:
            reasons = ", ".join(sorted({s.reason for s in plan.skipped})) or "nothing found"
            raise MismatchError(f"{label(t)}: no analysable 2-D tensors (skipped: {reasons})")
        plans.append(plan)
        infos.append(memory_info(t, t_sd))
    return plans, (None if base is None or base_sd is None else memory_info(base, base_sd)), infos


def _non_finite(name: str, side: str) -> CheckpointError:
    return CheckpointError(f"<in-memory>: {side} tensor {name!r} holds NaN/Inf values (a diverged run?)")


def memory_delta(job: Job, op: Tensors | TensorFactors, *, wide: bool = False) -> Delta | Skipped:
    """Materialise an in-memory job on the CPU: ΔW upcast before subtracting (float64 when `wide`), or the factors."""
    with torch.no_grad():
        if isinstance(op, TensorFactors):
            return _factored(job, op)
        t = op.tuned.detach()[: op.rows]
        dtype = torch.float64 if wide or t.dtype == torch.float64 else torch.float32
        values = t.to(device="cpu", dtype=dtype, copy=True)
        noise = rounding_noise_energy(t.cpu(), DTYPE_NAMES.get(t.dtype, ""))
        base_norm = None
        if op.base is not None:
            b = op.base.detach()[: op.rows]
            values.sub_(b.to(device="cpu", dtype=dtype))
            noise += rounding_noise_energy(b.cpu(), DTYPE_NAMES.get(b.dtype, ""))
            base_norm = float(torch.linalg.vector_norm(b, dtype=torch.float64))
            if not math.isfinite(base_norm):
                raise _non_finite(job.name, "base")
        energy = float(torch.linalg.vector_norm(values, dtype=torch.float64)) ** 2
        if not math.isfinite(energy):
            raise _non_finite(job.name, "tuned")
        if energy == 0.0:
            return Skipped(job.name, "unchanged", "ΔW = 0")
        return Delta(job.name, job.shape, values, None, base_norm, DTYPE_NAMES.get(t.dtype, "f32"), min(noise, energy))


def _factored(job: Job, op: TensorFactors) -> Delta | Skipped:
    a = op.a.detach().to(device="cpu", dtype=torch.float64, copy=True)
    b = op.b.detach().to(device="cpu", dtype=torch.float64, copy=True)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise _non_finite(job.name, "adapter")
    if not (torch.any(a) and torch.any(b)):
        return Skipped(job.name, "unchanged", "ΔW = 0 (lora_B is zero at PEFT's initialisation: untrained?)")
    b.mul_(op.scale)
    factors = (a.mT, b.mT) if op.transpose else (b, a)
    base_norm = None if op.base is None else float(torch.linalg.vector_norm(op.base.detach(), dtype=torch.float64))
    return Delta(job.name, job.shape, None, factors, base_norm, DTYPE_NAMES.get(op.b.dtype, "f32"), 0.0)
