"""Read-ahead for the local executor: a background thread that produces items one ahead of the consumer, and the
byte ledger that holds it back while too much memory is in flight."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Final, Generic, TypeVar

import torch

T = TypeVar("T")


class Ledger:
    """Bytes held: ΔW read ahead and not yet computed, and results not yet handed over. The reader charges and
    waits; the consumer charges results and releases both."""

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


class Signal:
    """What `ReadAhead.next` returns instead of an item: the reader is done, or something else happened (a wake)."""


DONE: Final = Signal()
WAKE: Final = Signal()


class ReadAhead(Generic[T]):
    """Run `items` on a reader thread, one item ahead; its errors are re-raised in the consumer.

    The reader starts on item i+1 once item i is taken, and waits with i+1 ready until i+1 is taken: it never
    holds more than one finished item. With a ledger, it also waits before starting an item until the ledger is
    within its limit, and charges each item's `size` to it (the consumer releases it once the item is done with).
    Other threads may `wake` a consumer blocked in `next`.

    Args:
        items: the producer; it runs entirely on the reader thread.
        reader_threads: torch intra-op threads for the reader (thread counts are per calling thread); None: as is.
        ledger: bytes held, released by the consumer; None: no limit besides one item ahead.
        size: an item's bytes for the ledger.
    """

    def __init__(
        self,
        items: Iterator[T],
        reader_threads: int | None = None,
        ledger: Ledger | None = None,
        size: Callable[[T], int] | None = None,
    ) -> None:
        self._items, self._threads, self._ledger, self._size = items, reader_threads, ledger, size
        self._events: queue.Queue[object] = queue.Queue()
        self._taken = threading.Semaphore(0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="spectra-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        if self._threads is not None:
            torch.set_num_threads(self._threads)
        try:
            while self._ledger is None or self._ledger.wait_within(self._stop):
                item = next(self._items, DONE)
                if item is DONE:
                    self._events.put(DONE)
                    return
                if self._ledger is not None and self._size is not None:
                    self._ledger.charge(self._size(item))  # type: ignore[arg-type]  # not DONE: a T
                self._events.put(item)
                del item
                while not self._taken.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
        except BaseException as exc:  # handed to the consumer, which re-raises it
            self._events.put(exc)

    def wake(self) -> None:
        self._events.put(WAKE)

    def next(self) -> T | Signal:
        """The next item (blocking), or DONE, or WAKE when `wake` was called first. Raises the reader's errors."""
        got = self._events.get()
        if got is WAKE:
            return WAKE
        self._taken.release()
        if isinstance(got, BaseException):
            raise got
        return got  # type: ignore[return-value]  # a T or DONE

    def __iter__(self) -> Iterator[T]:
        while True:
            got = self.next()
            if got is DONE:
                return
            if not isinstance(got, Signal):
                yield got
            del got

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
