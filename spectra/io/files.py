"""Atomic writes and interrupt safety: a file appears whole or not at all, and no temp file survives a signal.

`write_atomic` writes one file through a temp file and a rename. `interrupts()` makes SIGINT and SIGTERM raise
`Interrupted` (a KeyboardInterrupt) in the main thread, once: cleanup code then runs on the way out (`finally`,
`__exit__`) for both signals, and a second signal while it runs is ignored instead of interrupting the cleanup.
`critical()` holds signals back while a few steps that must not be cut in two (renames, temp removal) run, and
raises one that came meanwhile at its end; `held_signals()` holds them for a whole program except inside
`interruptible()` sections (the command line: only a command's error handling sees them). spectra.io.outputs
builds a run's set of outputs on these.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from spectra.errors import SpectraError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while `interrupts()` was active; `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


class _Guard:
    """The handler `interrupts()` installs: the first signal raises Interrupted, later ones are ignored; inside
    `critical()` a signal is held back and raised when the critical section ends."""

    def __init__(self) -> None:
        self.fired = False
        self.pending: int | None = None
        self.depth = 0

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.fired or self.pending is not None:
            return
        if self.depth:
            self.pending = signum
            return
        self.fired = True
        raise Interrupted(signum)

    def release(self) -> None:
        if self.pending is not None and not self.depth:
            signum, self.pending = self.pending, None
            self.fired = True
            raise Interrupted(signum)


def _active() -> _Guard | None:
    if threading.current_thread() is not threading.main_thread():
        return None
    for signum in SIGNALS:
        if isinstance(handler := signal.getsignal(signum), _Guard):
            return handler
    return None


@contextlib.contextmanager
def interrupts() -> Iterator[None]:
    """While active, SIGINT and SIGTERM raise `Interrupted` in the main thread, once; later signals are ignored.

    Nested uses share the outermost guard; a signal the process ignores stays ignored. Outside the main thread
    (where Python cannot set handlers) it does nothing. The previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread() or _active() is not None:
        yield
        return
    guard = _Guard()
    # a signal the process ignores (a background job's SIGINT) stays ignored
    previous = {s: h for s in SIGNALS if (h := signal.getsignal(s)) is not signal.SIG_IGN}
    try:
        for signum in previous:
            signal.signal(signum, guard)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs (under `interrupts()`); one that arrived meanwhile is raised
    as `Interrupted` when the block ends. Without an active guard it does nothing."""
    guard = _active()
    if guard is None:
        yield
        return
    guard.depth += 1
    try:
        yield
    finally:
        guard.depth -= 1
    guard.release()


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs (under `interrupts()`), except inside `interruptible()`
    sections, where one held back is raised at once; one still held when the block ends is dropped.

    A command line holds signals from start-up to exit and lets them through where a command can clean up and say
    so (its error handling): a Ctrl-C while the parser runs then reaches the command, not the parser's own handler.
    """
    guard = _active()
    if guard is None:
        yield
        return
    guard.depth += 1
    try:
        yield
    finally:
        guard.depth -= 1
        if not guard.depth:
            guard.pending = None


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Let SIGINT and SIGTERM through again inside `held_signals()` (a signal held back is raised here, first)."""
    guard = _active()
    if guard is None:
        yield
        return
    depth, guard.depth = guard.depth, 0
    try:
        guard.release()
        yield
    finally:
        guard.depth = depth


def umask() -> int:
    """The process's umask (read without changing it where /proc allows; files get 0o666 & ~umask)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(target: Path) -> str:
    """The prefix of hidden temp files next to `target`: `.NAME.` (mkstemp adds random characters and a suffix)."""
    return f".{target.name}."


def write_temp(target: Path, data: bytes) -> Path:
    """Write `data` to a new hidden temp file next to `target` (fsynced, mode 0o666 & ~umask); return its path.

    The temp file is removed again if writing fails or is interrupted.

    Raises:
        OSError: the folder is not writable, the disk is full, ...
    """
    tmp: Path | None = None
    fd = -1
    try:
        with critical():  # created and named in one step: an interrupt cannot orphan it
            fd, name = tempfile.mkstemp(dir=target.parent, prefix=temp_prefix(target), suffix=".tmp")
            tmp = Path(name)
        with os.fdopen(fd, "wb") as fh:
            fd = -1
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600
    except BaseException:
        with critical():
            if fd >= 0:
                os.close(fd)
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` via a temp file in the same folder, fsync and os.replace: never a half-written file.

    Creates missing parent folders; the file gets the permissions `open()` would give it. An error, Ctrl-C or
    SIGTERM (handled as Ctrl-C while this runs) leaves no temp file and the old file, if any, unchanged.

    Raises:
        SpectraError: the file cannot be written (permissions, disk full, ...).
    """
    with interrupts():
        tmp: Path | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = write_temp(path, text.encode("utf-8"))
            with critical():
                os.replace(tmp, path)
                tmp = None
        except OSError as exc:
            raise SpectraError(f"{path}: cannot write ({exc.strerror or exc}); check the folder is writable") from None
        finally:
            if tmp is not None:
                with critical():
                    tmp.unlink(missing_ok=True)
    return path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (renames into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported.

    Raises:
        OSError: the swap is supported but failed.
    """
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))
