"""Materialise a job: read its tensors (in row blocks, into reused buffers), upcast, subtract, and measure.

This is where files are opened, through the caller's per-process `Handles` cache: jobs only name tensors by file
and byte range, so any process (a local reader thread, a Ray actor) can materialise them.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Final

import torch

from spectra.errors import CheckpointError
from spectra.io.header import TensorEntry
from spectra.io.tensors import Handles, read_tensor
from spectra.plan import quant
from spectra.plan.jobs import Dense, Dora, Factored, Job, TensorFactors, Tensors
from spectra.plan.memory import memory_delta
from spectra.plan.noise import rounding_noise_energy
from spectra.records import Delta, QuantProbe, Skipped

log = logging.getLogger(__name__)

DIFF_CHUNK_BYTES: Final = 4 * 2**20  # ΔW rows formed at a time (read, measured, upcast, subtracted while in cache)


def make_delta(job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
    """Read the job's tensors and return its matrix as a Delta, or Skipped("unchanged") when it is exactly zero.

    Dense: ΔW = W_tuned − W_base, upcast first and never subtracted in low precision; float64 when `wide` or
    either side is stored in float64, float32 otherwise (exact for bf16/f16 inputs). Without a base the matrix is
    the weight itself (raw-weight spectra). With a base quantisation, W_base is dequant(quant(W_base)) computed
    once per matrix with bitsandbytes (memory: one more tensor of W_base's size); with a quantisation probe, ΔW is
    checked for the base's quantisation error on a sample (Delta.quant). Factored: the adapter's float64 factors,
    scale folded in, ΔW not formed. Dora: ΔW = m ⊙ (W + s·B@A)/‖W + s·B@A‖ − W formed densely, in row blocks.

    Args:
        job: what to read; its tensors are opened through `handles`.
        handles: this thread's (or process's) open-file cache.
        wide: form a dense ΔW in float64 (what exact float64 kernels ask for).

    Raises:
        CheckpointError: a tensor cannot be read, or holds NaN/Inf.
    """
    if isinstance(job.operand, Tensors | TensorFactors):  # in-memory inputs: nothing to read
        return memory_delta(job, job.operand, wide=wide)
    if isinstance(job.operand, Factored):
        return _factored_delta(job, job.operand, handles)
    if isinstance(job.operand, Dora):
        return _dora_delta(job, job.operand, handles, wide)
    return _dense_delta(job, job.operand, handles, wide)


def _dense_delta(job: Job, op: Dense, handles: Handles, wide: bool) -> Delta | Skipped:
    """ΔW formed DIFF_CHUNK_BYTES of rows at a time, read straight from disk into two reused chunk buffers, so
    memory holds ΔW and two small chunks, never a whole stored tensor (but for a quantised base: W_base and its
    round trip, once). The rounding-noise estimate adds both sides' Σ ulp²/12 (each stored tensor was rounded
    once, independently), capped at ‖ΔW‖_F²; a quantised base is computed, so only the tuned side's counts."""
    t_entry, b_entry = op.tuned, op.base
    wide = wide or t_entry.code == "F64" or (b_entry is not None and b_entry.code == "F64")
    values = torch.empty(job.shape, dtype=torch.float64 if wide else torch.float32)
    rows, cols = job.shape
    step = max(1, DIFF_CHUNK_BYTES // max(1, cols * values.element_size()))
    t_buffer = b_buffer = None
    noise = base_energy = delta_energy = 0.0
    quantized = None
    if b_entry is not None and op.base_quant is not None:
        quantized, base_energy = _quantized_base(b_entry, op.base_quant, handles)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        chunk = values[lo:hi]
        w = read_tensor(t_entry, (lo, hi), None if t_buffer is None else t_buffer[: (hi - lo) * cols], handles)
        t_buffer = w.view(-1) if t_buffer is None else t_buffer
        # both sides' storage rounding lands in ΔW (independent errors: their energies add)
        noise += rounding_noise_energy(w, t_entry.dtype_name)
        chunk.copy_(w)
        if b_entry is not None:
            if quantized is not None:  # computed, not stored: the merge added s·B@A to these very values
                w = quantized[lo:hi]
            else:
                w = read_tensor(b_entry, (lo, hi), None if b_buffer is None else b_buffer[: (hi - lo) * cols], handles)
                b_buffer = w.view(-1) if b_buffer is None else b_buffer
                base_energy += _sum_squares(w)
                noise += rounding_noise_energy(w, b_entry.dtype_name)
            _subtract(chunk, w)
        delta_energy += float(torch.linalg.vector_norm(chunk)) ** 2
    del t_buffer, b_buffer, quantized
    if not math.isfinite(base_energy):
        assert b_entry is not None
        raise non_finite_error(b_entry, "base")
    if not math.isfinite(delta_energy) and not bool(torch.isfinite(values).all()):
        side = "tuned" if b_entry is not None else "weight"
        raise non_finite_error(t_entry, side, int(torch.count_nonzero(~torch.isfinite(values))))
    if delta_energy == 0.0 and not torch.any(values):
        return Skipped(job.name, "unchanged", "ΔW = 0" if b_entry is not None else "W = 0")
    # An update far below one ulp mostly rounds away; rounding then cannot account for more than all of ‖ΔW‖²
    # (E‖ΔW‖² = ‖Δ‖² + E‖noise‖² for unbiased rounding), so the estimate is capped there.
    noise = min(noise, delta_energy)
    base_norm = math.sqrt(base_energy) if b_entry is not None else None
    probe = _probe(b_entry, values, handles) if op.quant_probe and b_entry is not None else None
    return Delta(job.name, job.shape, values, None, base_norm, t_entry.dtype_name, noise, probe)


def _quantized_base(entry: TensorEntry, spec: quant.QuantSpec, handles: Handles) -> tuple[torch.Tensor, float]:
    """dequant(quant(W_base)) of the whole stored tensor (blockwise quantisation runs over the flattened weight),
    and ‖W_base‖_F² of the weight as stored."""
    stored = read_tensor(entry, handles=handles)
    energy = _sum_squares(stored)
    if not math.isfinite(energy):
        raise non_finite_error(entry, "base")
    return quant.round_trip(stored, spec), energy


def _probe(entry: TensorEntry, values: torch.Tensor, handles: Handles) -> QuantProbe | None:
    """The quantisation probe on a sample of W_base's rows (read again: a few blocks) and the same rows of ΔW."""
    transpose = quant.quantized_transposed(entry.name)
    ranges = quant.probe_rows((values.shape[0], values.shape[1]), transpose)
    base = [read_tensor(entry, (lo, hi), handles=handles) for lo, hi in ranges]
    try:
        return quant.probe(base, [values[lo:hi] for lo, hi in ranges], values.numel(), transpose)
    except (RuntimeError, ValueError) as exc:  # a heuristic: bitsandbytes failing on it must not stop the analysis
        log.warning("%s: quantisation probe failed (%s); ΔW not checked for a quantised base", entry.name, exc)
        return None


def _dora_delta(job: Job, op: Dora, handles: Handles, wide: bool) -> Delta | Skipped:
    """DoRA's ΔW = (f − 1) ⊙ W + f ⊙ (s·B@A) with f = m / ‖W + s·B@A‖ per output feature, in float64 row blocks
    (cast to float32 unless `wide`): writing it so, with f − 1 = (m − ‖·‖)/‖·‖, keeps a small update exact instead
    of the difference of two nearly equal weights. Two passes over the rows: the norms (a Conv1D weight's output
    features are its columns), then ΔW. Noise energy 0: W, B, A and m are the stored values PEFT itself merges."""
    a, b = read_tensor(op.a, handles=handles).double(), read_tensor(op.b, handles=handles).double()
    magnitude = read_tensor(op.magnitude, handles=handles).double()
    for entry, tensor in ((op.a, a), (op.b, b), (op.magnitude, magnitude)):
        bad = int(torch.count_nonzero(~torch.isfinite(tensor)))
        if bad:
            raise non_finite_error(entry, "adapter", bad)
    b.mul_(op.scale)
    quantized, base_energy = (None, 0.0)
    if op.base_quant is not None:
        quantized, base_energy = _quantized_base(op.base, op.base_quant, handles)
    rows, cols = job.shape
    step = max(1, DIFF_CHUNK_BYTES // max(1, cols * 8))

    def block(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows lo:hi of W (float64) and of s·B@A, oriented as the base stores W."""
        w = quantized[lo:hi] if quantized is not None else read_tensor(op.base, (lo, hi), handles=handles)
        lora = a[:, lo:hi].mT @ b.mT if op.transpose else b[lo:hi] @ a
        return w.double(), lora

    norm2 = torch.zeros(cols if op.transpose else rows, dtype=torch.float64)
    for lo in range(0, rows, step):
        w, lora = block(lo, min(rows, lo + step))
        if quantized is None:
            base_energy += float(torch.sum(w * w))
        if op.transpose:
            norm2 += torch.sum(torch.square(w + lora), dim=0)
        else:
            norm2[lo : lo + step] = torch.sum(torch.square(w + lora), dim=1)
    if not math.isfinite(base_energy):
        raise non_finite_error(op.base, "base")
    norm = torch.sqrt(norm2)
    if not bool(torch.all(norm > 0)):
        raise CheckpointError(
            f"{op.base.file}: {job.name}: a row of W + s·B@A is zero, so DoRA's norm is 0 and PEFT's merge would "
            "divide by it (NaN); check the base and the adapter"
        )
    factor, shift = magnitude / norm, (magnitude - norm) / norm  # f and f − 1
    values = torch.empty(job.shape, dtype=torch.float64 if wide else torch.float32)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        w, lora = block(lo, hi)
        f, f1 = (factor, shift) if op.transpose else (factor[lo:hi, None], shift[lo:hi, None])
        values[lo:hi] = f1 * w + f * lora
    if not torch.any(values):
        return Skipped(job.name, "unchanged", "ΔW = 0 (m = ‖W‖ and B = 0: an untrained DoRA adapter?)")
    return Delta(job.name, job.shape, values, None, math.sqrt(base_energy), op.b.dtype_name, 0.0)


def _factored_delta(job: Job, op: Factored, handles: Handles) -> Delta | Skipped:
    """The factors in float64 with the scale folded into the first: ΔW = (scale·B) @ A, or Aᵀ @ (scale·B)ᵀ."""
    a, b = read_tensor(op.a, handles=handles).double(), read_tensor(op.b, handles=handles).double()
    for entry, factor in ((op.a, a), (op.b, b)):
        bad = int(torch.count_nonzero(~torch.isfinite(factor)))
        if bad:
            raise non_finite_error(entry, "adapter", bad)
    if not (torch.any(a) and torch.any(b)):
        return Skipped(job.name, "unchanged", "ΔW = 0 (lora_B is zero at PEFT's initialisation: untrained?)")
    b.mul_(op.scale)
    factors = (a.mT, b.mT) if op.transpose else (b, a)
    base_norm = None
    if op.base is not None:
        base_norm = float(torch.linalg.vector_norm(read_tensor(op.base, handles=handles), dtype=torch.float64))
    # Noise energy 0: rounding the stored factors perturbs B and A, so ΔW stays exactly rank ≤ r; there is no
    # full-rank storage floor for the spectrum to sink into, unlike a difference of two rounded dense weights.
    return Delta(job.name, job.shape, None, factors, base_norm, op.b.dtype_name, 0.0)


def non_finite_error(entry: TensorEntry, side: str, count: int | None = None) -> CheckpointError:
    """The one-line error for a weight holding NaN or ±Inf, whose ΔW has no spectrum."""
    what = "NaN/Inf values" if count is None else f"{count} NaN/Inf value{'s' if count != 1 else ''}"
    return CheckpointError(
        f"{entry.file}: {side} tensor {entry.name!r} holds {what} (a diverged fine-tune or a damaged file); "
        f"check the checkpoint, or leave the tensor out with --exclude '{re.escape(entry.name)}'"
    )


def _subtract(values: torch.Tensor, w: torch.Tensor, chunk: int = 1 << 20) -> None:
    """values −= w, upcasting `chunk` elements of w at a time (a mixed-dtype sub_ on the CPU copies all of w)."""
    flat, other = values.view(-1), w.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        flat[i : i + chunk].sub_(other[i : i + chunk].to(values.dtype))


def _sum_squares(w: torch.Tensor, chunk: int = 1 << 16) -> float:
    """Σ w² in float64, upcasting `chunk` elements at a time (no float64 copy of a large tensor)."""
    flat = w.reshape(-1)
    if flat.element_size() == 1:  # float8: torch has no promotion rules for it, so upcast through float32
        flat = flat.float()
    return sum(
        (
            float(torch.linalg.vector_norm(flat[i : i + chunk], dtype=torch.float64)) ** 2
            for i in range(0, flat.numel(), chunk)
        ),
        0.0,
    )
