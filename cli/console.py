"""The terminal plumbing every command shares: results to stdout, progress, logs and errors to stderr, and the
mapping of problems the user can fix onto one line and an exit code (1 inputs, 2 settings, 130 interrupted)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import NoReturn, cast

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import track

from spectra import OptionsError, ProgressHook, SpectraError

out, err = Console(), Console(stderr=True, soft_wrap=True)  # messages never wrap mid-path
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out = Console(width=130)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(code=code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn problems the user can fix into one line on stderr and exit 1 (2 for bad settings)."""
    try:
        yield
    except OptionsError as exc:
        fail(str(exc), code=2)
    except SpectraError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted; no output was written", code=130)


def setup_logging(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err)])


def progress(description: str) -> ProgressHook:
    """A progress bar on stderr (a terminal only: logs stay clean), in the shape of the library's progress hook."""
    if not err.is_terminal:
        return lambda items: items
    return cast(ProgressHook, partial(track, description=description, console=err, transient=True))


def wrote(path: object) -> None:
    err.print(f"wrote {escape(str(path))}")
