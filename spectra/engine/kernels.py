"""Kernels: what to compute per matrix, whatever executor runs it. Values → Spectrum, TopK → Factors.

A kernel is a small frozen (picklable) record: an executor materialises each job's Delta (in float64 when the
kernel's `wide` says so), moves it to its device, and calls `compute` with either a stack of same-shape dense
deltas or a single factored one. The choice of method lives here, once; the linear algebra is in sigma.py (σ only)
and topk.py (vectors). Results are CPU float64 numpy records, so later stages run without torch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, TypeVar

import numpy as np
import torch

from spectra.engine.sigma import cpu_threads, exact_values, factored_values, fast_values, frobenius_energy
from spectra.engine.topk import factored_topk, gram_topk, svd_topk, trim
from spectra.errors import OptionsError
from spectra.records import PRECISIONS, Delta, Factors, Spectrum

log = logging.getLogger(__name__)

R = TypeVar("R")

TOPK_METHODS: Final = ("gram", "svd")


class Kernel(Protocol[R]):
    """What to compute per matrix. Implementations are frozen dataclasses (picklable, sent to other processes)."""

    @property
    def wide(self) -> bool:
        """True when dense ΔW should be materialised in float64 (else float32 unless stored in float64)."""
        ...

    def compute(self, deltas: Sequence[Delta], threads: int | None = None) -> list[R]:
        """One result per delta, in order.

        Args:
            deltas: same-shape dense deltas (values on one device, stacked here), or one factored delta.
            threads: CPU threads for matrix products (eigensolvers then run on one); None: leave torch's setting.
        """
        ...

    def result_nbytes(self, shape: tuple[int, int]) -> int:
        """An upper bound of the bytes one result for a matrix of `shape` holds (for the executor's ledger)."""
        ...


@dataclass(frozen=True, slots=True)
class Values:
    """Singular values of each ΔW → Spectrum: "fast" (Gram + eigvalsh, float64 redo) or "exact" (float64 SVD).

    Factored deltas always take the factored QR route (float64). See sigma.py for the methods and their accuracy.
    """

    precision: str = "fast"

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise OptionsError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    @property
    def wide(self) -> bool:
        return self.precision == "exact"

    def compute(self, deltas: Sequence[Delta], threads: int | None = None) -> list[Spectrum]:
        if deltas[0].factors is not None:
            return [_factored_spectrum(d) for d in deltas]
        x = _stack(deltas)
        with cpu_threads(threads):
            energy = frobenius_energy(x).cpu().numpy()
            if self.precision == "exact":
                s, methods = exact_values(x).cpu().numpy(), ["svd-f64"] * len(deltas)
        if self.precision != "exact":
            s, methods = fast_values(x, gemm_threads=threads)
        return [
            Spectrum(d.name, d.shape, s[i], float(energy[i]), d.base_norm, d.dtype, d.noise_energy, methods[i], d.quant)
            for i, d in enumerate(deltas)
        ]

    def result_nbytes(self, shape: tuple[int, int]) -> int:
        return 8 * min(shape)


@dataclass(frozen=True, slots=True)
class TopK:
    """The leading k singular triplets of each ΔW → Factors (U, σ, Vᵀ as CPU float64 numpy).

    Attributes:
        k: triplets wanted, ≥ 1; fewer come back when ΔW has fewer numerically non-zero directions (see Factors).
        method: "gram" (default: Gram eigenvectors + one Rayleigh–Ritz step, 2–3.5× faster on a CPU) or "svd"
            (full float64 SVD, the reference). Factored deltas always use QR of the factors.
        ranks: job name -> triplets wanted for that job (each ≥ 1), overriding `k` (extraction with per-module
            ranks); `TopK.per_job` builds one with k = the largest of them. A stacked batch is computed at its
            largest k and each result cut to its own.
    Dense ΔW is materialised in float64: the Gram route squares the condition number, and float32 would lose
    the σ below ~1e-3·σ₁ that extraction and subspace comparisons keep. See topk.py for accuracy.
    """

    k: int
    method: str = "gram"
    ranks: Mapping[str, int] | None = field(default=None, hash=False, repr=False)

    def __post_init__(self) -> None:
        if not _positive_int(self.k):
            raise OptionsError(f"k must be a positive integer, got {self.k!r}")
        if self.method not in TOPK_METHODS:
            raise OptionsError(f"method must be one of {', '.join(TOPK_METHODS)}, got {self.method!r}")
        if self.ranks is not None:
            bad = [f"{name}={k!r}" for name, k in self.ranks.items() if not _positive_int(k)]
            if bad:
                raise OptionsError(f"per-job k must be positive integers, got {', '.join(bad[:3])}")
            object.__setattr__(self, "ranks", dict(self.ranks))  # a private copy: the kernel stays as built

    @classmethod
    def per_job(cls, ranks: Mapping[str, int], method: str = "gram") -> TopK:
        """A TopK computing `ranks[job.name]` triplets for each job (jobs not in `ranks`: the largest of them)."""
        if not ranks:
            raise OptionsError("per-job ranks are empty: no job to compute")
        return cls(max(ranks.values()), method, ranks)

    def k_of(self, name: str) -> int:
        """Triplets wanted for the job named `name`."""
        return self.k if self.ranks is None else self.ranks.get(name, self.k)

    @property
    def wide(self) -> bool:
        return True

    def compute(self, deltas: Sequence[Delta], threads: int | None = None) -> list[Factors]:
        if deltas[0].factors is not None:
            return [self._factored(d) for d in deltas]
        ks = [self.k_of(d.name) for d in deltas]
        x = _stack(deltas).to(torch.float64)
        with cpu_threads(threads):
            energy = frobenius_energy(x).cpu().numpy()
        route = gram_topk if self.method == "gram" else svd_topk
        u, s, vt = (t.cpu().numpy() for t in route(x, max(ks), threads))
        del x
        method = f"{self.method}-f64"
        return [
            _factors(d, u[i][:, :k], s[i][:k], vt[i][:k], float(energy[i]), method)
            for i, (d, k) in enumerate(zip(deltas, ks, strict=True))
        ]

    def _factored(self, delta: Delta) -> Factors:
        assert delta.factors is not None
        u, s, vt, energy = factored_topk(*delta.factors, self.k_of(delta.name))
        return _factors(delta, u.cpu().numpy(), s.cpu().numpy(), vt.cpu().numpy(), energy, "factored-f64")

    def result_nbytes(self, shape: tuple[int, int]) -> int:
        return 8 * min(self.k, *shape) * (shape[0] + shape[1] + 1)  # k is the largest per-job k


@dataclass(frozen=True, slots=True)
class Energy:
    """‖ΔW‖_F² of each ΔW (float64, summed from ΔW itself) → float: a cheap pass (read and diff, no
    decomposition) that finds which matrices changed before a layout is fixed, e.g. extraction at a fixed rank."""

    @property
    def wide(self) -> bool:
        return False

    def compute(self, deltas: Sequence[Delta], threads: int | None = None) -> list[float]:
        if deltas[0].factors is not None:
            return [_factored_energy(d) for d in deltas]
        with cpu_threads(threads):
            return [float(e) for e in frobenius_energy(_stack(deltas)).cpu()]

    def result_nbytes(self, shape: tuple[int, int]) -> int:
        return 8


def _positive_int(k: object) -> bool:
    """An integer ≥ 1 (Python or numpy, or an integral float), not a bool."""
    try:
        return not isinstance(k, bool) and int(k) == k and int(k) >= 1  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        return False


def _factored_energy(d: Delta) -> float:
    assert d.factors is not None
    b, a = d.factors
    _, r_b = torch.linalg.qr(b.to(torch.float64))
    return float(torch.linalg.matrix_norm(r_b @ a.to(torch.float64)).square())


def _stack(deltas: Sequence[Delta]) -> torch.Tensor:
    values = [d.values for d in deltas if d.values is not None]
    assert len(values) == len(deltas), "a dense batch holds dense deltas only"
    return values[0].unsqueeze(0) if len(values) == 1 else torch.stack(values)


def _factored_spectrum(d: Delta) -> Spectrum:
    assert d.factors is not None
    s, energy = factored_values(*d.factors)
    return Spectrum(d.name, d.shape, s, energy, d.base_norm, d.dtype, d.noise_energy, "factored-f64")


def _factors(d: Delta, u: np.ndarray, s: np.ndarray, vt: np.ndarray, energy: float, method: str) -> Factors:
    u, s, vt = trim(u, s, vt, d.shape)
    return Factors(d.name, d.shape, u, s, vt, energy, d.base_norm, d.dtype, d.noise_energy, method)
