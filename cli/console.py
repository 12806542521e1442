"""The terminal plumbing every command shares: results to stdout, progress, logs and errors to stderr, and the
mapping of problems the user can fix onto one line and an exit code (1 inputs, 2 settings, 130 interrupted, 143
terminated).

Consoles are made per call, so the width is the terminal's (or $COLUMNS) at the time a command prints.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

import spectra
from spectra import OptionsError, ProgressHook, SpectraError, printable

from .launch import ignore_signals, interrupted_code, memory_problem, say_error

PIPE_WIDTH = 130  # tables written to a pipe or file without $COLUMNS: wide enough to keep every column


def stdout() -> Console:
    """Results. On a terminal: its width. Piped: $COLUMNS or PIPE_WIDTH for tables, and prose is never hard-wrapped."""
    console = Console(highlight=False)
    if console.is_terminal:
        return console
    width = os.environ.get("COLUMNS", "")
    return Console(highlight=False, soft_wrap=True, width=int(width) if width.isdigit() else PIPE_WIDTH)


def stderr() -> Console:
    """Messages, progress and errors; long lines are never wrapped mid-path."""
    return Console(stderr=True, soft_wrap=True, highlight=False)


def fail(message: str, code: int = 1) -> NoReturn:
    stderr().print(f"[red]error:[/red] {escape(printable(message))}")
    raise typer.Exit(code=code)


@contextmanager
def user_errors(outputs: spectra.Outputs | None = None) -> Iterator[None]:
    """Turn problems the user can fix into one line on stderr and exit 1 (2 for bad settings); an interrupt (Ctrl-C,
    SIGTERM) into one line saying what `outputs` holds, and exit 128 + the signal; a failed allocation into one line
    saying so (the address-space limit, when one is set)."""
    try:
        with spectra.interruptible():  # `run` holds signals elsewhere: here they can be cleaned up after and told
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
    """Run the command line: SIGINT and SIGTERM raise KeyboardInterrupt once, inside a command's `user_errors` (so
    its cleanup runs for both and it says what was written); outside, while the parser runs or the results print,
    they are held back (a Ctrl-C before the command starts reaches it as it starts; one after it ended is
    dropped); later ones are ignored until the process exits: a second Ctrl-C cannot cut the cleanup short (it once
    aborted the process with SIGABRT, threads still running)."""
    try:
        with spectra.interrupts(), spectra.held_signals():
            command()
    except KeyboardInterrupt as exc:  # a command without user_errors
        say_error("interrupted; no output was written")
        raise SystemExit(interrupted_code(exc)) from None
    finally:
        ignore_signals()


def setup_logging(verbose: bool) -> None:
    if verbose:
        from rich.logging import RichHandler

        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=stderr())])


def say(message: str, *, terminal_only: bool = False) -> None:
    """One line on stderr (not markup: paths and keys are printed as they are, control characters escaped);
    `terminal_only` for progress-like lines, which piped stderr (scripts, logs) does without."""
    console = stderr()
    if console.is_terminal or not terminal_only:
        console.print(escape(printable(message)))


def status(message: str) -> None:
    """A line for a person watching, on a terminal only like the progress bar (piped stderr keeps an error to one
    line): what is being read before the bar appears."""
    console = stderr()
    if console.is_terminal:
        console.print(escape(printable(message)))


def _item_name(item: Any) -> str:
    """The matrix a progress item is about: a record with a name, or a (job, result) pair."""
    if isinstance(item, tuple) and item:
        item = item[0]
    return printable(str(getattr(item, "name", "")))


def progress(description: str, unit: str = "matrices") -> ProgressHook:
    """A progress bar on stderr showing `n/N matrices` and the matrix just done (a terminal only: logs stay clean),
    in the shape of the library's progress hook."""
    console = stderr()
    if not console.is_terminal:
        return lambda items: items

    def hook(items: Iterable[Any]) -> Iterator[Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        total = len(items) if isinstance(items, Sized) else None
        columns = (
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn(unit),
            TimeElapsedColumn(),
            TextColumn("{task.fields[current]}", style="dim"),
        )
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=total, current="")
            for item in items:
                bar.update(task, advance=1, current=_item_name(item)[-60:])
                yield item

    return hook


def wrote(path: object) -> None:
    say(f"wrote {path}")
