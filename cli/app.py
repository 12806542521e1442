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
from spectra import Analysis, OptionsError, SpectraError, analyze, load_analysis, save_analysis
from spectra.pipeline import ProgressHook, identity
from spectra.records import DEFAULT_LORA_RANKS, Options

from . import display

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Spectral analysis of fine-tunes: how much rank did ΔW = W_tuned − W_base really learn?",
)
out, err = Console(), Console(stderr=True, soft_wrap=True)  # messages never wrap mid-path
if not out.is_terminal:  # piped or captured: do not squeeze tables into 80 columns
    out = Console(width=130)

CHECKPOINT_HELP = "a .safetensors file, a model folder (single file or shards), or a hub id org/name[@revision]"
Checkpoint = Annotated[str, typer.Argument(help=CHECKPOINT_HELP)]
Tuned = Annotated[
    str | None,
    typer.Argument(
        help="the fine-tune: same forms, or a PEFT LoRA adapter folder; "
        "with one argument, that argument is an adapter analysed alone"
    ),
]
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
    """A progress bar on stderr (a terminal only: logs stay clean), in the shape of the library's progress hook."""
    if not err.is_terminal:
        return identity
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
    tuned: Tuned = None,
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
    download: Annotated[bool, typer.Option(help="let huggingface_hub fetch a hub id missing from the cache")] = False,
    verbose: Verbose = False,
) -> None:
    """Print, per matrix, the rank that explains THRESHOLD of ΔW = TUNED − BASE's energy, with the measures around it.

    `spectra rank ADAPTER` (one argument) analyses a PEFT LoRA adapter alone, from its factors.
    """
    setup_logging(verbose)
    with user_errors():
        options = Options(
            threshold=threshold,
            lora_ranks=parse_ranks(lora_ranks),
            device=device,
            precision=precision,
            include=include,
            exclude=exclude,
            batch_bytes=batch_bytes,
            threads=threads,
            download=download,
        )
        base_path, tuned_path = (base, tuned) if tuned is not None else (None, base)
        analysis = analyze(base_path, tuned_path, options, progress=progress("spectra"))
        if json_path is not None:
            save_analysis(analysis, json_path)
            err.print(f"wrote {escape(str(json_path))}")
        if html is not None:
            write_html(analysis, html)
    if tsv:
        typer.echo(display.layer_tsv(analysis.layers, options.lora_ranks))
    else:
        out.print(display.rank_report(analysis))


def write_html(analysis: Analysis, path: Path) -> None:
    from spectra.report.html import write_report  # matplotlib loads only when a report is asked for

    write_report(analysis, path)
    err.print(f"wrote {escape(str(path))}")


@app.command()
def report(
    analysis_json: Annotated[Path, typer.Argument(help="an analysis written by `spectra rank ... --json`")],
    output: Annotated[Path, typer.Option("--output", "-o", help="the HTML file to write")] = Path("report.html"),
) -> None:
    """Write a self-contained HTML report from a saved analysis (no SVD is recomputed)."""
    with user_errors():
        write_html(load_analysis(analysis_json), output)


@app.command()
def recommend(
    analysis_json: Annotated[Path, typer.Argument(help="an analysis written by `spectra rank ... --json`")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="adapter_config.json, or a folder")] = None,
    target: Annotated[float, typer.Option(help="share of ΔW's energy the uniform rank must capture")] = 0.9,
    max_rank: Annotated[int, typer.Option(help="largest uniform rank to recommend")] = 256,
    budget: Annotated[int | None, typer.Option(help="parameters for per-module ranks (default: uniform r's)")] = None,
    rslora: Annotated[bool, typer.Option(help="use rsLoRA scaling (α/√r) with α matched to the same scale")] = False,
    include_embeddings: Annotated[bool, typer.Option(help="also target embeddings and lm_head")] = False,
    base_model: Annotated[str | None, typer.Option(help="base_model_name_or_path to put in the config")] = None,
) -> None:
    """Recommend a LoRA configuration (rank, rank_pattern, alpha, target modules) that PEFT loads."""
    from spectra.lora.recommend import recommend as make_recommendation
    from spectra.lora.recommend import write_adapter_config

    with user_errors():
        if not 0.0 < target <= 1.0:
            raise OptionsError(f"--target must be in (0, 1], got {target}")
        if max_rank < 1 or (budget is not None and budget < 1):
            raise OptionsError("--max-rank and --budget must be positive")
        analysis = load_analysis(analysis_json)
        rec = make_recommendation(
            analysis.layers,
            target=target,
            max_rank=max_rank,
            budget=budget,
            rslora=rslora,
            include_embeddings=include_embeddings,
            base_model=base_model,
        )
        if rec is None:
            raise SpectraError(f"{analysis_json}: no analysed matrices to recommend a LoRA for")
        if output is not None:
            written = write_adapter_config(rec, output)
            err.print(f"wrote {escape(str(written))}")
    out.print(display.recommendation_view(rec))


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="where the HTML report goes")] = Path("reports"),
    fresh: Annotated[bool, typer.Option(help="retrain instead of reusing cached fine-tunes")] = False,
    threads: Annotated[int, typer.Option(help="CPU threads for training (one is often fastest on 2 cores)")] = 1,
    steps: Annotated[int, typer.Option(help="optimizer steps per fine-tune")] = 40,
    verbose: Verbose = False,
) -> None:
    """Fine-tune a real model two ways (full, LoRA r=8) on a real task, offline, and compare the ranks learned."""
    from spectra_demo.app import run_demo

    setup_logging(verbose)
    with user_errors():
        if threads < 1 or steps < 1:
            raise OptionsError("--threads and --steps must be at least 1")
        result = run_demo(
            out_dir,
            fresh=fresh,
            threads=threads,
            steps=steps,
            echo=lambda line: err.print(escape(line)),
            progress=progress("working"),
        )
    out.print(display.demo_summary(result))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
