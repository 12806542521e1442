"""The `spectra` command line: parse, build Options, call one library function, display. Exit 1 for input problems,
2 for usage errors, never a traceback for either."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, NoReturn, cast

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import track

import spectra
from spectra import OptionsError, SpectraError, analyze, save_analysis
from spectra.pipeline import ProgressHook
from spectra.records import DEFAULT_LORA_RANKS, Options
from spectra_cli import display

app = typer.Typer(
    add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
    help="Spectral analysis of fine-tunes: how much rank did ΔW = W_tuned − W_base really learn?",
)
out, err = Console(), Console(stderr=True, soft_wrap=True)  # messages never wrap mid-path
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out = Console(width=130)

Checkpoint = Annotated[str, typer.Argument(help="a .safetensors file or a model folder (single file or shards)")]
DEFAULT_RANKS_TEXT = ",".join(map(str, DEFAULT_LORA_RANKS))
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="log decisions (skips, batches, device) to stderr")]


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


def parse_ranks(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise OptionsError(f"--lora-ranks takes comma-separated integers like 8,16,64, got {text!r}") from None


def setup_logging(verbose: bool) -> None:
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(console=err)])


def progress(description: str) -> ProgressHook:
    """A progress bar on stderr, in the shape the library's progress hook expects."""
    return cast(ProgressHook, partial(track, description=description, console=err, transient=True))


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"spectra {spectra.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=show_version, is_eager=True)] = False,
) -> None:
    """Spectral analysis of fine-tunes: how much rank did ΔW = W_tuned − W_base really learn?"""


@app.command()
def rank(
    base: Checkpoint,
    tuned: Checkpoint,
    threshold: Annotated[float, typer.Option(help="share of ‖ΔW‖_F² the rank must explain, in (0, 1]")] = 0.9,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the full analysis (spectra included)")] = None,
    html: Annotated[Path | None, typer.Option(help="write a self-contained HTML report")] = None,
    tsv: Annotated[bool, typer.Option(help="print per-matrix rows as TSV instead of tables")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    precision: Annotated[str, typer.Option(help="fast (Gram + eigvalsh) | exact (float64 SVD)")] = "fast",
    include: Annotated[str | None, typer.Option(help="analyse only tensors whose name matches this regex")] = None,
    exclude: Annotated[str | None, typer.Option(help="skip tensors whose name matches this regex")] = None,
    lora_ranks: Annotated[str, typer.Option(help="LoRA ranks for captured energy")] = DEFAULT_RANKS_TEXT,
    batch_bytes: Annotated[int | None, typer.Option(help="bytes of ΔW stacked per batch (default: derived)")] = None,
    threads: Annotated[int | None, typer.Option(help="cap on CPU threads (default: torch's)")] = None,
    verbose: Verbose = False,
) -> None:
    """Print, per matrix, the rank that explains THRESHOLD of ΔW's energy, with the measures around it."""
    setup_logging(verbose)
    with user_errors():
        options = Options(threshold=threshold, lora_ranks=parse_ranks(lora_ranks), device=device,
                          precision=precision, include=include, exclude=exclude, batch_bytes=batch_bytes,
                          threads=threads)
        analysis = analyze(base, tuned, options, progress=progress("spectra"))
        if json_path is not None:
            save_analysis(analysis, json_path)
            err.print(f"wrote {escape(str(json_path))}")
    if tsv:
        typer.echo(display.layer_tsv(analysis.layers, options.lora_ranks))
    else:
        out.print(display.rank_report(analysis))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
