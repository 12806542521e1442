"""Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence").

A leading left singular vector y_j (j ≤ k) of the fine-tuned weight W_tuned is an intruder when it is nearly
orthogonal to every left singular vector x_i of the base weight W_base: max_i |cos(y_j, x_i)| < ε. The paper, and
PEFT's own helper (peft/tuners/lora/intruders.py, `reduce_intruder_dimension`: `U_base` and `U_merged` from
`torch.linalg.svd(W)` and `svd(W + ΔW)`, `(U_merged.T @ U_base).abs().max(dim=1)` over *all* min(m, n) base vectors,
intruders = the indices among the first `top_k` = 10 below `threshold_epsilon` = 0.5) use the same definition; so
does this module (k = 10 and ε = 0.5 by default, float64 instead of PEFT's float32).

The base vectors x_i are those of W_base's numerically non-zero singular values; PEFT also counts the arbitrary
completion vectors of an exactly rank-deficient W_base, which only matters for a rank-deficient base weight.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def max_cosines(u_tuned: np.ndarray, u_base: np.ndarray) -> np.ndarray:
    """Return, for each column y_j of `u_tuned`, max_i |cos(y_j, x_i)| over the columns x_i of `u_base`, shape (k,).

    Args:
        u_tuned: (m, k) the leading left singular vectors of W_tuned, unit columns.
        u_base: (m, p) the left singular vectors of W_base, unit columns (all of them: p = rank of W_base).
    """
    return np.asarray(np.abs(u_tuned.T @ u_base).max(axis=1), dtype=np.float64)


def intruder_counts(max_cos: np.ndarray, epsilons: Sequence[float]) -> dict[float, int]:
    """ε -> number of vectors whose largest |cosine| with the base's vectors is below ε (strictly, as PEFT)."""
    return {float(eps): int(np.count_nonzero(max_cos < eps)) for eps in epsilons}


def top_left_vectors(w: np.ndarray, k: int) -> np.ndarray:
    """The leading min(k, m, n) left singular vectors of a dense float64 matrix w (m, n), in order of σ.

    Used where W_tuned is rebuilt from factors (W_base's triplets + an adapter's ΔW) instead of read from a file.
    Gram route with one Rayleigh–Ritz step, as the engine's TopK("gram") (spectra/engine/topk.py): eigenvectors of
    the smaller Gram matrix, then a thin SVD of w's product with them, so both sides are orthonormal to rounding.
    """
    m, n = w.shape
    kk = min(k, m, n)
    if m <= n:
        u0 = np.linalg.eigh(w @ w.T)[1][:, ::-1][:, :kk]  # top-kk left subspace
        _, _, qt = np.linalg.svd(w.T @ u0, full_matrices=False)  # wᵀ(u0 Q) = P Σ: u0 Q are the left vectors
        return np.ascontiguousarray(u0 @ qt.T)
    v0 = np.linalg.eigh(w.T @ w)[1][:, ::-1][:, :kk]  # top-kk right subspace
    p, _, _ = np.linalg.svd(w @ v0, full_matrices=False)
    return np.ascontiguousarray(p)
