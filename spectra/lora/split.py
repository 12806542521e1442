"""Top-k triplets of ΔW → PEFT LoRA factors, written as they come: the records of a written adapter, the split,
the predicted error, and the JSON of a result (shared by extract and resize).

Split. scale·B·A = U_r diag(σ_r) V_rᵀ with B = U_r·diag(√(σ/scale)), A = diag(√(σ/scale))·V_rᵀ, the scale being
PEFT's for the module (α/r, or α/√r with rsLoRA). By Eckart–Young the merged model then differs from the
fine-tune by ‖ΔW − ΔW_r‖_F = √(1 − E(r))·‖ΔW‖_F. Storing B and A in bf16/fp16 adds a rounding term, computed
exactly from the factors (to first order it lies in the span of U_r or V_r, orthogonal to ΔW − ΔW_r) and
included in the predicted error; in fp32 it is ~1e-7 and the error is √(1 − E(r)).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from spectra.engine.executor import ProgressHook, run
from spectra.engine.kernels import TopK
from spectra.engine.local import LocalExecutor
from spectra.errors import SpectraError
from spectra.io.files import write_atomic
from spectra.lora.rules import RankRule
from spectra.names import module_kinds, module_name, natural_key, printable, reading_order
from spectra.peft.layout import ConfigReader
from spectra.peft.write import ADAPTER_DTYPES, AdapterWriter, TensorSpec, lora_layout
from spectra.plan.jobs import Job
from spectra.records import Factors, Skipped

FORMAT: Final = "spectra.extraction/1"
STORED: Final = {"bf16": "bf16", "f16": "fp16"}  # storage dtype of the inputs -> default adapter dtype (else fp32)
# why a tensor is not in the adapter, beyond spectra.names.SKIP_REASONS
REASONS: Final = {
    "rank-0": "the rank rule gives it rank 0 (no LoRA module is written for it)",
    "not-representable": "it changed, but a LoRA adapter cannot carry this change",
}


@dataclass(frozen=True, slots=True)
class ModuleResult:
    """One module of the written adapter."""

    name: str  # the base checkpoint key of the adapted weight, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, int]  # ΔW as the weight is stored
    rank: int
    params: int  # r·(m + n) (+ the bias, when carried)
    captured: float  # E(r) = Σ_{i≤r} σᵢ² / ‖ΔW‖_F²
    error: float  # predicted ‖W_merged − W_tuned‖_F / ‖ΔW‖_F: √(1 − E(r)), plus the storage rounding of B, A
    energy: float  # ‖ΔW‖_F²
    relative_change: float | None  # ‖ΔW‖_F / ‖W_base‖_F
    bias: bool = False  # the bias change is carried as lora_B.bias
    padded: int = 0  # directions written as zeros: ΔW's numerical rank is below the module's rank


@dataclass(frozen=True, slots=True)
class ExtractResult:
    """What `extract` or `resize` wrote: the adapter folder, each module, and everything left out (with reasons)."""

    out_dir: str
    source: str  # TUNED (extract) or the adapter (resize), as given
    base: str | None
    rule: RankRule
    dtype: str  # "fp32", "bf16", "fp16"
    modules: tuple[ModuleResult, ...]
    left_out: tuple[Skipped, ...]  # reasons: spectra.names.SKIP_REASONS and REASONS
    notes: tuple[str, ...]
    config: dict[str, Any] = field(repr=False)  # adapter_config.json as written
    passes: int  # times the inputs were read
    device: str
    elapsed_s: float
    dropped_energy: float = 0.0  # Σ‖ΔW‖_F² of changed targeted modules given rank 0 (captured: none of it)

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def dense_params(self) -> int:
        """Σ m·n over the adapted modules: what a full fine-tune of them changes."""
        return sum(m.shape[0] * m.shape[1] for m in self.modules)

    @property
    def captured(self) -> float:
        """Energy-weighted E over the adapted modules and those given rank 0."""
        total = sum(m.energy for m in self.modules) + self.dropped_energy
        return sum(m.captured * m.energy for m in self.modules) / total if total > 0 else 0.0

    @property
    def error(self) -> float:
        """Predicted √(Σ‖ΔW − B·A‖² / Σ‖ΔW‖²) over the same modules."""
        total = sum(m.energy for m in self.modules) + self.dropped_energy
        lost = sum(m.error**2 * m.energy for m in self.modules) + self.dropped_energy
        return math.sqrt(lost / total) if total > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Target:
    """One module to write: its job, PEFT module name, rank and orientation, and the bias delta it carries."""

    job: Job
    name: str  # the adapted weight's key: PEFT module name + ".weight" (the base model's names)
    rank: int
    embedding: bool = False  # an nn.Embedding (PEFT's lora_embedding_A/B)
    transpose: bool = False  # a fan_in_fan_out layer (GPT-2's Conv1D), or an adapter stored transposed
    bias: torch.Tensor | None = field(default=None, compare=False)  # Δbias in float64, as PEFT merges it (scale·b)


def default_dtype(stored: Iterable[str]) -> str:
    """The adapter dtype matching the tuned weights' most common storage dtype: bf16, fp16, else fp32."""
    common = Counter(stored).most_common(1)
    return STORED.get(common[0][0], "fp32") if common else "fp32"


def cost_notes(modules: Sequence[ModuleResult]) -> tuple[str, ...]:
    dense = [m.name for m in modules if m.rank * (m.shape[0] + m.shape[1]) >= m.shape[0] * m.shape[1]]
    if not dense:
        return ()
    return (f"{len(dense)} modules (e.g. {dense[0]}) have r ≥ m·n/(m+n): their LoRA costs at least the dense matrix",)


def write_adapter(
    out_dir: str | os.PathLike[str],
    config: Mapping[str, Any],
    plan: Sequence[Target],
    dtype: str,
    executor: LocalExecutor,
    *,
    overwrite: bool,
    progress: ProgressHook,
) -> tuple[ModuleResult, ...]:
    """Compute each target's top-r triplets (TopK), split them into PEFT's factors and write them as they come;
    returns the modules in reading order (embeddings, each block in execution order, heads). Nothing is left
    behind on an error.

    Raises:
        SpectraError: the folder cannot be written, or an input changed between the passes.
    """
    store = ADAPTER_DTYPES[dtype]
    reader = ConfigReader.of(config)
    scale = {t.name: _scale(reader, module_name(t.name), bool(config.get("use_rslora"))) for t in plan}
    layout: list[TensorSpec] = []
    for t in plan:
        name = module_name(t.name)
        layout += lora_layout(name, t.job.shape, t.rank, store, embedding=t.embedding, transpose=t.transpose,
                              bias=t.bias is not None)  # fmt: skip
    by_job = {t.job.name: t for t in plan}
    kernel = TopK.per_job({t.job.name: t.rank for t in plan})
    modules = []
    with AdapterWriter(Path(out_dir), config, layout, overwrite=overwrite, metadata={"spectra": FORMAT}) as writer:
        for job, result in run([t.job for t in plan], kernel, executor, progress):
            t = by_job[job.name]
            if not isinstance(result, Factors):
                raise SpectraError(f"{printable(t.name)}: ΔW was zero on the second read; did an input change?")
            b, a, module = split(result, t, scale[t.name], store)
            bias = None if t.bias is None else (t.bias / scale[t.name])
            writer.write_factors(module_name(t.name), b, a, transpose=t.transpose and not t.embedding, bias=bias)
            modules.append(module)
            del result, b, a
    kinds = module_kinds([m.name for m in modules])
    return tuple(sorted(modules, key=lambda m: (reading_order(*kinds[m.name]), natural_key(m.name))))


def _scale(reader: ConfigReader, module: str, rslora: bool) -> float:
    resolved = reader.resolve(module)
    assert resolved is not None, module  # the writer checks every module of the layout against the config
    r, alpha = resolved
    return alpha / math.sqrt(r) if rslora else alpha / r


def split(f: Factors, t: Target, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, ModuleResult]:
    """(B, A) in `dtype` with scale·B·A = U_r diag(σ_r) V_rᵀ (zero-padded to t.rank), and the module's record.

    The predicted error adds to the truncation's Σ_{i>r} σᵢ² the storage rounding ‖scale·(B̃Ã − BA)‖², computed
    from r×r Gram matrices: the rounding lies in the span of U_r or V_r to first order, orthogonal to ΔW − ΔW_r.
    """
    r = min(t.rank, len(f.s))
    root = np.sqrt(f.s[:r] / scale)
    b = torch.zeros(f.shape[0], t.rank, dtype=torch.float64)
    a = torch.zeros(t.rank, f.shape[1], dtype=torch.float64)
    b[:, :r] = torch.from_numpy(f.u[:, :r] * root)
    a[:r] = torch.from_numpy(f.vt[:r] * root[:, None])
    b_stored, a_stored = b.to(dtype), a.to(dtype)
    kept = float(np.sum(np.square(f.s[:r])))
    rounding = _rounding_energy(b, a, b_stored.double(), a_stored.double()) * scale**2
    energy = f.energy
    error = math.sqrt(max(energy - kept, 0.0) + rounding) / math.sqrt(energy) if energy > 0 else 0.0
    m, n = f.shape
    params = t.rank * (m + n) + (0 if t.bias is None else t.bias.numel())
    relative = None if f.base_norm is None or f.base_norm == 0 else math.sqrt(energy) / f.base_norm
    captured = min(kept / energy, 1.0) if energy > 0 else 0.0
    module = ModuleResult(t.name, f.shape, t.rank, params, captured, error, energy, relative, t.bias is not None,
                          t.rank - r)  # fmt: skip
    return b_stored, a_stored, module


def _rounding_energy(b: torch.Tensor, a: torch.Tensor, b_s: torch.Tensor, a_s: torch.Tensor) -> float:
    """‖B̃Ã − BA‖_F² = ‖[δB | B]·[Ã; δA]‖_F² = Σ (PᵀP) ∘ (QQᵀ), from (2r)² Gram matrices (no cancellation)."""
    if b_s.dtype == b.dtype and torch.equal(b_s, b) and torch.equal(a_s, a):
        return 0.0
    p = torch.cat([b_s - b, b], dim=1)
    q = torch.cat([a_s, a_s - a], dim=0)
    return max(float(torch.sum((p.mT @ p) * (q @ q.mT))), 0.0)


def extraction_json(result: ExtractResult) -> str:
    """The result as `spectra.extraction/1` JSON: the folder, rule, totals, each module, the left-outs, notes."""
    record = {
        "format": FORMAT,
        "out_dir": result.out_dir,
        "source": result.source,
        "base": result.base,
        "rule": result.rule.to_json(),
        "dtype": result.dtype,
        "params": result.params,
        "dense_params": result.dense_params,
        "captured": result.captured,
        "error": result.error,
        "passes": result.passes,
        "device": result.device,
        "elapsed_s": result.elapsed_s,
        "modules": [
            {
                "name": m.name,
                "shape": list(m.shape),
                "rank": m.rank,
                "params": m.params,
                "captured": m.captured,
                "error": m.error,
                "frobenius_norm": math.sqrt(m.energy),
                "relative_change": m.relative_change,
                "bias": m.bias,
                "padded": m.padded,
            }
            for m in result.modules
        ],
        "left_out": [{"name": s.name, "reason": s.reason, "detail": s.detail} for s in result.left_out],
        "notes": list(result.notes),
        "config": result.config,
    }
    return json.dumps(record, indent=1, allow_nan=False) + "\n"


def save_extraction(result: ExtractResult, path: str | os.PathLike[str]) -> Path:
    """Write `extraction_json(result)` to `path`, atomically; returns the path.

    Raises:
        SpectraError: the file cannot be written.
    """
    return write_atomic(Path(path), extraction_json(result))
