"""The local executor: jobs → results in this process, on the CPU or a GPU (devices, batching, worker threads,
read-ahead and the memory budget). What is computed per matrix is the kernel's business (kernels.py).

Scheduling. A background reader thread materialises jobs (reads and diffs) ahead while the linear algebra runs;
it hands one item over and waits until it is taken before building the next, so memory stays bounded whatever the
model size. It opens files through its own handle cache.
- CUDA: the reader moves each ΔW to the device as soon as it is formed (host memory holds one ΔW at a time), and
  same-shape matrices are stacked into one call up to a byte budget counting the matrices and their results (a
  sixth of free device memory: the batch, its stacked copy and the reader's next batch fit in half); the whole
  ΔW → result chain stays on the device and only CPU results come back.
- Several devices (Resources.devices, e.g. every visible GPU): one such pipeline per device, each on a thread of
  its own with its own reader, byte budget (from that device's free memory) and CUDA stream (the device's own),
  all pulling the next job from one shared queue ordered largest first; results come back as they complete.
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
import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Final, Generic, Protocol, TypeVar, cast

import torch

from spectra.engine.executor import largest_first
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


def resolve_devices(device: str, devices: Sequence[str] | None = None) -> tuple[str, ...]:
    """The devices the local executor runs on: `devices` when given (checked), else every visible GPU when
    `device` resolves to CUDA and torch sees several, else the one device `resolve_device` gives ("cpu", "cuda").

    Raises:
        OptionsError: a CUDA device asked for that torch does not see, or `device` "cpu" with CUDA `devices`.
    """
    if not devices:
        resolved = resolve_device(device)
        count = torch.cuda.device_count() if resolved.type == "cuda" else 0
        return tuple(f"cuda:{i}" for i in range(count)) if count > 1 else (str(resolved),)
    cuda = [d for d in devices if torch.device(d).type == "cuda"]
    if cuda and device == "cpu":
        raise OptionsError(f"device 'cpu' conflicts with devices {','.join(devices)}; drop one of the two")
    count = torch.cuda.device_count() if cuda else 0
    for name in cuda:
        index = torch.device(name).index or 0
        if index >= count:
            seen = f"cuda:0..cuda:{count - 1}" if count else "no CUDA device"
            raise OptionsError(f"device {name!r} asked for, but torch sees {seen}; check --devices")
    return tuple(devices)


def batch_budget(resources: Resources, device: torch.device) -> int:
    """Bytes computed at once: the resource's, or a sixth of free GPU memory, or 128 MiB on the CPU."""
    if resources.batch_bytes is not None:
        return resources.batch_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free // 6, 1)
    return CPU_BATCH_BYTES


class LocalExecutor:
    """Runs jobs in this process: a reader thread ahead, then CPU worker threads or stacked batches on one GPU; with
    several devices, one such worker per device, each pulling the next job from a shared queue (largest first).

    Args:
        resources: device (resolved) or devices, threads, batch bytes (per device).
        stacked: stack same-shape matrices into batched calls (the GPU path); None: on CUDA only. On a CPU it
            runs the GPU code path, for testing.
        materialize: turns a job into its matrix on the reader thread (default: spectra.plan.delta.make_delta).
    """

    def __init__(
        self, resources: Resources | None = None, *, stacked: bool | None = None, materialize: Materialize = make_delta
    ) -> None:
        self.resources = resources or Resources()
        self.devices = tuple(torch.device(d) for d in self.resources.devices or (self.resources.device,))
        self.device = self.devices[0]
        self._stacked = stacked  # per device: None stacks on CUDA devices only
        self.stacked = self.device.type == "cuda" if stacked is None else stacked  # on the first device
        self.materialize = materialize

    @property
    def label(self) -> str:
        """The devices used, e.g. "cpu", "cuda", "cuda:0,cuda:1" (Analysis.device)."""
        return ",".join(str(d) for d in self.devices)

    def run(self, jobs: Sequence[Job], kernel: Kernel[R]) -> Generator[tuple[Job, R | Skipped], None, None]:
        """(job, result) for every job: in the order given on one device, in completion order on several (largest
        jobs first); see the module docstring for the scheduling."""
        if len(self.devices) == 1:
            yield from self._run_on(self.device, jobs, kernel)
            return
        with full_float32():  # set once here: the setting is process-wide, the device threads only keep it
            yield from self._spread(jobs, kernel)

    def _run_on(
        self, device: torch.device, jobs: Iterable[Job], kernel: Kernel[R]
    ) -> Generator[tuple[Job, R | Skipped], None, None]:
        """The jobs on one device, in their order; `jobs` is consumed on this device's reader thread."""
        budget = batch_budget(self.resources, device)
        stacked = device.type == "cuda" if self._stacked is None else self._stacked
        handles = Handles()  # used by the reader thread only; closed once it has stopped
        try:
            with cpu_threads(self.resources.threads), full_float32():
                items = self._deltas(jobs, kernel, handles)
                if not stacked:
                    workers = torch.get_num_threads()
                    log.info("engine: %s, %d workers, %s, %d MiB in flight", device, workers, kernel, budget >> 20)
                    ledger = Ledger(budget)
                    with contextlib.closing(ReadAhead(items, READER_THREADS, ledger, _item_nbytes)) as reader:
                        yield from _compute_cpu(reader, kernel, budget, workers, ledger)
                else:
                    log.info("engine: %s, %s, batch budget %d MiB", device, kernel, budget >> 20)
                    batches = _batches(_on_device(items, device), budget, kernel)
                    with contextlib.closing(ReadAhead(batches)) as reader:
                        for batch in reader:
                            yield from _compute_batch(batch, kernel)
        finally:
            handles.close()

    def _deltas(self, jobs: Iterable[Job], kernel: Kernel[R], handles: Handles) -> Iterator[Item]:
        for job in jobs:  # runs on the reader thread
            yield job, self.materialize(job, handles, wide=kernel.wide)

    def _spread(self, jobs: Sequence[Job], kernel: Kernel[R]) -> Iterator[tuple[Job, R | Skipped]]:
        """One thread per device runs `_run_on` over a shared queue of the jobs, largest first: each device's
        reader takes the next job when it is ready for one, so faster devices take more. Results are handed over
        through a queue of one slot per device (a device waits while its result is not taken)."""
        queue_ = _SharedJobs(sorted(jobs, key=largest_first))
        results: queue.Queue[object] = queue.Queue(maxsize=len(self.devices))
        stop = threading.Event()
        threads = [
            threading.Thread(
                target=self._serve, args=(d, queue_, kernel, results, stop), name=f"spectra-device-{i}", daemon=True
            )
            for i, d in enumerate(self.devices)
        ]
        log.info("engine: %d devices (%s), largest jobs first", len(threads), self.label)
        for thread in threads:
            thread.start()
        try:
            running = len(threads)
            while running:
                got = results.get()
                if got is _FINISHED:
                    running -= 1
                elif isinstance(got, _Raised):
                    raise got.error
                else:
                    yield got  # type: ignore[misc]  # a (job, result) pair
                del got
        finally:
            stop.set()
            queue_.close()
            for thread in threads:
                thread.join()

    def _serve(
        self,
        device: torch.device,
        jobs: _SharedJobs,
        kernel: Kernel[Any],
        results: queue.Queue[object],
        stop: threading.Event,
    ) -> None:
        """A device thread: its results into `results`, then _FINISHED (or its error); stops once `stop` is set."""
        try:
            stream = self._run_on(device, jobs, kernel)
            with (
                torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext(),
                contextlib.closing(stream),
            ):
                for pair in stream:
                    if not _put(results, pair, stop):
                        return
                    del pair
            _put(results, _FINISHED, stop)
        except BaseException as exc:  # re-raised in the caller's thread
            _put(results, _Raised(exc), stop)


class _SharedJobs:
    """The jobs, handed out one at a time to whichever device's reader asks first (thread-safe); empty once closed."""

    def __init__(self, jobs: list[Job]) -> None:
        self._jobs = deque(jobs)
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[Job]:
        return self

    def __next__(self) -> Job:
        with self._lock:
            if not self._jobs:
                raise StopIteration
            return self._jobs.popleft()

    def close(self) -> None:
        with self._lock:
            self._jobs.clear()


@dataclasses.dataclass(frozen=True, slots=True)
class _Raised:
    error: BaseException


_FINISHED: Final = object()


def _put(results: queue.Queue[object], item: object, stop: threading.Event) -> bool:
    """Put `item`, waiting for room unless `stop` is set (then False: the caller has stopped taking results)."""
    while not stop.is_set():
        try:
            results.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


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
