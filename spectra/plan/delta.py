"""Materialise a job: read its tensors (in row blocks, into reused buffers), upcast, subtract, and measure.

This is where files are opened, through the caller's per-process `Handles` cache: jobs only name tensors by file
and byte range, so any process (a local reader thread, a Ray actor) can materialise them.
"""

from __future__ import annotations

import math
import re
from typing import Final

import torch

from spectra.errors import CheckpointError
from spectra.io.header import TensorEntry
from spectra.io.tensors import Handles, read_tensor
from spectra.plan.jobs import Dense, Factored, Job, TensorFactors, Tensors
from spectra.plan.memory import memory_delta
from spectra.plan.noise import rounding_noise_energy
from spectra.records import Delta, Skipped

DIFF_CHUNK_BYTES: Final = 4 * 2**20  # ΔW rows formed at a time (read, measured, upcast, subtracted while in cache)


def make_delta(job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
    """Read the job's tensors and return its matrix as a Delta, or Skipped("unchanged") when it is exactly zero.

    Dense: ΔW = W_tuned − W_base, upcast first and never subtracted in low precision; float64 when `wide` or
    either side is stored in float64, float32 otherwise (exact for bf16/f16 inputs). Without a base the matrix is
    the weight itself (raw-weight spectra). Factored: the adapter's float64 factors, scale folded in, ΔW not formed.

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
    return _dense_delta(job, job.operand, handles, wide)


def _dense_delta(job: Job, op: Dense, handles: Handles, wide: bool) -> Delta | Skipped:
    """ΔW formed DIFF_CHUNK_BYTES of rows at a time, read straight from disk into two reused chunk buffers, so
    memory holds ΔW and two small chunks, never a whole stored tensor. The rounding-noise estimate adds both sides'
    Σ ulp²/12 (each stored tensor was rounded once, independently), capped at ‖ΔW‖_F²."""
    t_entry, b_entry = op.tuned, op.base
    wide = wide or t_entry.code == "F64" or (b_entry is not None and b_entry.code == "F64")
    values = torch.empty(job.shape, dtype=torch.float64 if wide else torch.float32)
    rows, cols = job.shape
    step = max(1, DIFF_CHUNK_BYTES // max(1, cols * values.element_size()))
    t_buffer = b_buffer = None
    noise = base_energy = delta_energy = 0.0
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        chunk = values[lo:hi]
        w = read_tensor(t_entry, (lo, hi), None if t_buffer is None else t_buffer[: (hi - lo) * cols], handles)
        t_buffer = w.view(-1) if t_buffer is None else t_buffer
        # both sides' storage rounding lands in ΔW (independent errors: their energies add)
        noise += rounding_noise_energy(w, t_entry.dtype_name)
        chunk.copy_(w)
        if b_entry is not None:
            w = read_tensor(b_entry, (lo, hi), None if b_buffer is None else b_buffer[: (hi - lo) * cols], handles)
            b_buffer = w.view(-1) if b_buffer is None else b_buffer
            noise += rounding_noise_energy(w, b_entry.dtype_name)
            _subtract(chunk, w)
            base_energy += _sum_squares(w)
        delta_energy += float(torch.linalg.vector_norm(chunk)) ** 2
    del t_buffer, b_buffer
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
    return Delta(job.name, job.shape, values, None, base_norm, t_entry.dtype_name, noise)


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
