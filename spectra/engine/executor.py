"""The engine's one entry point: run(jobs, kernel, executor) → (job, result) pairs; and the Executor protocol.

An executor says where kernels run (LocalExecutor: this process's threads and GPU; a Ray executor: actors). It
receives jobs, never open files or analysis settings: it materialises each job itself (spectra.plan.delta, with a
handle cache of its own per process), calls the kernel on the matrix, and yields `(job, result)`, or
`(job, Skipped)` for a matrix that turned out to be exactly zero. Callers never join results by name.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable, Iterator, Sequence, Sized
from typing import Any, Generic, Protocol, TypeVar

from spectra.engine.kernels import Kernel
from spectra.names import natural_key
from spectra.plan.jobs import Job
from spectra.records import Skipped

R = TypeVar("R")
T = TypeVar("T")
ProgressHook = Callable[[Iterable[Any]], Iterable[Any]]


def identity(items: Iterable[T]) -> Iterable[T]:
    """The progress hook that shows nothing."""
    return items


class Executor(Protocol):
    """Where kernels run. `run` must yield exactly one pair per job, and re-raise a job's error (a SpectraError from
    reading, a bug in a kernel) in the caller's thread; closing the iterator early must release its resources.

    Implementations: spectra.engine.local.LocalExecutor (this process: the CPU, one GPU or each of several) and
    spectra.engine.ray.RayExecutor (Ray actors). A distributed one sends the (picklable) jobs and kernel to
    workers that materialise and compute them themselves (simplest: each worker runs a LocalExecutor on its share,
    with the Resources of its own device) and sends back the small results only, never tensors.
    """

    def run(self, jobs: Sequence[Job], kernel: Kernel[R]) -> Iterator[tuple[Job, R | Skipped]]:
        """(job, kernel result) or (job, Skipped("unchanged")) for every job, in any order."""
        ...


def schedule_key(job: Job) -> tuple[Any, ...]:
    """The order jobs are run in: by shape (same-shape matrices batch together on a GPU), then name, then input (the
    same matrix of several tuned inputs runs back to back, its base tensor still in the page cache)."""
    return job.shape, natural_key(job.name), job.source


def largest_first(job: Job) -> tuple[Any, ...]:
    """The order executors with several workers (devices, Ray actors) hand jobs out in: largest matrices first, so
    the last to finish are small ones; same-shape matrices together (a GPU stacks them), then as schedule_key."""
    return -job.shape[0] * job.shape[1], schedule_key(job)


def run(
    jobs: Iterable[Job], kernel: Kernel[R], executor: Executor, progress: ProgressHook = identity
) -> Generator[tuple[Job, R | Skipped], None, None]:
    """Yield (job, result) for every job: the kernel's record (Spectrum, Factors, ...) or a Skipped (ΔW = 0).

    Args:
        jobs: from one or more plans (Job.source tells them apart); run in `schedule_key` order.
        kernel: what to compute per matrix, e.g. Values("fast") or TopK(16).
        executor: where, e.g. LocalExecutor(Resources("cpu")).
        progress: wraps the stream of results, e.g. `rich.progress.track` (the stream has a len()).

    Raises:
        CheckpointError: a tensor could not be read or holds NaN/Inf (raised when its job is reached).
    """
    ordered = sorted(jobs, key=schedule_key)
    stream = executor.run(ordered, kernel)
    try:
        yield from progress(_Counted(stream, len(ordered)))
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops the executor's reader and workers when the caller stops early


class _Counted(Sized, Iterable[T], Generic[T]):
    """An iterator that knows its length, so progress bars can show a total."""

    def __init__(self, items: Iterator[T], n: int) -> None:
        self.items, self.n = items, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[T]:
        return self.items
