"""The terminal plumbing every command shares: results to stdout, progress, logs and errors to stderr, and the
mapping of problems the user can fix onto one line and an exit code (1 inputs, 2 settings, 130 interrupted, 143
terminated)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import NoReturn, cast

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import track

import spectra
from spectra import OptionsError, ProgressHook, SpectraError

from .launch import ignore_signals, interrupted_code, memory_problem, printable, say_error

out, err = Console(), Console(stderr=True, soft_wrap=True)  # messages never wrap mid-path
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out = Console(width=130)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(printable(message))}", highlight=False)
    raise typer.Exit(code=code)


@contextmanager
def user_errors(outputs: spectra.Outputs | None = None) -> Iterator[None]:
    """Turn problems the user can fix into one line on stderr and exit 1 (2 for bad settings); an interrupt (Ctrl-C,
    SIGTERM) into one line saying what `outputs` holds, and exit 128 + the signal; a failed allocation into one line
    saying so (the address-space limit, when one is set)."""
    try:
        yield
    except OptionsError as exc:
        fail(str(exc), code=2)
    except SpectraError as exc:
        fail(str(exc))
    except KeyboardInterrupt as exc:
        fail(interrupted(outputs), code=interrupted_code(exc))
    except (MemoryError, RuntimeError, OSError, ImportError, SystemError) as exc:
        if (message := memory_problem(exc)) is None:
            raise
        say_error(message)  # not through rich: there may be no memory left for it
        raise typer.Exit(code=1) from None


def interrupted(outputs: spectra.Outputs | None) -> str:
    """What an interrupt left: every output (it came after they were in place), or none, and a journal to resume."""
    if outputs is not None and outputs.written:
        written = ", ".join(outputs.label(path) for path in outputs.written)
        return f"interrupted after the outputs were written in full: {written}"
    kept = [(path, spectra.Journal.completed(path)) for path in (outputs.transients if outputs is not None else ())]
    resumable = "".join(
        f" ({n} completed matrices are kept in {outputs.label(path)}: run the same command again to resume)"
        for path, n in kept
        if n and outputs is not None
    )
    return f"interrupted; no output was written{resumable}"


def run(command: Callable[[], object]) -> None:
    """Run the command line: while it runs, SIGINT and SIGTERM raise KeyboardInterrupt once (so a command's cleanup
    runs for both) and later ones are ignored, until the process exits: a second Ctrl-C cannot cut the cleanup
    short (it once aborted the process with SIGABRT, threads still running)."""
    try:
        with spectra.interrupts():
            command()
    finally:
        ignore_signals()


def setup_logging(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err)])


def progress(description: str) -> ProgressHook:
    """A progress bar on stderr (a terminal only: logs stay clean), in the shape of the library's progress hook."""
    if not err.is_terminal:
        return lambda items: items
    return cast(ProgressHook, partial(track, description=description, console=err, transient=True))


def say(message: str) -> None:
    """One line on stderr (not markup: paths and keys are printed as they are)."""
    err.print(escape(printable(message)), highlight=False)


def wrote(path: object) -> None:
    say(f"wrote {path}")
