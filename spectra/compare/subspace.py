"""How much two fine-tunes' updates share: subspace similarity, principal angles, amplification (float64 numpy).

Definitions (README, "Comparing fine-tunes"; METHODS.md §5):
- Subspace similarity (Hu et al. 2021, "LoRA", Eq. 4): with U_A, U_B orthonormal singular vectors of ΔW_A and ΔW_B,
  φ(i, j) = ‖U_A[:, :i]ᵀ U_B[:, :j]‖_F² / min(i, j) ∈ [0, 1]: 1 when the smaller subspace lies in the larger, 0
  when they are orthogonal. Two independent uniformly random subspaces of a d-dimensional space have
  E‖U_iᵀ U_j‖_F² = i·j/d exactly, so E φ(i, j) = max(i, j)/d: the chance level.
- Principal angles between span U_A[:, :k] and span U_B[:, :k]: θ_l = arccos σ_l(U_Aᵀ U_B), ascending; small angles
  from the sines (σ of U_B − U_A U_Aᵀ U_B) so that they keep full precision (Björck & Golub 1973).
- Amplification (Hu et al. 2021 §7.3): with U_r, V_r the top-r singular vectors of ΔW and W the base weight,
  ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F: how strongly the update amplifies directions that W itself barely uses (21.5 for
  GPT-3's W_q at r = 4 in the paper).
"""

from __future__ import annotations

import math

import numpy as np


def subspace_similarity(u_a: np.ndarray, u_b: np.ndarray) -> np.ndarray:
    """Return φ(i, j) for i = 1..a, j = 1..b as an (a, b) float64 array (Hu et al. 2021, Eq. 4).

    Args:
        u_a: (d, a) orthonormal columns, the leading singular vectors of ΔW_A in order of σ.
        u_b: (d, b) the same for ΔW_B, in the same space (both left or both right vectors).
    """
    cos2 = np.square(u_a.T @ u_b)  # (a, b) squared cosines between single vectors
    total = np.cumsum(np.cumsum(cos2, axis=0), axis=1)  # total[i-1, j-1] = ‖U_A[:, :i]ᵀ U_B[:, :j]‖_F²
    i = np.arange(1, cos2.shape[0] + 1)[:, None]
    j = np.arange(1, cos2.shape[1] + 1)[None, :]
    return np.clip(total / np.minimum(i, j), 0.0, 1.0)


def chance_similarity(a: int, b: int, dim: int) -> np.ndarray:
    """E φ(i, j) = max(i, j)/d for independent uniformly random subspaces, as an (a, b) array.

    Args:
        a, b: grid size (numbers of vectors on each side).
        dim: d, the dimension of the space the vectors live in (columns of ΔW for right vectors, rows for left).
    """
    i = np.arange(1, a + 1)[:, None]
    j = np.arange(1, b + 1)[None, :]
    return np.minimum(np.maximum(i, j) / dim, 1.0).astype(np.float64)


def principal_angles(u_a: np.ndarray, u_b: np.ndarray) -> np.ndarray:
    """Return the min(a, b) principal angles between span(u_a) and span(u_b), in degrees, ascending.

    Args:
        u_a: (d, a) orthonormal columns; u_b: (d, b) orthonormal columns.
    """
    if u_a.shape[1] < u_b.shape[1]:
        u_a, u_b = u_b, u_a  # project the smaller basis onto the larger one
    cross = u_a.T @ u_b  # (a, b), a ≥ b
    cos = np.clip(np.linalg.svd(cross, compute_uv=False), 0.0, 1.0)  # descending: angles ascending
    residual = u_b - u_a @ cross  # the part of span(u_b) outside span(u_a)
    sin = np.clip(np.linalg.svd(residual, compute_uv=False)[::-1], 0.0, 1.0)  # ascending, pairs with cos
    angles = np.where(cos * cos < 0.5, np.arccos(cos), np.arcsin(sin))
    return np.asarray(np.degrees(np.sort(angles)), dtype=np.float64)


def projected_norm(u_r: np.ndarray, vt_r: np.ndarray, w_u: np.ndarray, w_s: np.ndarray, w_vt: np.ndarray) -> float:
    """Return ‖U_rᵀ W V_r‖_F with W = w_u·diag(w_s)·w_vt given by its singular triplets (W is never formed).

    Args:
        u_r: (m, r) left singular vectors of ΔW; vt_r: (r, n) its right singular vectors (rows).
        w_u: (m, p), w_s: (p,), w_vt: (p, n): the singular triplets of the base weight W (all of its non-zero ones).
    """
    core = (u_r.T @ w_u) * w_s @ (w_vt @ vt_r.T)  # (r, r) = U_rᵀ U_W Σ_W V_Wᵀ V_r
    return float(np.linalg.norm(core))


def amplification(delta_norm: float, projected: float) -> float | None:
    """‖ΔW‖_F / ‖U_rᵀ W V_r‖_F (Hu et al. 2021 §7.3); None when W has no component there (projected = 0)."""
    return delta_norm / projected if projected > 0.0 and math.isfinite(projected) else None
