"""The linear algebra of singular values, and nothing else: σ of dense stacks and of factored deltas.

Methods (kernels.Values picks one per its `precision`):
- exact: float64 values-only SVD (LAPACK gesdd on the CPU, cuSOLVER gesvd on CUDA), wide matrices transposed.
- fast: eigenvalues of the Gram matrix on the smaller side (ΔWΔWᵀ or ΔWᵀΔW) in float32, negative eigenvalues
  clamped, σ = √λ. Energies (ranks, captured energy, stable rank) match exact. Squaring costs the small σ: an
  eigenvalue error δ ≲ √k·u₃₂·σ₁² becomes an absolute σ error √δ, at worst √(√k·u₃₂)·σ₁ (1.4e-3·σ₁ at k = 1024;
  typically 1e-6–1e-4·σ₁ on full-rank ΔW). The Gram matrix is positive semi-definite, so its negative computed
  eigenvalues are pure rounding error and show δ on each matrix: when more than 1% of the eigenvalues lie
  within 2δ of zero (a numerically low-rank ΔW, whose tail would be noise on log plots and in effective rank),
  the matrix is recomputed with a float64 Gram matrix (σ error ~√(√k·u₆₄)·σ₁ ≈ 1e-7·σ₁). For k ≤ 256, where the
  redo is cheap, σ under the worst-case floor also count as unresolved.
- factored (adapters, ΔW = B A): QR of B and Aᵀ, then the SVD of the r×r core, float64; ΔW is never formed.
‖ΔW‖_F² is always computed directly from ΔW (or the core), in float64, not from σ.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import platform
from collections.abc import Callable, Iterator
from typing import Final

import numpy as np
import torch

log = logging.getLogger(__name__)

U32: Final = 2.0**-24  # float32 unit roundoff
LOW_RANK_SHARE: Final = 0.01  # recompute in float64 when more than this share of σ is unresolved in float32
SMALL_K: Final = 256  # up to this Gram size the float64 redo is cheap: also redo on the worst-case floor
GRAM_BLOCKS: Final = 8  # row blocks of the lower-triangle Gram product (9/16 of the full product's work)
GRAM_BLOCKS_FROM: Final = 256  # smaller Gram matrices are formed in one product
ONEDNN_CHUNK_BYTES: Final = 8 * 2**20  # rows of a tall matrix transposed at a time for oneDNN's a·wᵀ
ENERGY_CHUNK: Final = {"cpu": 2**16, "cuda": 2**24}  # elements upcast to float64 at a time for ‖ΔW‖_F²


def frobenius_energy(x: torch.Tensor) -> torch.Tensor:
    """‖X‖_F² of each matrix in `x` (b, m, n), summed in float64, upcasting ENERGY_CHUNK elements at a time.

    Small chunks on the CPU keep the float64 copies out of the allocator's large-block path (no page churn).
    """
    energy = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    step = ENERGY_CHUNK.get(x.device.type, ENERGY_CHUNK["cuda"])
    for i, matrix in enumerate(x.reshape(x.shape[0], -1)):
        for chunk in matrix.split(step):
            energy[i] += torch.linalg.vector_norm(chunk, dtype=torch.float64).square()
    return energy


def exact_values(x: torch.Tensor) -> torch.Tensor:
    """σ of each matrix in `x` (b, m, n) by float64 values-only SVD, descending.

    Wide matrices are transposed first: σ(X) = σ(Xᵀ), and LAPACK's gesdd is several times slower on m < n.
    """
    if x.shape[-2] < x.shape[-1]:
        x = x.mT
    x = x.to(torch.float64).contiguous()
    driver = "gesvd" if x.device.type == "cuda" else None
    s: torch.Tensor = torch.linalg.svdvals(x, driver=driver)
    return s


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """The lower triangle of the smaller Gram matrix of each matrix in `x` (b, m, n); above the diagonal only the
    diagonal blocks are filled, the rest is zero.

    XXᵀ (b, m, m) if m ≤ n, else XᵀX (b, n, n): only what eigvalsh reads (UPLO="L"), as GRAM_BLOCKS row blocks
    (block i times blocks 0..i), which takes (B+1)/2B of the multiply-adds of the full product. float32 on an x86
    CPU goes through oneDNN when torch has it (see `_onednn_linear`).
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and _onednn_linear() is not None:
        return torch.stack([_onednn_gram(matrix) for matrix in x]) if x.shape[0] > 1 else _onednn_gram(x[0])[None]
    if x.shape[-2] > x.shape[-1]:
        x = x.mT
    k = x.shape[-2]
    gram = x.new_zeros((*x.shape[:-2], k, k))
    for lo, hi in _row_blocks(k):
        torch.matmul(x[..., lo:hi, :], x[..., :hi, :].mT, out=gram[..., lo:hi, :hi])
    return gram


def _row_blocks(k: int) -> list[tuple[int, int]]:
    blocks = GRAM_BLOCKS if k >= GRAM_BLOCKS_FROM else 1
    return list(itertools.pairwise([k * i // blocks for i in range(blocks + 1)]))


def _onednn_gram(x: torch.Tensor) -> torch.Tensor:
    """Lower triangle of the smaller Gram matrix of one float32 CPU matrix (m, n), by oneDNN's linear (a·wᵀ).

    The operands must be row-major: a wide X gives its row blocks directly; a tall X is taken ONEDNN_CHUNK_BYTES
    of rows at a time, each chunk transposed into a small contiguous copy, and the chunks' products summed
    (XᵀX = Σ X_cᵀX_c), so no transposed copy of the whole matrix is ever made.
    """
    linear = _onednn_linear()
    assert linear is not None
    m, n = x.shape
    k = min(m, n)
    gram = x.new_zeros((k, k))
    if m <= n:
        x = x.contiguous()
        for lo, hi in _row_blocks(k):
            gram[lo:hi, :hi] = linear(x[lo:hi], x[:hi])
        return gram
    step = max(1, ONEDNN_CHUNK_BYTES // (n * x.element_size()))
    for start in range(0, m, step):
        chunk = x[start : start + step].mT.contiguous()
        for lo, hi in _row_blocks(k):
            gram[lo:hi, :hi] += linear(chunk[lo:hi], chunk[:hi])
    return gram


@functools.cache
def _onednn_linear() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """a·wᵀ for float32 CPU matrices through oneDNN, or None where that is not available or not exact float32.

    On x86 CPUs oneDNN's float32 matrix product runs at the AVX-512 peak where the BLAS torch links (MKL) may not
    (2.2× on an AMD EPYC with AVX-512). torch reaches it only through a private operator, the one torch.compile's
    CPU backend emits, so it is checked once against float64 (a missing operator, or a reduced-precision math
    mode, falls back to torch.matmul).
    """
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise

        def linear(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = op(a, w, None, "none", [None], "")
            return out

        probe = torch.linspace(-1.0, 1.0, 96 * 40).reshape(96, 40).sin()
        got, want = linear(probe, probe[:48]).double(), probe.double() @ probe[:48].double().mT
        ok = bool(torch.allclose(got, want, rtol=0.0, atol=1e-5))
    except Exception as exc:
        log.info("oneDNN float32 matmul unavailable (%s); using torch.matmul", exc)
        return None
    if not ok:
        log.info("oneDNN float32 matmul is not exact float32 here; using torch.matmul")
        return None
    return linear


def gram_eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvalues λ of Gram matrices (b, k, k) from their lower triangle, descending, not clamped (negative λ are
    rounding error)."""
    lam: torch.Tensor = torch.linalg.eigvalsh(gram, UPLO="L")
    return lam.flip(-1)


def sigma_from_eigenvalues(lam: torch.Tensor) -> torch.Tensor:
    """σ = √max(λ, 0), float64."""
    return lam.clamp_min(0).double().sqrt()


def gram_sigma(gram: torch.Tensor) -> torch.Tensor:
    """σ = √λ from the eigenvalues λ of Gram matrices (b, k, k), negative λ clamped to 0, float64, descending."""
    return sigma_from_eigenvalues(gram_eigenvalues(gram))


def gram_values(x: torch.Tensor) -> torch.Tensor:
    """σ of each matrix in `x` (b, m, n) from the eigenvalues of its smaller Gram matrix, float64, descending."""
    return gram_sigma(gram_matrix(x))


def unresolved(lam: np.ndarray) -> np.ndarray:
    """Per row of float32 Gram eigenvalues (b, k), descending and unclamped: True when the σ tail needs float64.

    δ = −min(λ, 0) is the rounding error seen on this matrix (a Gram matrix has no negative eigenvalues); a row is
    unresolved when more than LOW_RANK_SHARE of its λ lie at or below 2δ. When k ≤ SMALL_K, λ under the
    worst-case floor √k·u₃₂·λ₁ count as well (the float64 redo costs little there, and a handful of unresolved λ
    may by chance all round upwards).
    """
    lam = np.asarray(lam, dtype=np.float64)
    k = lam.shape[-1]
    delta = np.maximum(-lam[:, -1:], 0.0)
    count = np.where(delta[:, 0] > 0, np.count_nonzero(lam <= 2 * delta, axis=-1), 0)
    if k <= SMALL_K:
        count = np.maximum(count, np.count_nonzero(lam < np.sqrt(k) * U32 * lam[:, :1], axis=-1))
    return np.asarray(count > LOW_RANK_SHARE * k)


def fast_values(x: torch.Tensor, gemm_threads: int | None = None) -> tuple[np.ndarray, list[str]]:
    """float32 Gram route, with float64 redone for matrices whose σ tail float32 does not resolve.

    Args:
        x: the matrices (b, m, n).
        gemm_threads: CPU only: threads for the Gram products; the eigensolver then runs on one thread.
    """
    eig_threads = None if gemm_threads is None else 1
    with cpu_threads(gemm_threads):
        gram = gram_matrix(x.float())
    with cpu_threads(eig_threads):
        lam = gram_eigenvalues(gram)
    del gram
    s = sigma_from_eigenvalues(lam).cpu().numpy()
    low_rank = unresolved(lam.double().cpu().numpy())
    methods = ["gram-f64" if redo else "gram-f32" for redo in low_rank]
    for i in np.flatnonzero(low_rank):
        with cpu_threads(gemm_threads):
            gram = gram_matrix(x[i : i + 1].double())
        with cpu_threads(eig_threads):
            s[i] = gram_sigma(gram).cpu().numpy()[0]
    return s, methods


def factored_values(b: torch.Tensor, a: torch.Tensor) -> tuple[np.ndarray, float]:
    """σ(B A) = σ(R_B R_Aᵀ) with B = Q_B R_B and Aᵀ = Q_A R_A (an r×r SVD instead of an m×n one), and ‖B A‖_F².

    Args:
        b: (m, r); a: (r, n); any float dtype and device (computed in float64 there).
    """
    b, a = b.to(torch.float64), a.to(torch.float64)
    core = torch.linalg.qr(b, mode="r").R @ torch.linalg.qr(a.mT, mode="r").R.mT
    return torch.linalg.svdvals(core).cpu().numpy(), float(torch.linalg.matrix_norm(core).square())


@contextlib.contextmanager
def cpu_threads(n: int | None) -> Iterator[None]:
    """Cap torch's intra-op threads of the calling thread for the duration (None: leave them)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """Keep float32 matmuls in full float32 (no TF32 / bf16 shortcuts) while spectra compute."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)
