"""Values kernel × local executor: σ against float64 LAPACK (scipy), fast == exact on every energy quantity, CPU
workers, stacked batches, factored deltas, read-ahead and memory bounds. Matrices are handed to the executor by a
stand-in materialiser (the public `materialize` seam), so no checkpoint files are needed."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import planted_matrix, planted_spectra, requires_cuda
from spectra import Options
from spectra.analysis.metrics import captured_energy, energy_rank, stable_rank
from spectra.engine import sigma
from spectra.engine.kernels import Values
from spectra.engine.local import LocalExecutor, Materialize, resolve_device
from spectra.engine.sigma import SMALL_K, U32, frobenius_energy, full_float32, gram_matrix, unresolved
from spectra.io.header import TensorEntry
from spectra.io.tensors import Handles
from spectra.plan.jobs import Dense, Job
from spectra.records import Delta, Resources, Skipped, Spectrum

SHAPES = [(64, 48), (48, 64), (96, 96)]


def dense(name: str, x: np.ndarray, dtype: torch.dtype = torch.float32) -> Delta:
    return Delta(name, (x.shape[0], x.shape[1]), torch.from_numpy(x).to(dtype), None, 1.0, "f32", 0.0)


def job(name: str, shape: tuple[int, int]) -> Job:
    """A job whose tensor is never read: the stand-in materialisers below hand over the matrix."""
    entry = TensorEntry(name, shape, "F32", Path("/nonexistent.safetensors"), 0, 4 * shape[0] * shape[1])
    return Job(name, shape, Dense(entry, None, shape[0]))


def handing_over(deltas: Sequence[Delta]) -> tuple[list[Job], Materialize]:
    """Jobs for `deltas`, and a materialiser that returns each job's delta."""
    by_name = {d.name: d for d in deltas}

    def materialize(job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
        return by_name[job.name]

    return [job(d.name, d.shape) for d in deltas], materialize


def executor(materialize: Materialize, stacked: bool | None = None, **options: object) -> LocalExecutor:
    opts = Options(**options)  # type: ignore[arg-type]
    return LocalExecutor(Resources("cpu", opts.threads, opts.batch_bytes), stacked=stacked, materialize=materialize)


def run(deltas: list[Delta], stacked: bool | None = None, **options: object) -> list[Spectrum]:
    """The spectra of `deltas` from the local executor, checking it returns (job, result) in input order."""
    jobs, materialize = handing_over(deltas)
    got = list(executor(materialize, stacked, **options).run(jobs, Values(str(options.get("precision", "fast")))))
    assert [j for j, _ in got] == jobs and [r.name for _, r in got] == [j.name for j in jobs]
    spectra = [r for _, r in got]
    assert all(isinstance(sp, Spectrum) for sp in spectra)
    return spectra  # type: ignore[return-value]


@dataclass(frozen=True)
class Recording:
    """A kernel that delegates to Values and records the size of every batch it is given."""

    inner: Values
    sizes: list[int] = field(default_factory=list)

    @property
    def wide(self) -> bool:
        return self.inner.wide

    def compute(self, deltas: Sequence[Delta], threads: int | None = None) -> list[Spectrum]:
        self.sizes.append(len(deltas))
        return self.inner.compute(deltas, threads)

    def result_nbytes(self, shape: tuple[int, int]) -> int:
        return self.inner.result_nbytes(shape)


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
    np.testing.assert_allclose(
        list(captured_energy(fast.s, ranks, fast.energy).values()),
        list(captured_energy(exact.s, ranks, exact.energy).values()),
        atol=1e-6,
    )
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


def test_realistic_full_rank_delta_stays_float32_with_its_small_values_accurate() -> None:
    """Power-law signal plus 5% Gaussian noise, square: 3% of σ lie under the worst-case float32 floor (the old
    rule redid it in float64), yet float32 resolves them to 1e-4·σ1; effective and Gavish–Donoho ranks agree."""
    from spectra.analysis.metrics import effective_rank, gavish_donoho_rank

    rng = np.random.default_rng(7)
    k = 300
    s = np.zeros(k)
    s[:75] = 1.0 / np.arange(1, 76)
    signal = planted_matrix((k, k), s, rng)
    noise = rng.standard_normal((k, k))
    x = signal / np.linalg.norm(signal) + noise * np.sqrt(0.05 / 0.95) / np.linalg.norm(noise)
    ref = scipy.linalg.svdvals(x.astype(np.float32).astype(np.float64))
    assert np.count_nonzero(ref < np.sqrt(np.sqrt(k) * U32) * ref[0]) > 0.01 * k
    fast = run([dense("full", x)])[0]
    assert fast.method == "gram-f32"
    np.testing.assert_allclose(fast.s, ref, atol=1e-4 * ref[0])
    assert effective_rank(fast.s) == pytest.approx(effective_rank(ref), rel=1e-4)
    assert gavish_donoho_rank(fast.s, (k, k)) == gavish_donoho_rank(ref, (k, k))


def test_low_rank_delta_is_redone_in_float64_above_the_small_size_rule() -> None:
    """k = 300 > SMALL_K: only the negative-eigenvalue test can catch the rank-8 matrix's unresolved zero tail."""
    x = planted_matrix((400, 300), planted_spectra(300)["rank8"], np.random.default_rng(8))
    fast = run([dense("r8", x)])[0]
    ref = scipy.linalg.svdvals(x.astype(np.float32).astype(np.float64))
    assert min(x.shape) > SMALL_K and fast.method == "gram-f64"
    np.testing.assert_allclose(fast.s, ref, atol=1e-6 * ref[0])


def test_unresolved_counts_eigenvalues_within_twice_the_negative_rounding_error() -> None:
    k = 1000
    deep = 1.0 / np.arange(1, k + 1) ** 4  # positive all the way down to 1e-12, under √k·u·λ1: kept
    assert not unresolved(deep[None])[0]
    power = 1.0 / np.arange(1, k + 1) ** 2  # down to 1e-6
    noisy = power.copy()
    noisy[-20:] = np.linspace(1e-9, -1e-9, 20)  # 20 λ within rounding error of 0, half of them negative: 2% of k
    assert unresolved(noisy[None])[0]
    few = power.copy()
    few[-8:] = np.linspace(1e-9, -1e-9, 8)  # 0.8% of k: float32 is kept
    assert not unresolved(few[None])[0]
    edge = power.copy()
    edge[-12:] = np.linspace(2e-9, -1e-9, 12)  # 12 λ ≤ 2δ (1.2%), though only 4 are negative
    assert unresolved(edge[None])[0]
    assert list(unresolved(np.stack([deep, noisy, few, edge]))) == [False, True, False, True]
    small = 1.0 / np.arange(1, 101) ** 4  # k ≤ SMALL_K: under the worst-case floor counts even without negatives
    assert unresolved(small[None])[0]


@pytest.mark.parametrize("shape", [(300, 700), (700, 300), (40, 30)])
def test_gram_matrix_is_the_lower_triangle_of_the_smaller_gram_matrix(shape: tuple[int, int]) -> None:
    x = torch.from_numpy(np.random.default_rng(9).standard_normal((2, *shape)))
    g = gram_matrix(x).numpy()
    small = x.numpy() if shape[0] <= shape[1] else x.mT.numpy()
    full = small @ small.transpose(0, 2, 1)
    np.testing.assert_allclose(np.tril(g), np.tril(full), rtol=1e-12, atol=1e-12 * np.abs(full).max())
    lam = torch.linalg.eigvalsh(torch.from_numpy(g), UPLO="L").numpy()  # what the spectrum stage reads
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(full), atol=1e-10 * np.abs(full).max())


@pytest.mark.parametrize("route", ["onednn", "matmul"])
@pytest.mark.parametrize("shape", [(300, 700), (700, 300), (40, 30), (1000, 260)])
def test_float32_gram_matrix_on_either_cpu_route(
    monkeypatch: pytest.MonkeyPatch, route: str, shape: tuple[int, int]
) -> None:
    """float32 lower triangle within float32 rounding of the float64 product, by oneDNN (a tall matrix in chunks
    of 100 rows, the last one short) or by torch.matmul."""
    if route == "matmul":
        monkeypatch.setattr("spectra.engine.sigma._onednn_linear", lambda: None)
    elif sigma._onednn_linear() is None:
        pytest.skip("no oneDNN float32 matmul in this torch build / CPU")
    monkeypatch.setattr("spectra.engine.sigma.ONEDNN_CHUNK_BYTES", 100 * min(shape) * 4)
    x = torch.from_numpy(np.random.default_rng(9).standard_normal((1, *shape)))
    with full_float32():
        g = gram_matrix(x.float()).double().numpy()[0]
    small = x.numpy()[0] if shape[0] <= shape[1] else x.numpy()[0].T
    full = small @ small.T
    np.testing.assert_allclose(np.tril(g), np.tril(full), rtol=0, atol=20 * U32 * np.abs(full).max())


def test_frobenius_energy_sums_in_float64_across_chunks() -> None:
    x = torch.from_numpy(np.random.default_rng(10).standard_normal((2, 700, 300))).float()
    want = [float(np.sum(m.astype(np.float64) ** 2)) for m in x.numpy()]
    np.testing.assert_allclose(frobenius_energy(x).numpy(), want, rtol=1e-13)


def test_batches_give_the_same_spectra_as_single_matrices_in_input_order() -> None:
    rng = np.random.default_rng(4)
    deltas = [dense(f"m{i}", rng.standard_normal((32, 24))) for i in range(7)]
    deltas.insert(3, dense("odd", rng.standard_normal((24, 32))))
    for stacked in (False, True):
        one_by_one = run(deltas, stacked, batch_bytes=1)
        batched = run(deltas, stacked, batch_bytes=10**9)
        assert [s.name for s in batched] == [d.name for d in deltas] == [s.name for s in one_by_one]
        for a, b in zip(one_by_one, batched, strict=True):
            np.testing.assert_allclose(a.s, b.s, rtol=1e-5, atol=1e-6 * a.s[0])


@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_stacked_batch_path_matches_the_cpu_workers(precision: str) -> None:
    """The CUDA code path (device transfer on the reader, stacked batches), run on the CPU."""
    rng = np.random.default_rng(12)
    xs = [rng.standard_normal((32, 24)) for _ in range(5)] + [rng.standard_normal((300, 280)) for _ in range(2)]
    dtype = torch.float64 if precision == "exact" else torch.float32
    deltas = [dense(f"m{i}", x, dtype) for i, x in enumerate(xs)]
    kernel = Recording(Values(precision))
    one = deltas[0].values.numel() * deltas[0].values.element_size() + kernel.result_nbytes((32, 24))  # type: ignore[union-attr]
    jobs, materialize = handing_over(deltas)
    stacked = list(executor(materialize, stacked=True, batch_bytes=2 * one + 1).run(jobs, kernel))
    assert kernel.sizes == [2, 2, 1, 1, 1]  # same shape, within the budget (matrices and results), cut when full
    assert [j for j, _ in stacked] == jobs
    tol = 1e-12 if precision == "exact" else 1e-5  # float32 Gram: thread counts change the rounding
    for a, (_, b) in zip(run(deltas, precision=precision), stacked, strict=True):
        assert isinstance(b, Spectrum)
        assert (a.name, a.method, a.energy) == (b.name, b.method, pytest.approx(b.energy, rel=1e-14))
        np.testing.assert_allclose(a.s, b.s, rtol=0, atol=tol * a.s[0])


@pytest.mark.parametrize("stacked", [False, True])
def test_factored_delta_matches_the_dense_product(stacked: bool) -> None:
    rng = np.random.default_rng(5)
    b, a = rng.standard_normal((70, 6)) * 3, rng.standard_normal((6, 50))
    delta = Delta("f", (70, 50), None, (torch.from_numpy(b).float(), torch.from_numpy(a).float()), None, "f32", 0.0)
    (sp,) = run([delta], stacked)
    ref = scipy.linalg.svdvals(b.astype(np.float32).astype(np.float64) @ a.astype(np.float32).astype(np.float64))
    assert sp.method == "factored-f64" and len(sp.s) == 6
    np.testing.assert_allclose(sp.s, ref[:6], rtol=1e-10)
    assert sp.energy == pytest.approx(float(np.sum(ref**2)), rel=1e-10)


@pytest.mark.parametrize("stacked", [False, True])
def test_reader_errors_reach_the_caller(stacked: bool) -> None:
    def materialize(job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
        if job.name == "ok":
            return dense("ok", np.ones((4, 4)))
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        list(executor(materialize, stacked).run([job("ok", (4, 4)), job("bad", (4, 4))], Values()))


def test_cpu_workers_keep_input_order_with_matrices_that_run_alone() -> None:
    """Small matrices run two at a time; one above budget/threads runs alone on all threads; order is kept."""
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((30, 20)) for _ in range(5)]
    xs.insert(2, rng.standard_normal((90, 60)))  # 21600 B > budget / 2
    deltas = [dense(f"m{i}", x) for i, x in enumerate(xs)]
    got = run(deltas, threads=2, batch_bytes=20_000)
    assert [sp.name for sp in got] == [d.name for d in deltas]
    for x, sp in zip(xs, got, strict=True):
        ref = scipy.linalg.svdvals(x.astype(np.float32).astype(np.float64))
        np.testing.assert_allclose(sp.s, ref, atol=1e-6 * ref[0])


def test_reader_holds_at_most_one_finished_item_ahead() -> None:
    """Read-ahead is one item: while result i is being used, at most item i+1 has been read."""
    rng = np.random.default_rng(13)
    produced: list[str] = []

    def materialize(job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
        produced.append(job.name)
        return dense(job.name, rng.standard_normal((8, 6)))

    jobs = [job(f"m{i}", (8, 6)) for i in range(6)]
    ahead = []
    for i, _ in enumerate(executor(materialize, stacked=True, batch_bytes=1).run(jobs, Values())):
        time.sleep(0.02)  # a slow consumer: the reader has every chance to run ahead
        ahead.append(len(produced) - i - 1)
    assert max(ahead) <= 1 and produced == [j.name for j in jobs]


@pytest.mark.parametrize("threads", [1, 2])
def test_reader_builds_no_matrix_while_one_larger_than_the_budget_is_held(threads: int) -> None:
    """Peak memory is bounded by budget + the largest ΔW: past the budget, the next ΔW waits until the last is freed."""
    rng = np.random.default_rng(12)
    alive: list[weakref.ref[torch.Tensor]] = []
    held_when_built: list[int] = []

    def materialize(job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped:
        held_when_built.append(sum(ref() is not None for ref in alive))
        delta = dense(job.name, rng.standard_normal((90, 60)))  # 21600 B each, budget 20000 B
        alive.append(weakref.ref(delta.values))  # type: ignore[arg-type]
        return delta

    jobs = [job(f"m{i}", (90, 60)) for i in range(6)]
    got = list(executor(materialize, batch_bytes=20_000, threads=threads).run(jobs, Values()))
    assert [sp.name for _, sp in got] == [f"m{i}" for i in range(6)]
    assert held_when_built == [0] * 6


def test_threads_option_is_restored() -> None:
    before = torch.get_num_threads()
    run([dense("m", np.eye(8))], threads=1)
    assert torch.get_num_threads() == before
    run([dense(f"m{i}", np.eye(8)) for i in range(4)], threads=2)
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))  # new threads: default again
    worker.start()
    worker.join()
    assert torch.get_num_threads() == before and seen == [before]


def test_auto_device_without_gpu_is_cpu() -> None:
    if not torch.cuda.is_available():
        assert resolve_device("auto").type == "cpu"
    assert LocalExecutor().device.type == "cpu" and not LocalExecutor().stacked  # the default executor


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_cuda_matches_cpu(precision: str) -> None:
    rng = np.random.default_rng(6)
    deltas = [
        dense(f"m{i}", planted_matrix((256, 192), planted_spectra(192)[k], rng))
        for i, k in enumerate(["power", "rank8", "step"])
    ]
    cpu = run(deltas, precision=precision)
    jobs, materialize = handing_over(deltas)
    cuda = LocalExecutor(Resources("cuda"), materialize=materialize)
    assert cuda.stacked
    gpu = [sp for _, sp in cuda.run(jobs, Values(precision))]
    for a, b in zip(cpu, gpu, strict=True):
        assert isinstance(b, Spectrum)
        np.testing.assert_allclose(a.s, b.s, atol=1e-6 * a.s[0])
        for tau in (0.5, 0.9, 0.99):
            assert energy_rank(a.s, tau, a.energy) == energy_rank(b.s, tau, b.energy)
