"""spectrum: σ against float64 LAPACK (scipy), fast == exact on every energy quantity, batching, factored deltas."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import planted_matrix, planted_spectra, requires_cuda
from spectra import Options
from spectra.metrics import captured_energy, energy_rank, stable_rank
from spectra.records import Delta, Spectrum
from spectra.spectrum import compute_spectra, resolve_device

SHAPES = [(64, 48), (48, 64), (96, 96)]


def dense(name: str, x: np.ndarray, dtype: torch.dtype = torch.float32) -> Delta:
    return Delta(name, (x.shape[0], x.shape[1]), torch.from_numpy(x).to(dtype), None, 1.0, "f32", 0.0)


def run(deltas: list[Delta], **options: object) -> list[Spectrum]:
    return list(compute_spectra(iter(deltas), Options(**options), torch.device("cpu")))  # type: ignore[arg-type]


def test_exact_matches_scipy_float64_svd() -> None:
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal(shape) for shape in SHAPES]
    spectra = run([dense(str(i), x, torch.float64) for i, x in enumerate(xs)], precision="exact")
    for x, sp in zip(xs, spectra, strict=True):
        ref = scipy.linalg.svdvals(x)
        assert sp.method == "svd-f64" and sp.s.dtype == np.float64 and sp.s.shape == ref.shape
        np.testing.assert_allclose(sp.s, ref, rtol=0, atol=1e-12 * ref[0])
        assert sp.energy == pytest.approx(float(np.sum(x * x)), rel=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["rank8", "geometric", "power", "step"])
def test_fast_and_exact_agree_on_every_energy_quantity(shape: tuple[int, int], kind: str) -> None:
    s = planted_spectra(min(shape))[kind]
    x = planted_matrix(shape, s, np.random.default_rng(1))
    fast, exact = run([dense("m", x)])[0], run([dense("m", x)], precision="exact")[0]
    for tau in (0.5, 0.8, 0.9, 0.99):
        assert energy_rank(fast.s, tau, fast.energy) == energy_rank(exact.s, tau, exact.energy)
    ranks = [1, 4, 8, 16, 32]
    np.testing.assert_allclose(list(captured_energy(fast.s, ranks, fast.energy).values()),
                               list(captured_energy(exact.s, ranks, exact.energy).values()), atol=1e-6)
    assert stable_rank(fast.s, fast.energy) == pytest.approx(stable_rank(exact.s, exact.energy), rel=1e-5)
    # both recover the planted σ (float32 storage of ΔW limits this to ~1e-6·σ1)
    ref = np.sort(s)[::-1]
    np.testing.assert_allclose(exact.s, ref, atol=2e-6 * ref[0])


def test_fast_resolves_large_singular_values_to_float32_accuracy() -> None:
    """On a flat spectrum (no float64 redo), σ ≥ 0.03·σ1 are within 1e-4 relative of float64 LAPACK."""
    x = np.random.default_rng(2).standard_normal((200, 300))
    fast = run([dense("g", x)])[0]
    ref = scipy.linalg.svdvals(x.astype(np.float32).astype(np.float64))
    assert fast.method == "gram-f32"
    big = ref >= 0.03 * ref[0]
    np.testing.assert_allclose(fast.s[big], ref[big], rtol=1e-4)
    np.testing.assert_allclose(fast.s, ref, atol=3e-3 * ref[0])


def test_numerically_low_rank_delta_is_redone_in_float64() -> None:
    """A rank-8 ΔW has a zero tail that float32 Gram would report as ~5e-4·σ1; the redo resolves it."""
    x = planted_matrix((120, 80), planted_spectra(80)["rank8"], np.random.default_rng(3))
    fast = run([dense("r8", x)])[0]
    ref = scipy.linalg.svdvals(x.astype(np.float32).astype(np.float64))
    assert fast.method == "gram-f64"
    np.testing.assert_allclose(fast.s, ref, atol=1e-6 * ref[0])


def test_batches_give_the_same_spectra_as_single_matrices_in_input_order() -> None:
    rng = np.random.default_rng(4)
    deltas = [dense(f"m{i}", rng.standard_normal((32, 24))) for i in range(7)]
    deltas.insert(3, dense("odd", rng.standard_normal((24, 32))))
    one_by_one = run(deltas, batch_bytes=1)
    batched = run(deltas, batch_bytes=10**9)
    assert [s.name for s in batched] == [d.name for d in deltas] == [s.name for s in one_by_one]
    for a, b in zip(one_by_one, batched, strict=True):
        np.testing.assert_allclose(a.s, b.s, rtol=1e-5, atol=1e-6 * a.s[0])


def test_factored_delta_matches_the_dense_product() -> None:
    rng = np.random.default_rng(5)
    b, a = rng.standard_normal((70, 6)) * 3, rng.standard_normal((6, 50))
    delta = Delta("f", (70, 50), None, (torch.from_numpy(b).float(), torch.from_numpy(a).float()), None, "f32", 0.0)
    sp = run([delta])[0]
    ref = scipy.linalg.svdvals(b.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64))
    assert sp.method == "factored-f64" and len(sp.s) == 6
    np.testing.assert_allclose(sp.s, ref[:6], rtol=1e-10)
    assert sp.energy == pytest.approx(float(np.sum(ref**2)), rel=1e-10)


def test_reader_errors_reach_the_caller() -> None:
    def deltas() -> Iterator[Delta]:
        yield dense("ok", np.ones((4, 4)))
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        list(compute_spectra(deltas(), Options(), torch.device("cpu")))


def test_threads_option_is_restored() -> None:
    before = torch.get_num_threads()
    run([dense("m", np.eye(8))], threads=1)
    assert torch.get_num_threads() == before


def test_auto_device_without_gpu_is_cpu() -> None:
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_cuda_matches_cpu(precision: str) -> None:
    rng = np.random.default_rng(6)
    deltas = [dense(f"m{i}", planted_matrix((256, 192), planted_spectra(192)[k], rng))
              for i, k in enumerate(["power", "rank8", "step"])]
    cpu = run(deltas, precision=precision)
    gpu = list(compute_spectra(iter(deltas), Options(precision=precision), torch.device("cuda")))
    for a, b in zip(cpu, gpu, strict=True):
        np.testing.assert_allclose(a.s, b.s, atol=1e-6 * a.s[0])
        for tau in (0.5, 0.9, 0.99):
            assert energy_rank(a.s, tau, a.energy) == energy_rank(b.s, tau, b.energy)
