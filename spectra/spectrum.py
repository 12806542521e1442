"""ΔW -> singular values, on the CPU or a GPU. The only module that knows how σ is computed.

Methods (chosen by `Options.precision`):
- "exact": float64 values-only SVD (LAPACK gesdd on the CPU, cuSOLVER gesvd on CUDA).
- "fast": eigenvalues of the Gram matrix on the smaller side (ΔWΔWᵀ or ΔWᵀΔW) in float32, negative eigenvalues
  clamped, σ = √λ. Energies (ranks, captured energy, stable rank) match "exact"; σ below the float32 resolution
  floor √(√k·u₃₂)·σ₁ are unresolved, so a matrix with more than 1% of its σ under that floor (a numerically
  low-rank ΔW, where the tail matters for plots and effective rank) is recomputed with a float64 Gram matrix.
- Factored deltas (adapters, ΔW = B A): QR of B and Aᵀ, then the SVD of the r×r core, float64; ΔW is never formed.
‖ΔW‖_F² is always computed directly from ΔW (or the core), in float64, not from σ.

Same-shape matrices are stacked into one call up to a byte budget, and a background thread reads and diffs the
next batch while the current one computes (a bounded queue keeps at most two batches waiting).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Generator, Iterable, Iterator
from typing import Final

import numpy as np
import torch

from spectra.errors import OptionsError
from spectra.records import Delta, Options, Spectrum

log = logging.getLogger(__name__)

U32: Final = 2.0**-24  # float32 unit roundoff
LOW_RANK_SHARE: Final = 0.01  # recompute in float64 when more than this share of σ is below the float32 floor
CPU_BATCH_BYTES: Final = 256 * 2**20
_DONE: Final = object()


def resolve_device(device: str) -> torch.device:
    """Return the torch device for "auto" (CUDA when available), "cpu" or "cuda".

    Raises:
        OptionsError: "cuda" was asked for and no CUDA device is available.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionsError("device 'cuda' asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def batch_budget(options: Options, device: torch.device) -> int:
    """Bytes of stacked ΔW per batch: the option, or a quarter of free GPU memory, or 256 MiB on the CPU."""
    if options.batch_bytes is not None:
        return options.batch_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free // 4, 1)
    return CPU_BATCH_BYTES


def compute_spectra(
    deltas: Iterable[Delta], options: Options, device: torch.device
) -> Generator[Spectrum, None, None]:
    """Yield the Spectrum of each Delta, in input order, reading ahead on a background thread.

    Args:
        deltas: ΔW records; producing them (disk reads, subtraction) runs on the reader thread.
        options: precision, batch_bytes and threads are used.
        device: where the linear algebra runs.
    """
    budget = batch_budget(options, device)
    log.info("spectrum: device %s, precision %s, batch budget %d MiB", device, options.precision, budget >> 20)
    with _threads(options.threads), _no_tf32():
        for batch in _prefetch(_batches(deltas, budget)):
            yield from _compute_batch(batch, options.precision, device)


def _batches(deltas: Iterable[Delta], budget: int) -> Iterator[list[Delta]]:
    """Group consecutive same-shape dense deltas into batches of at most `budget` bytes (at least one each)."""
    batch: list[Delta] = []
    size = 0
    for delta in deltas:
        nbytes = delta.values.numel() * delta.values.element_size() if delta.values is not None else 0
        fits = batch and delta.values is not None and batch[0].values is not None
        if batch and not (fits and batch[0].shape == delta.shape and size + nbytes <= budget):
            yield batch
            batch, size = [], 0
        batch.append(delta)
        size += nbytes
    if batch:
        yield batch


def _prefetch(batches: Iterator[list[Delta]]) -> Iterator[list[Delta]]:
    """Run `batches` on a reader thread, one batch ahead; re-raise its errors here."""
    slots: queue.Queue[object] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def reader() -> None:
        try:
            for batch in batches:
                while not stop.is_set():
                    with contextlib.suppress(queue.Full):
                        slots.put(batch, timeout=0.1)
                        break
                if stop.is_set():
                    return
            slots.put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put(exc)

    thread = threading.Thread(target=reader, name="spectra-reader", daemon=True)
    thread.start()
    try:
        while (item := slots.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, list)
            yield item
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            slots.get_nowait()
        thread.join()


def _compute_batch(batch: list[Delta], precision: str, device: torch.device) -> list[Spectrum]:
    if batch[0].values is None:
        return [_factored_spectrum(d, device) for d in batch]
    values = [d.values for d in batch if d.values is not None]
    x = (values[0].unsqueeze(0) if len(values) == 1 else torch.stack(values)).to(device)
    energy = torch.linalg.vector_norm(x, dim=(-2, -1), dtype=torch.float64).square().cpu().numpy()
    if precision == "exact":
        driver = "gesvd" if device.type == "cuda" else None
        s, methods = torch.linalg.svdvals(x.double(), driver=driver).cpu().numpy(), ["svd-f64"] * len(batch)
    else:
        s, methods = _fast_values(x)
    return [
        Spectrum(d.name, d.shape, s[i], float(energy[i]), d.base_norm, d.dtype, d.noise_energy, methods[i])
        for i, d in enumerate(batch)
    ]


def gram_values(x: torch.Tensor) -> torch.Tensor:
    """σ of each matrix in `x` (b, m, n) from the eigenvalues of its smaller Gram matrix, float64, descending."""
    if x.shape[-2] > x.shape[-1]:
        x = x.mT
    lam: torch.Tensor = torch.linalg.eigvalsh(x @ x.mT)
    return lam.flip(-1).clamp_min(0).double().sqrt()


def _fast_values(x: torch.Tensor) -> tuple[np.ndarray, list[str]]:
    """float32 Gram route, with float64 redone for matrices whose σ tail falls below float32's resolution."""
    s = gram_values(x.float()).cpu().numpy()
    k = s.shape[-1]
    floor = np.sqrt(np.sqrt(k) * U32) * s[:, :1]
    low_rank = np.count_nonzero(s < floor, axis=-1) > LOW_RANK_SHARE * k
    methods = ["gram-f64" if redo else "gram-f32" for redo in low_rank]
    for i in np.flatnonzero(low_rank):
        s[i] = gram_values(x[i : i + 1].double()).cpu().numpy()[0]
    return s, methods


def _factored_spectrum(delta: Delta, device: torch.device) -> Spectrum:
    """σ(B A) = σ(R_B R_Aᵀ) with B = Q_B R_B and Aᵀ = Q_A R_A: an r×r SVD instead of an m×n one."""
    assert delta.factors is not None
    b, a = (f.to(device=device, dtype=torch.float64) for f in delta.factors)
    core = torch.linalg.qr(b, mode="r").R @ torch.linalg.qr(a.mT, mode="r").R.mT
    energy = float(torch.linalg.matrix_norm(core).square())
    s = torch.linalg.svdvals(core).cpu().numpy()
    d = delta
    return Spectrum(d.name, d.shape, s, energy, d.base_norm, d.dtype, d.noise_energy, "factored-f64")


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Cap torch's intra-op threads for the duration (on small shared machines fewer threads can be faster)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Keep float32 matmuls in full float32 (no TF32 / bf16 shortcuts) while spectra compute."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
