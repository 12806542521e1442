"""The `spectra` executable's entry point, and the one-line messages for what can stop it before or outside a command.

`main` imports the command line inside a guard, so Ctrl-C while the modules load (torch takes seconds) or an
address-space limit too low for torch's libraries ends in one line on stderr, not a traceback. It needs only the
standard library until the import succeeds.
"""

from __future__ import annotations

import contextlib
import re
import resource
import signal
import sys

INTERRUPTED = 130  # 128 + SIGINT; SIGTERM gives 143
# what torch, oneDNN, glibc and the thread machinery say when an allocation or a mapping fails
_MEMORY = (
    "can't allocate memory",
    "cannot allocate memory",
    "bad_alloc",
    "out of memory",
    "failed to map segment",
    "could not create a primitive",  # oneDNN, under RLIMIT_AS below its reservations
    "can't start new thread",
)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: str) -> str:
    """spectra.printable, without importing spectra (which may be what failed): control characters escaped."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def say_error(message: str) -> None:
    """`error: MESSAGE` on stderr, without rich (which may not be importable, or have no memory left)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"error: {printable(message)}\n")
        sys.stderr.flush()


def ignore_signals() -> None:
    """From now until the process exits, SIGINT and SIGTERM do nothing: the cleanup they asked for is running."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(signum, signal.SIG_IGN)


def interrupted_code(exc: BaseException) -> int:
    """The exit status for an interrupt: 128 + the signal (130 for Ctrl-C, 143 for SIGTERM)."""
    return 128 + int(getattr(exc, "signum", signal.SIGINT))


def memory_problem(exc: BaseException) -> str | None:
    """The one line to print for a failed allocation (torch, oneDNN, a thread, a shared library), or None when
    `exc` is not one. Under an address-space limit (ulimit -v, RLIMIT_AS) the line says so: torch reserves far
    more address space than it uses, so such limits fail in ways that look like bugs."""
    text = str(exc)
    lowered = text.lower()
    limit = _address_space_limit()
    # SystemError: a C extension (torch's import) failing without an exception, as it does when mmap fails
    limited = limit is not None and isinstance(exc, SystemError)
    if (
        not isinstance(exc, MemoryError)
        and not limited
        and not (isinstance(exc, (RuntimeError, OSError, ImportError)) and any(p in lowered for p in _MEMORY))
    ):
        return None
    if "could not create a primitive" in lowered and limit is None:
        return None  # without a limit this is not known to be memory
    what = printable(" ".join(text.split()))[:160] or type(exc).__name__
    if limit is not None:
        return (
            f"out of memory ({what}): the address-space limit (ulimit -v) is {limit >> 20} MiB, less than torch "
            "reserves; raise it (ulimit -v unlimited) or lower --threads and --batch-bytes"
        )
    if "can't start new thread" in lowered:
        return f"cannot start a thread ({what}): a process or thread limit is reached; lower --threads"
    if "cuda" in lowered:
        return f"out of GPU memory ({what}); lower --batch-bytes, or use --device cpu"
    return f"out of memory ({what}); lower --batch-bytes and --threads, or free some memory"


def _address_space_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


class Terminated(KeyboardInterrupt):
    """SIGTERM while the command line loads (spectra.Interrupted takes over once it has)."""

    signum = signal.SIGTERM


class _Loading:
    """The SIGINT and SIGTERM handler while the modules load: the first signal is noted, and acted on once the
    imports are done (raised in the middle of an import, it can land in a finalizer, where Python prints it as
    'Exception ignored' and carries on); after `loaded`, a signal raises KeyboardInterrupt (Terminated)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.holding = True

    def __call__(self, signum: int, frame: object) -> None:
        if self.holding:
            self.signum = self.signum or signum
            return
        raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt

    def loaded(self) -> None:
        self.holding = False
        if self.signum is not None:
            raise Terminated if self.signum == signal.SIGTERM else KeyboardInterrupt


def main() -> None:
    """Run the `spectra` command line (sys.argv)."""
    loading = _Loading()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signum) is not signal.SIG_IGN:  # a background job's SIGINT stays ignored
                signal.signal(signum, loading)
    try:
        try:
            from .app import main as run
        finally:
            loading.loaded()
        run()
    except KeyboardInterrupt as exc:  # while the modules load (the command line handles its own)
        ignore_signals()
        say_error("interrupted; no output was written")
        raise SystemExit(interrupted_code(exc)) from None
    except (ImportError, OSError, MemoryError, RuntimeError, SystemError) as exc:
        message = memory_problem(exc)
        if message is None:
            raise
        say_error(message)
        raise SystemExit(1) from None
