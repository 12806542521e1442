"""Jobs and plans: what to compute, as frozen, picklable descriptors that name tensors by file and byte range.

A job never holds an open file or a tensor: it can be sorted, batched, pickled to another process (a Ray actor)
and materialised there (spectra.plan.delta.make_delta, with that process's own handle cache). Planners
(plan/dense.py, plan/adapter.py) build a `Plan` per tuned input: its jobs, everything skipped and why, and notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from spectra.io.header import TensorEntry
from spectra.plan.quant import QuantSpec
from spectra.records import Skipped

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True, slots=True)
class Dense:
    """ΔW = W_tuned − W_base over the first `rows` rows of both, or the weight W_tuned itself when `base` is None.

    With `base_quant`, W_base is replaced by dequant(quant(W_base)) as bitsandbytes computes it (a merged QLoRA
    model's base); with `quant_probe`, ΔW is checked for that quantisation error (spectra.plan.quant.probe).
    """

    tuned: TensorEntry
    base: TensorEntry | None
    rows: int  # rows of ΔW: all of them, or those both sides share (a resized vocabulary)
    base_quant: QuantSpec | None = None
    quant_probe: bool = False


@dataclass(frozen=True, slots=True)
class Factored:
    """ΔW = scale·B@A (transposed when `transpose`) from an adapter's factors; B@A is never formed.

    `a` is (r, in) and `b` is (out, r) as PEFT stores them; `base` is the weight they update (for ‖W_base‖_F), or
    None when the adapter is analysed alone.
    """

    a: TensorEntry
    b: TensorEntry
    scale: float
    transpose: bool  # ΔW = (scale·B@A)ᵀ: embeddings, fan_in_fan_out (GPT-2 Conv1D)
    base: TensorEntry | None


@dataclass(frozen=True, slots=True, eq=False)
class Tensors:
    """Dense's in-memory counterpart: ΔW = W_tuned − W_base over the first `rows` rows of tensors held in memory (an
    nn.Module or a state dict, spectra.plan.memory). Not picklable to other processes: such jobs run locally."""

    tuned: torch.Tensor
    base: torch.Tensor | None
    rows: int


@dataclass(frozen=True, slots=True, eq=False)
class TensorFactors:
    """Factored's in-memory counterpart: ΔW = scale·B@A (transposed when `transpose`) from a PeftModel's LoRA layer."""

    a: torch.Tensor  # (r, in), as PEFT holds it
    b: torch.Tensor  # (out, r)
    scale: float
    transpose: bool
    base: torch.Tensor | None


@dataclass(frozen=True, slots=True)
class Dora:
    """A DoRA module: ΔW = m ⊙ (W + s·B@A) / ‖W + s·B@A‖ − W, formed densely from the base W (never factored).

    The norm is PEFT's (DoraLinearLayer.get_weight_norm): the L2 norm of each output feature's weights, i.e. of
    each row of the (out, in) weight (each column when `transpose`: a Conv1D weight stored (in, out)), no epsilon;
    m is the module's lora_magnitude_vector, one value per output feature. `base_quant` replaces W by
    dequant(quant(W)) (QDoRA: DoRA trained on a quantised base).
    """

    a: TensorEntry  # lora_A (r, in)
    b: TensorEntry  # lora_B (out, r)
    magnitude: TensorEntry  # lora_magnitude_vector (out,)
    scale: float
    transpose: bool  # the base stores the weight (in, out) (fan_in_fan_out)
    base: TensorEntry
    base_quant: QuantSpec | None = None


Operand = Dense | Factored | Dora | Tensors | TensorFactors


@dataclass(frozen=True, slots=True)
class Job:
    """One matrix to compute: its name, the shape of the matrix, how to form it, and which tuned input it is from."""

    name: str  # the reported key, verbatim (the tuned key; the base model's key for adapters)
    shape: tuple[int, int]  # (out_features, in_features) of the matrix the kernel sees
    operand: Operand
    note: str | None = None  # what the analysis of this matrix leaves out, for Analysis.notes
    source: int = 0  # index of the tuned input in a multi-input plan (plan_many); 0 for a single pair


@dataclass(frozen=True, slots=True)
class Plan:
    """The jobs of one tuned input, the tensors not analysed (with reasons), and notes for the analysis."""

    jobs: tuple[Job, ...]
    skipped: tuple[Skipped, ...] = ()
    notes: tuple[str, ...] = ()
