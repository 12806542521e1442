"""The `spectra` command line: parse, build settings, call one library function, display. Exit 1 for input problems,
2 for usage errors, never a traceback for either."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Protocol, cast

import typer
from rich.console import RenderableType
from rich.markup import escape

import spectra
from spectra import (
    Analysis,
    Options,
    ProgressHook,
    RecommendSettings,
    SpectraError,
    analyze,
    load_analysis,
    save_analysis,
    write_adapter_config,
)

from . import display
from .console import err, out, progress, setup_logging, user_errors, wrote
from .flags import Verbose, options_flags

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Spectral analysis of fine-tunes: how much rank did ΔW = W_tuned − W_base really learn?",
)

CHECKPOINT_HELP = "a .safetensors file, a model folder (single file or shards), or a hub id org/name[@revision]"
Checkpoint = Annotated[str, typer.Argument(help=escape(CHECKPOINT_HELP))]  # escape: [@revision] is not markup
Tuned = Annotated[
    str | None,
    typer.Argument(
        help="the fine-tune: same forms, or a PEFT LoRA adapter folder; "
        "with one argument, that argument is an adapter analysed alone"
    ),
]
AnalysisJson = Annotated[Path, typer.Argument(help="an analysis written by `spectra rank ... --json`")]


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
@options_flags
def rank(
    base: Checkpoint,
    tuned: Tuned = None,
    json_path: Annotated[Path | None, typer.Option("--json", help="write the full analysis (spectra included)")] = None,
    html: Annotated[Path | None, typer.Option(help="write a self-contained HTML report")] = None,
    tsv: Annotated[bool, typer.Option(help="print per-matrix rows as TSV instead of tables")] = False,
    *,
    options: Options,
) -> None:
    """Print, per matrix, the rank that explains THRESHOLD of ΔW = TUNED − BASE's energy, with the measures around it.

    `spectra rank ADAPTER` (one argument) analyses a PEFT LoRA adapter alone, from its factors.
    """
    with user_errors():
        base_path, tuned_path = (base, tuned) if tuned is not None else (None, base)
        analysis = analyze(base_path, tuned_path, options, progress=progress("spectra"))
        if json_path is not None:
            wrote(save_analysis(analysis, json_path))
        if html is not None:
            write_html(analysis, html)
    if tsv:
        typer.echo(display.layer_tsv(analysis.layers, options.lora_ranks))
    else:
        out.print(display.rank_report(analysis))


def write_html(analysis: Analysis, path: Path) -> None:
    wrote(spectra.write_report(analysis, path))  # matplotlib loads only when a report is asked for


@app.command()
def report(
    analysis_json: AnalysisJson,
    output: Annotated[Path, typer.Option("--output", "-o", help="the HTML file to write")] = Path("report.html"),
) -> None:
    """Write a self-contained HTML report from a saved analysis (no SVD is recomputed)."""
    with user_errors():
        write_html(load_analysis(analysis_json), output)


@app.command()
def recommend(
    analysis_json: AnalysisJson,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="adapter_config.json, or a folder")] = None,
    target: Annotated[float, typer.Option(help="share of ΔW's energy the uniform rank must capture")] = 0.9,
    max_rank: Annotated[int, typer.Option(help="largest uniform rank to recommend")] = 256,
    budget: Annotated[int | None, typer.Option(help="parameters for per-module ranks (default: uniform r's)")] = None,
    rslora: Annotated[bool, typer.Option(help="use rsLoRA scaling (α/√r) with α matched to the same scale")] = False,
    include_embeddings: Annotated[bool, typer.Option(help="also target embeddings and lm_head")] = False,
    base_model: Annotated[str | None, typer.Option(help="base_model_name_or_path to put in the config")] = None,
    task_type: Annotated[str, typer.Option(help="PEFT task_type in the config ('none': a bare model)")] = "CAUSAL_LM",
    rule: Annotated[
        str | None, typer.Option(help="rank rule: stable (default), gd, mp, energy (reconstructs ΔW)")
    ] = None,
) -> None:
    """Recommend a LoRA configuration (rank, rank_pattern, alpha, target modules) that PEFT loads."""
    with user_errors():
        settings = RecommendSettings(
            target=target,
            max_rank=max_rank,
            budget=budget,
            rslora=rslora,
            include_embeddings=include_embeddings,
            base_model=base_model,
            task_type=None if task_type.lower() == "none" else task_type,
            **({"rule": rule} if rule is not None else {}),
        )
        rec = spectra.recommend(load_analysis(analysis_json).layers, settings)
        if rec is None:
            raise SpectraError(f"{analysis_json}: no analysed matrices to recommend a LoRA for")
        if output is not None:
            wrote(write_adapter_config(rec, output))
    out.print(display.recommendation_view(rec))


class DemoApp(Protocol):
    """What `spectra demo` calls in `spectra_demo.app`, the demo application shipped beside the library.

    The CLI imports it by name when the command runs (it loads torch, transformers and peft), never at module
    level. Type checkers cannot resolve `spectra_demo` statically: setuptools maps it onto the folder demo/, which
    mypy checks as the package `demo`. So the CLI states here the one function it relies on, and
    tests/test_demo.py checks that `spectra_demo.app.command` has exactly this signature.
    """

    def command(
        self,
        out_dir: Path,
        *,
        fresh: bool,
        threads: int,
        steps: int,
        echo: Callable[[str], None],
        progress: ProgressHook,
    ) -> RenderableType: ...


def demo_app() -> DemoApp:
    return cast(DemoApp, importlib.import_module("spectra_demo.app"))


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="where the HTML report goes")] = Path("reports"),
    fresh: Annotated[bool, typer.Option(help="retrain instead of reusing cached fine-tunes")] = False,
    threads: Annotated[int, typer.Option(help="CPU threads for training (one is often fastest on 2 cores)")] = 1,
    steps: Annotated[int, typer.Option(help="optimizer steps per fine-tune")] = 40,
    verbose: Verbose = False,
) -> None:
    """Fine-tune a real model two ways (full, LoRA r=8) on a real task, offline, and compare the ranks learned."""
    setup_logging(verbose)
    with user_errors():
        summary = demo_app().command(
            out_dir,
            fresh=fresh,
            threads=threads,
            steps=steps,
            echo=lambda line: err.print(escape(line)),
            progress=progress("working"),
        )
    out.print(summary)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
