"""ΔW -> Spectrum on the CPU or a GPU: devices, batching, worker threads and read-ahead. The σ math is sigma.py.

Scheduling. A background reader thread reads and diffs ahead while the linear algebra runs; it hands one item
over and waits until it is taken before building the next, so memory stays bounded whatever the model size.
- CUDA: the reader moves each ΔW to the device as soon as it is formed (host memory holds one ΔW at a time), and
  same-shape matrices are stacked into one call up to a byte budget (a sixth of free device memory: the batch,
  its stacked copy and the reader's next batch fit in half); the whole ΔW → Gram → eigvalsh chain stays on the
  device and only σ comes back.
- CPU: matrices are spread over `threads` worker threads that each run single-threaded BLAS/LAPACK, up to the
  byte budget in flight. LAPACK's own threading forks and joins threads at every Householder step of the
  eigensolver, which on a small machine shared with other processes is many times slower than one thread per
  matrix. A matrix larger than budget/threads runs alone, its matrix products on all threads. The reader's torch
  operations run on one thread, and it starts the next ΔW only while the ΔW bytes read and not yet computed are
  within the budget: a matrix larger than the budget (an embedding) is never read while another is held, and
  peak memory is about budget + the largest ΔW (in float32), whatever the model size.
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
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, TypeVar

import torch

from spectra.engine.sigma import (
    cpu_threads,
    exact_values,
    factored_values,
    fast_values,
    frobenius_energy,
    full_float32,
)
from spectra.errors import OptionsError
from spectra.records import Delta, Options, Spectrum

log = logging.getLogger(__name__)

T = TypeVar("T")

CPU_BATCH_BYTES: Final = 128 * 2**20  # ΔW bytes in flight on the CPU workers
TRIM_EVERY: Final = 2**30  # ΔW bytes computed on the CPU between two malloc_trim calls
READER_THREADS: Final = 1  # intra-op threads of the CPU reader thread (upcast, subtract, norms)
CPU: Final = torch.device("cpu")
_DONE: Final = object()


def resolve_device(device: str) -> torch.device:
    """Return the torch device for "auto" (CUDA when available), "cpu" or "cuda".

    Raises:
        OptionsError: "cuda" was asked for and no CUDA device is available.
    """
    if device == "cuda" and not torch.cuda.is_available():
        raise OptionsError("device 'cuda' asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def batch_budget(options: Options, device: torch.device) -> int:
    """Bytes of ΔW computed at once: the option, or a sixth of free GPU memory, or 128 MiB on the CPU."""
    if options.batch_bytes is not None:
        return options.batch_bytes
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free // 6, 1)
    return CPU_BATCH_BYTES


def compute_spectra(deltas: Iterable[Delta], options: Options, device: torch.device) -> Generator[Spectrum, None, None]:
    """Yield the Spectrum of each Delta, in input order, reading ahead on a background thread.

    Args:
        deltas: ΔW records; producing them (disk reads, subtraction) runs on the reader thread.
        options: precision, batch_bytes and threads are used.
        device: where the linear algebra runs.
    """
    budget = batch_budget(options, device)
    with cpu_threads(options.threads), full_float32():
        if device.type == "cpu":
            workers = torch.get_num_threads()
            log.info(
                "spectrum: cpu, %d workers, precision %s, %d MiB in flight", workers, options.precision, budget >> 20
            )
            ledger = _Ledger(budget)
            with contextlib.closing(_prefetch(iter(deltas), READER_THREADS, ledger, _nbytes)) as items:
                yield from _compute_cpu(items, options.precision, budget, workers, ledger)
        else:
            log.info("spectrum: %s, precision %s, batch budget %d MiB", device, options.precision, budget >> 20)
            with contextlib.closing(_prefetch(_batches(_on_device(deltas, device), budget))) as batches:
                for batch in batches:
                    yield from _compute_batch(batch, options.precision, device)


def _batches(deltas: Iterable[Delta], budget: int) -> Iterator[list[Delta]]:
    """Group consecutive same-shape dense deltas into batches of at most `budget` bytes (at least one each).

    A batch is handed on as soon as one more matrix of its shape would not fit, without reading the next delta.
    """
    batch: list[Delta] = []
    size = 0
    for delta in deltas:
        nbytes = _nbytes(delta)
        fits = batch and delta.values is not None and batch[0].values is not None
        if batch and not (fits and batch[0].shape == delta.shape and size + nbytes <= budget):
            yield batch
            batch, size = [], 0
        batch.append(delta)
        size += nbytes
        if delta.values is not None and size + nbytes > budget:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _on_device(deltas: Iterable[Delta], device: torch.device) -> Iterator[Delta]:
    """The deltas with dense values moved to `device` (on the reader thread; factors stay where they are)."""
    for delta in deltas:
        if delta.values is not None and delta.values.device != device:
            delta = dataclasses.replace(delta, values=delta.values.to(device))
        yield delta


def _nbytes(delta: Delta) -> int:
    return delta.values.numel() * delta.values.element_size() if delta.values is not None else 0


class _Ledger:
    """Bytes read ahead and not yet computed, shared by the reader (charge, wait) and the consumer (release)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._changed = threading.Condition()

    def charge(self, nbytes: int) -> None:
        with self._changed:
            self.held += nbytes

    def release(self, nbytes: int) -> None:
        with self._changed:
            self.held -= nbytes
            self._changed.notify_all()

    def wait_within(self, stop: threading.Event) -> bool:
        """Block until at most `limit` bytes are held; False if `stop` was set meanwhile."""
        with self._changed:
            while self.held > self.limit:
                if stop.is_set():
                    return False
                self._changed.wait(timeout=0.1)
        return not stop.is_set()


def _prefetch(
    items: Iterator[T],
    reader_threads: int | None = None,
    ledger: _Ledger | None = None,
    size: Callable[[T], int] | None = None,
) -> Generator[T, None, None]:
    """Run `items` on a reader thread, one item ahead; re-raise its errors here.

    The reader starts on item i+1 once item i is taken, and waits with i+1 ready until i+1 is taken: it never
    holds more than one finished item. With a ledger, it also waits before starting an item until the ledger is
    within its limit, and charges each item's `size` to it (the consumer releases it once the item is done with).

    Args:
        items: the producer; it runs entirely on the reader thread.
        reader_threads: torch intra-op threads for the reader (thread counts are per calling thread); None: as is.
        ledger: bytes in flight, released by the consumer; None: no limit besides one item ahead.
        size: an item's bytes for the ledger.
    """
    slots: queue.Queue[object] = queue.Queue(maxsize=1)
    taken = threading.Semaphore(0)
    stop = threading.Event()

    def reader() -> None:
        if reader_threads is not None:
            torch.set_num_threads(reader_threads)
        try:
            while ledger is None or ledger.wait_within(stop):
                item = next(items, _DONE)
                if item is _DONE:
                    slots.put(_DONE)
                    return
                if ledger is not None and size is not None:
                    ledger.charge(size(item))  # type: ignore[arg-type]  # not _DONE: a T
                slots.put(item)  # the slot is free: the previous item was taken
                del item
                while not taken.acquire(timeout=0.1):
                    if stop.is_set():
                        return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            slots.put(exc)

    thread = threading.Thread(target=reader, name="spectra-reader", daemon=True)
    thread.start()
    try:
        while True:
            got = slots.get()
            taken.release()
            if got is _DONE:
                break
            if isinstance(got, BaseException):
                raise got
            yield got  # type: ignore[misc]  # anything but _DONE or an exception is a T from `items`
            del got
    finally:
        stop.set()
        with contextlib.suppress(queue.Empty):
            slots.get_nowait()
        thread.join()


def _compute_cpu(
    deltas: Iterator[Delta], precision: str, budget: int, workers: int, ledger: _Ledger | None = None
) -> Iterator[Spectrum]:
    """Spectra of `deltas` in input order, at most 2·`workers` matrices (a worker that finishes first finds the
    next one queued) and `budget` bytes in flight. Each matrix's bytes are released from `ledger` as soon as its
    worker is done with it, not when its result is collected: the reader may be waiting for exactly those bytes
    while this loop waits for the reader.

    Each worker runs single-threaded; a matrix of more than budget/workers bytes runs alone, with `workers`
    threads for its matrix products (its eigensolver stays on one thread). Freed memory is handed back to the
    system (malloc_trim) before a matrix of more than budget/2 bytes starts and after every TRIM_EVERY bytes:
    glibc otherwise keeps the freed blocks of the many mid-sized tensors, and peak RSS grows with the model.
    """
    pending: deque[tuple[Future[Spectrum], int, bool]] = deque()
    in_flight = done = 0
    with ThreadPoolExecutor(workers, "spectra-cpu", initializer=torch.set_num_threads, initargs=(1,)) as pool:
        for delta in deltas:
            nbytes = _nbytes(delta)
            big = workers > 1 and nbytes > budget // workers
            while pending and (big or pending[0][2] or len(pending) >= 2 * workers or in_flight + nbytes > budget):
                future, size, _ = pending.popleft()
                in_flight -= size
                done += size
                yield future.result()
            if nbytes > budget // 2 or done >= TRIM_EVERY:
                _trim()
                done = 0
            future = pool.submit(_cpu_spectrum, [delta], precision, workers if big else 1)
            if ledger is not None:
                future.add_done_callback(functools.partial(_release, ledger, nbytes))
            pending.append((future, nbytes, big))
            in_flight += nbytes
            del delta
        while pending:
            yield pending.popleft()[0].result()


def _release(ledger: _Ledger, nbytes: int, _: object) -> None:
    ledger.release(nbytes)


def _cpu_spectrum(box: list[Delta], precision: str, threads: int) -> Spectrum:
    """One matrix on a CPU worker: energy and matrix products on `threads` threads, eigensolver on one.

    The delta comes in a one-item list that is emptied here, so ΔW is freed when this returns, before the
    future's done callbacks release its bytes to the reader.
    """
    delta = box.pop()
    if delta.values is None:
        return _factored_spectrum(delta, CPU)
    x = delta.values.unsqueeze(0)
    with cpu_threads(threads):
        energy = float(frobenius_energy(x)[0])
        if precision == "exact":
            s, method = exact_values(x).numpy()[0], "svd-f64"
    if precision != "exact":
        values, methods = fast_values(x, gemm_threads=threads)
        s, method = values[0], methods[0]
    d = delta
    return Spectrum(d.name, d.shape, s, energy, d.base_norm, d.dtype, d.noise_energy, method)


def _compute_batch(batch: list[Delta], precision: str, device: torch.device) -> list[Spectrum]:
    """A stack of same-shape matrices in one call on `device` (the CUDA path)."""
    if batch[0].values is None:
        return [_factored_spectrum(d, device) for d in batch]
    values = [d.values for d in batch if d.values is not None]
    x = (values[0].unsqueeze(0) if len(values) == 1 else torch.stack(values)).to(device)
    del values
    energy = frobenius_energy(x).cpu().numpy()
    if precision == "exact":
        s, methods = exact_values(x).cpu().numpy(), ["svd-f64"] * len(batch)
    else:
        s, methods = fast_values(x)
    return [
        Spectrum(d.name, d.shape, s[i], float(energy[i]), d.base_norm, d.dtype, d.noise_energy, methods[i])
        for i, d in enumerate(batch)
    ]


def _factored_spectrum(delta: Delta, device: torch.device) -> Spectrum:
    assert delta.factors is not None
    b, a = (f.to(device) for f in delta.factors)
    s, energy = factored_values(b, a)
    d = delta
    return Spectrum(d.name, d.shape, s, energy, d.base_norm, d.dtype, d.noise_energy, "factored-f64")


def _load_trim() -> Callable[[], object]:
    """glibc's malloc_trim(0) (return freed heap memory to the system), or a no-op elsewhere."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    return lambda: trim(0)


_trim = _load_trim()
