"""The local executor: jobs → results in this process, on the CPU or a GPU (devices, batching, worker threads,
read-ahead and the memory budget). What is computed per matrix is the kernel's business (kernels.py).

Scheduling. A background reader thread materialises jobs (reads and diffs) ahead while the linear algebra runs;
it hands one item over and waits until it is taken before building the next, so memory stays bounded whatever the
model size. It opens files through its own handle cache.
- CUDA: the reader moves each ΔW to the device as soon as it is formed (host memory holds one ΔW at a time), and
  same-shape matrices are stacked into one call up to a byte budget counting the matrices and their results (a
  sixth of free device memory: the batch, its stacked copy and the reader's next batch fit in half); the whole
  ΔW → result chain stays on the device and only CPU results come back.
- CPU: matrices are spread over `threads` worker threads that each run single-threaded BLAS/LAPACK, up to the
  byte budget in flight. LAPACK's own threading forks and joins threads at every Householder step of the
  eigensolver, which on a small machine shared with other processes is many times slower than one thread per
  matrix. A matrix larger than budget/threads runs alone, its matrix products on all threads. The reader's torch
  operations run on one thread, and it starts the next ΔW only while the bytes held (ΔW read and not yet
  computed, plus results computed or being computed and not yet handed to the caller) are within the budget: a
  matrix larger than the budget (an embedding) is never read while another is held, and peak memory is about
  budget + the largest ΔW (in float32), whatever the model size.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import logging
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Final, Generic, Protocol, TypeVar, cast

import torch

from spectra.engine.kernels import Kernel
from spectra.engine.reader import DONE, Ledger, ReadAhead, Signal
from spectra.engine.sigma import cpu_threads, full_float32
from spectra.errors import OptionsError
from spectra.io.tensors import Handles
from spectra.plan.delta import make_delta
from spectra.plan.jobs import Job
from spectra.records import Delta, Resources, Skipped

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")
Item = tuple[Job, Delta | Skipped]

CPU_BATCH_BYTES: Final = 128 * 2**20  # ΔW (and result) bytes in flight on the CPU workers
TRIM_EVERY: Final = 2**30  # ΔW bytes computed on the CPU between two malloc_trim calls
READER_THREADS: Final = 1  # intra-op threads of the CPU reader thread (upcast, subtract, norms)


class Materialize(Protocol):
    """How a job becomes a matrix: spectra.plan.delta.make_delta, or a stand-in in tests."""

    def __call__(self, job: Job, handles: Handles, *, wide: bool = False) -> Delta | Skipped: ...


def resolve_device(device: str) -> torch.device:
    """Return the torch device for "auto" (CUDA when available), "cpu" or "cuda".

    Raises:
        OptionsError: "cuda" was asked for and no CUDA device is available.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionsError("device 'cuda' asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def batch_budget(resources: Resources, device: torch.device) -> int:
    """Bytes computed at once: the resource's, or a sixth of free GPU memory, or 128 MiB on the CPU."""
    if resources.batch_bytes is not None:
        return resources.batch_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free // 6, 1)
    return CPU_BATCH_BYTES


class LocalExecutor:
    """Runs jobs in this process: a reader thread ahead, then CPU worker threads or stacked batches on one GPU.

    Args:
        resources: device (resolved), threads, batch bytes.
        stacked: stack same-shape matrices into batched calls (the GPU path); None: on CUDA only. On a CPU it
            runs the GPU code path, for testing.
        materialize: turns a job into its matrix on the reader thread (default: spectra.plan.delta.make_delta).
    """

    def __init__(
        self, resources: Resources | None = None, *, stacked: bool | None = None, materialize: Materialize = make_delta
    ) -> None:
        self.resources = resources or Resources()
        self.device = torch.device(self.resources.device)
        self.stacked = self.device.type == "cuda" if stacked is None else stacked
        self.materialize = materialize

    def run(self, jobs: Sequence[Job], kernel: Kernel[R]) -> Generator[tuple[Job, R | Skipped], None, None]:
        """(job, result) for every job, in the order given; see the module docstring for the scheduling."""
        budget = batch_budget(self.resources, self.device)
        handles = Handles()  # used by the reader thread only; closed once it has stopped
        try:
            with cpu_threads(self.resources.threads), full_float32():
                items = self._deltas(jobs, kernel, handles)
                if not self.stacked:
                    workers = torch.get_num_threads()
                    log.info("engine: cpu, %d workers, %s, %d MiB in flight", workers, kernel, budget >> 20)
                    ledger = Ledger(budget)
                    with contextlib.closing(ReadAhead(items, READER_THREADS, ledger, _item_nbytes)) as reader:
                        yield from _compute_cpu(reader, kernel, budget, workers, ledger)
                else:
                    log.info("engine: %s, %s, batch budget %d MiB", self.device, kernel, budget >> 20)
                    batches = _batches(_on_device(items, self.device), budget, kernel)
                    with contextlib.closing(ReadAhead(batches)) as reader:
                        for batch in reader:
                            yield from _compute_batch(batch, kernel)
        finally:
            handles.close()

    def _deltas(self, jobs: Iterable[Job], kernel: Kernel[R], handles: Handles) -> Iterator[Item]:
        for job in jobs:  # runs on the reader thread
            yield job, self.materialize(job, handles, wide=kernel.wide)


def _batches(items: Iterable[Item], budget: int, kernel: Kernel[R]) -> Iterator[list[Item]]:
    """Group consecutive same-shape dense deltas into batches of at most `budget` bytes with their results (at
    least one each); a factored delta is a batch of its own; Skipped items ride along with the current batch.

    A batch is handed on as soon as one more matrix of its shape would not fit, without reading the next delta.
    """
    batch: list[Item] = []
    head: Delta | None = None
    size = 0
    for job, delta in items:
        if isinstance(delta, Skipped):
            batch.append((job, delta))
            continue
        nbytes = _nbytes(delta) + kernel.result_nbytes(delta.shape)
        fits = head is not None and delta.values is not None and head.values is not None
        if head is not None and not (fits and head.shape == delta.shape and size + nbytes <= budget):
            yield batch
            batch, head, size = [], None, 0
        batch.append((job, delta))
        head = head or delta
        size += nbytes
        if delta.values is not None and size + nbytes > budget:
            yield batch
            batch, head, size = [], None, 0
    if batch:
        yield batch


def _on_device(items: Iterable[Item], device: torch.device) -> Iterator[Item]:
    """The items with their tensors moved to `device` (on the reader thread)."""
    for job, delta in items:
        if isinstance(delta, Delta):
            if delta.values is not None and delta.values.device != device:
                delta = dataclasses.replace(delta, values=delta.values.to(device))
            elif delta.factors is not None and delta.factors[0].device != device:
                b, a = (f.to(device) for f in delta.factors)
                delta = dataclasses.replace(delta, factors=(b, a))
        yield job, delta


def _compute_batch(batch: list[Item], kernel: Kernel[R]) -> Iterator[tuple[Job, R | Skipped]]:
    deltas = [d for _, d in batch if isinstance(d, Delta)]
    results = iter(kernel.compute(deltas) if deltas else [])
    del deltas
    for job, delta in batch:
        yield job, delta if isinstance(delta, Skipped) else next(results)


def _nbytes(delta: Delta) -> int:
    return delta.values.numel() * delta.values.element_size() if delta.values is not None else 0


def _item_nbytes(item: Item) -> int:
    return _nbytes(item[1]) if isinstance(item[1], Delta) else 0


@dataclasses.dataclass(slots=True)
class _Pending(Generic[R]):
    job: Job
    future: Future[R | Skipped]
    nbytes: int  # ΔW + reserved result bytes, released from the consumer's count when handed over
    result_bytes: int  # charged to the ledger at submission, released when handed over
    big: bool  # runs alone, on all threads
    running: bool  # a worker's future (False: a Skipped passed through in order)


def _compute_cpu(
    reader: ReadAhead[Item], kernel: Kernel[R], budget: int, workers: int, ledger: Ledger
) -> Iterator[tuple[Job, R | Skipped]]:
    """Results of the reader's items in input order, at most 2·`workers` matrices (a worker that finishes first
    finds the next one queued) and `budget` bytes in flight. Each ΔW's bytes are released from `ledger` as soon as
    its worker is done with it, not when its result is handed over: the reader may be waiting for exactly those
    bytes while this loop waits for the reader. A result's bytes are charged from submission until the caller,
    having taken it, asks for the next one; finished results are handed over while this loop waits for the reader
    (which may be waiting for exactly their bytes), so neither waits for the other forever.

    Each worker runs single-threaded; a matrix of more than budget/workers bytes runs alone, with `workers`
    threads for its matrix products (its eigensolver stays on one thread). Freed memory is handed back to the
    system (malloc_trim) before a matrix of more than budget/2 bytes starts and after every TRIM_EVERY bytes:
    glibc otherwise keeps the freed blocks of the many mid-sized tensors, and peak RSS grows with the model.
    """
    pending: deque[_Pending[R]] = deque()
    waiting: Item | None = None
    finished = False
    in_flight = done = running = 0
    with ThreadPoolExecutor(workers, "spectra-cpu", initializer=torch.set_num_threads, initargs=(1,)) as pool:
        while True:
            while pending and pending[0].future.done():
                entry = pending.popleft()
                in_flight -= entry.nbytes
                done += entry.nbytes
                running -= entry.running
                reserved = entry.result_bytes
                yield entry.job, entry.future.result()
                del entry  # the result is the caller's now: its bytes no longer count here
                ledger.release(reserved)
            if waiting is None and not finished:
                got = reader.next()  # wakes when a worker finishes, to hand its result over
                if got is DONE:
                    finished = True
                elif not isinstance(got, Signal):
                    waiting = got
                del got
                continue
            if waiting is None:
                if not pending:
                    return
                wait([pending[0].future])
                continue
            job, delta = waiting
            if isinstance(delta, Skipped):
                pending.append(_Pending(job, _ready(delta), 0, 0, False, False))
                waiting = None
                continue
            nbytes = _nbytes(delta)
            result_bytes = kernel.result_nbytes(delta.shape)
            big = workers > 1 and nbytes > budget // workers
            size = nbytes + result_bytes
            if running and (big or pending[0].big or running >= 2 * workers or in_flight + size > budget):
                wait([pending[0].future])
                continue
            if nbytes > budget // 2 or done >= TRIM_EVERY:
                _trim()
                done = 0
            ledger.charge(result_bytes)
            future = cast(Future[R | Skipped], pool.submit(_work, [delta], kernel, workers if big else 1))
            future.add_done_callback(functools.partial(_release, ledger, nbytes, reader))
            pending.append(_Pending(job, future, size, result_bytes, big, True))
            in_flight += size
            running += 1
            waiting = None
            del delta


def _work(box: list[Delta], kernel: Kernel[R], threads: int) -> R:
    """One matrix on a CPU worker. The delta comes in a one-item list that is emptied here, so ΔW is freed when
    this returns, before the future's done callbacks release its bytes to the reader."""
    return kernel.compute([box.pop()], threads)[0]


def _release(ledger: Ledger, nbytes: int, reader: ReadAhead[Item], _: object) -> None:
    ledger.release(nbytes)
    reader.wake()


def _ready(value: Skipped) -> Future[R | Skipped]:
    future: Future[R | Skipped] = Future()
    future.set_result(value)
    return future


def _load_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0) (return freed heap memory to the system), or a no-op elsewhere."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


_trim = _load_trim()
