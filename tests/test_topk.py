"""TopK kernel: the leading singular triplets against scipy's float64 SVD, on planted spectra (σ chosen up front,
Haar-random U and V), dense (Gram route and full SVD) and factored; CUDA compared with the CPU."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import planted_matrix, requires_cuda, save_checkpoint
from spectra import OptionsError
from spectra.engine.executor import run
from spectra.engine.kernels import TopK
from spectra.engine.local import LocalExecutor
from spectra.io.checkpoint import open_checkpoint
from spectra.io.tensors import Handles
from spectra.plan.dense import plan_weights
from spectra.plan.jobs import Job
from spectra.records import Delta, Factors, Resources, Skipped

METHODS = ["gram", "svd"]
SHAPES = [(120, 80), (80, 120), (90, 90)]


def dense(x: np.ndarray, name: str = "w") -> Delta:
    return Delta(name, (x.shape[0], x.shape[1]), torch.from_numpy(x), None, None, "f64", 0.0)


def factored(b: np.ndarray, a: np.ndarray) -> Delta:
    return Delta("f", (b.shape[0], a.shape[1]), None, (torch.from_numpy(b), torch.from_numpy(a)), None, "f32", 0.0)


def top(delta: Delta, k: int, method: str = "gram") -> Factors:
    (result,) = TopK(k, method).compute([delta])
    return result


def spread(n: int, smallest: float) -> np.ndarray:
    """n singular values falling geometrically from 1 to `smallest` (distinct: gaps of the same ratio)."""
    return np.geomspace(1.0, smallest, n)


def assert_orthonormal(f: Factors) -> None:
    r = len(f.s)
    np.testing.assert_allclose(f.u.T @ f.u, np.eye(r), atol=1e-10)
    np.testing.assert_allclose(f.vt @ f.vt.T, np.eye(r), atol=1e-10)


def assert_matches_svd(f: Factors, x: np.ndarray, vectors_above: float = 1e-3) -> None:
    """σ within 1e-6 relative above 1e-3·σ₁, vectors (up to sign) within 1e-6 above `vectors_above`·σ₁."""
    u_ref, s_ref, vt_ref = scipy.linalg.svd(x, full_matrices=False)
    r = len(f.s)
    assert f.s.dtype == f.u.dtype == f.vt.dtype == np.float64
    assert f.u.shape == (x.shape[0], r) and f.vt.shape == (r, x.shape[1])
    big = s_ref[:r] >= 1e-3 * s_ref[0]
    np.testing.assert_allclose(f.s[big], s_ref[:r][big], rtol=1e-6)
    np.testing.assert_allclose(f.s, s_ref[:r], rtol=0, atol=1e-12 * s_ref[0])
    assert np.all(np.diff(f.s) <= 0) and np.all(f.s > 0)
    sure = s_ref[:r] >= vectors_above * s_ref[0]
    signs = np.sign(np.sum(f.u * u_ref[:, :r], axis=0))
    np.testing.assert_allclose((f.u * signs)[:, sure], u_ref[:, :r][:, sure], atol=1e-6)
    np.testing.assert_allclose((f.vt * signs[:, None])[sure], vt_ref[:r][sure], atol=1e-6)
    assert f.energy == pytest.approx(float(np.sum(x * x)), rel=1e-12)
    assert_orthonormal(f)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_planted_spread_spectrum_matches_float64_svd(method: str, shape: tuple[int, int]) -> None:
    """σ from 1 down to 1e-6 (a quarter of them under 1e-3·σ₁): values and vectors match LAPACK."""
    s = spread(min(shape), 1e-6)
    x = planted_matrix(shape, s, np.random.default_rng(0))
    f = top(dense(x), 30, method)
    assert len(f.s) == 30 and f.method == f"{method}-f64"
    np.testing.assert_allclose(f.s, s[:30], rtol=1e-9)  # the planted answer, known before any SVD ran
    assert_matches_svd(f, x)
    full = top(dense(x), min(shape), method)
    assert_matches_svd(full, x)


@pytest.mark.parametrize("shape", SHAPES)
def test_gram_route_resolves_a_deep_tail_without_dividing_by_tiny_sigma(shape: tuple[int, int]) -> None:
    """σ falling to 1e-13·σ₁: the Gram eigenvalues of the tail are rounding noise, yet σ above 1e-3·σ₁ stay within
    1e-6, all triplets are finite and orthonormal, and what is kept is numerically non-zero."""
    x = planted_matrix(shape, spread(min(shape), 1e-13), np.random.default_rng(1))
    f = top(dense(x), min(shape))
    assert np.all(np.isfinite(f.u)) and np.all(np.isfinite(f.vt))
    assert_matches_svd(f, x, vectors_above=1e-3)
    assert f.s[-1] > max(shape) * np.finfo(np.float64).eps * f.s[0]


@pytest.mark.parametrize("method", METHODS)
def test_k_beyond_the_rank_is_trimmed_to_the_rank(method: str) -> None:
    """A rank-8 ΔW with eight equal σ: any k ≥ 8 gives exactly its 8 directions; the subspace, not the individual
    vectors, is defined (principal angles with LAPACK's ≈ 0)."""
    x = planted_matrix((100, 70), np.ones(8) * 3.0, np.random.default_rng(2))
    u_ref, _, vt_ref = scipy.linalg.svd(x, full_matrices=False)
    for k in (8, 20, 70, 1000):
        f = top(dense(x), k, method)
        assert len(f.s) == 8
        np.testing.assert_allclose(f.s, 3.0, rtol=1e-12)
        assert np.max(scipy.linalg.subspace_angles(f.u, u_ref[:, :8])) < 1e-8
        assert np.max(scipy.linalg.subspace_angles(f.vt.T, vt_ref[:8].T)) < 1e-8
        assert_orthonormal(f)
    assert len(top(dense(x), 3, method).s) == 3


@pytest.mark.parametrize("method", METHODS)
def test_k_at_or_above_min_shape_reconstructs_the_matrix(method: str) -> None:
    x = np.random.default_rng(3).standard_normal((60, 40))
    for k in (40, 41, 10_000):
        f = top(dense(x), k, method)
        assert len(f.s) == 40
        np.testing.assert_allclose((f.u * f.s) @ f.vt, x, atol=1e-12 * np.abs(x).max() * 60)


@pytest.mark.parametrize(("m", "n", "r"), [(90, 70, 6), (40, 120, 12), (30, 20, 25)])
def test_factored_topk_matches_the_svd_of_the_product(m: int, n: int, r: int) -> None:
    """ΔW = B A with non-orthogonal factors (B = U diag(σ) M, A = M⁻¹ Vᵀ): triplets of B A without forming it."""
    rng = np.random.default_rng(4)
    k = min(r, m, n)
    x = planted_matrix((m, n), spread(k, 1e-5), rng)
    u, s, vt = scipy.linalg.svd(x, full_matrices=False)
    mix = rng.standard_normal((k, k)) + 3 * np.eye(k)
    b, a = (u[:, :k] * s[:k]) @ mix, np.linalg.solve(mix, vt[:k])
    if r > k:  # more factor columns than the product's rank (r > min(m, n))
        b, a = np.hstack([b, np.zeros((m, r - k))]), np.vstack([a, rng.standard_normal((r - k, n))])
    for want in (3, k, r + 5):
        f = top(factored(b, a), want)
        assert f.method == "factored-f64" and len(f.s) == min(want, k)
        assert_matches_svd(f, b @ a)


def test_engine_runs_topk_on_raw_weights_from_a_checkpoint(tmp_path: Path) -> None:
    """Through the public seams: plan_weights → run(TopK) → (job, Factors), on the weights as stored (float32)."""
    rng = np.random.default_rng(5)
    weights = {
        "a.weight": torch.from_numpy(planted_matrix((64, 48), spread(48, 1e-4), rng)).float(),
        "b.weight": torch.from_numpy(planted_matrix((32, 80), spread(32, 1e-4), rng)).float(),
        "zero.weight": torch.zeros(8, 8),
        "norm.weight": torch.ones(64),
    }
    with open_checkpoint(str(save_checkpoint(weights, tmp_path / "w"))) as ck:
        plan = plan_weights(ck)
    assert [s.name for s in plan.skipped] == ["norm.weight"]
    results = dict((job.name, result) for job, result in run(plan.jobs, TopK(10), LocalExecutor()))
    zero = results.pop("zero.weight")
    assert isinstance(zero, Skipped) and zero.reason == "unchanged"
    for name, f in results.items():
        assert isinstance(f, Factors) and f.name == name and len(f.s) == 10 and f.base_norm is None
        assert_matches_svd(f, weights[name].double().numpy())


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 30),
    n=st.integers(1, 30),
    k=st.integers(1, 40),
    method=st.sampled_from(METHODS),
    seed=st.integers(0, 2**16),
)
def test_topk_is_the_best_rank_k_approximation(m: int, n: int, k: int, method: str, seed: int) -> None:
    """Eckart–Young: ‖ΔW − U_k Σ_k V_kᵀ‖_F² = Σ_{i>k} σᵢ², with orthonormal U_k, V_k (Gaussian ΔW: full rank)."""
    x = np.random.default_rng(seed).standard_normal((m, n))
    f = top(dense(x), k, method)
    s_ref = scipy.linalg.svdvals(x)
    assert len(f.s) == min(k, m, n)
    assert_orthonormal(f)
    residual = float(np.sum((x - (f.u * f.s) @ f.vt) ** 2))
    assert residual == pytest.approx(float(np.sum(s_ref[len(f.s) :] ** 2)), rel=1e-8, abs=1e-20 + 1e-24 * f.energy)


def test_kernel_settings_are_validated_and_picklable() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(OptionsError, match="k must be a positive integer"):
            TopK(bad)  # type: ignore[arg-type]
    with pytest.raises(OptionsError, match="method"):
        TopK(4, "lanczos")
    kernel = TopK(16, "svd")
    assert pickle.loads(pickle.dumps(kernel)) == kernel and kernel.wide
    assert kernel.result_nbytes((100, 30)) == 8 * 16 * 131 and TopK(64).result_nbytes((100, 30)) == 8 * 30 * 131


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method: str) -> None:
    """Stacked on the GPU (same-shape batch) vs one by one on the CPU: σ within 1e-9 and the same subspaces."""
    rng = np.random.default_rng(7)
    xs = [planted_matrix((256, 192), spread(192, 1e-6), rng) for _ in range(3)]
    xs.append(planted_matrix((256, 192), np.ones(8), rng))
    deltas = {f"m{i}": dense(x, f"m{i}") for i, x in enumerate(xs)}

    def materialize(job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
        return deltas[job.name]

    from test_spectrum import job

    jobs = [job(name, d.shape) for name, d in deltas.items()]
    cpu = [r for _, r in LocalExecutor(materialize=materialize).run(jobs, TopK(24, method))]
    gpu = [r for _, r in LocalExecutor(Resources("cuda"), materialize=materialize).run(jobs, TopK(24, method))]
    for a, b in zip(cpu, gpu, strict=True):
        assert isinstance(a, Factors) and isinstance(b, Factors) and len(a.s) == len(b.s)
        np.testing.assert_allclose(a.s, b.s, rtol=1e-9)
        assert np.max(scipy.linalg.subspace_angles(a.u, b.u)) < 1e-6
        assert np.max(scipy.linalg.subspace_angles(a.vt.T, b.vt.T)) < 1e-6
        assert_orthonormal(b)


@requires_cuda
@pytest.mark.gpu
def test_cuda_factored_matches_cpu() -> None:
    rng = np.random.default_rng(8)
    b, a = rng.standard_normal((300, 16)), rng.standard_normal((16, 200))
    cpu = top(factored(b, a), 10)
    (gpu,) = TopK(10).compute(
        [Delta("f", (300, 200), None, (torch.from_numpy(b).cuda(), torch.from_numpy(a).cuda()), None, "f32", 0.0)]
    )
    np.testing.assert_allclose(gpu.s, cpu.s, rtol=1e-10)
    assert np.max(scipy.linalg.subspace_angles(gpu.u, cpu.u)) < 1e-8
