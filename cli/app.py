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
    Options,
    OptionsError,
    ProgressHook,
    RecommendSettings,
    SpectraError,
    load_analysis,
    save_analysis,
    write_adapter_config,
)

from . import display
from .commands import compare as compare_command
from .commands import sweep as sweep_command
from .commands import trajectory as trajectory_command
from .commands.extract import extract as extract_command
from .commands.resize import resize as resize_command
from .console import progress, run, say, setup_logging, stdout, user_errors, wrote
from .flags import Verbose, options_flags
from .outputs import Resume, resume_journal, wrote_all

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Spectral analysis of fine-tunes: how much rank did ΔW = W_tuned − W_base really learn?",
)

CHECKPOINT_HELP = "a .safetensors file, a model folder (single file or shards), or a hub id org/name[@revision]"
Checkpoint = Annotated[str, typer.Argument(help=escape(CHECKPOINT_HELP))]  # escape: [@revision] is not markup
Tuned = Annotated[
    list[str] | None,
    typer.Argument(
        help="the fine-tune: same forms, or a PEFT LoRA adapter folder; "
        "with one argument, that argument is an adapter analysed alone; several: analysed side by side",
        show_default=False,
    ),
]
AnalysisJson = Annotated[Path, typer.Argument(help="an analysis written by `spectra rank ... --json`")]
FORMATS = ("table", "markdown", "tsv")
STDOUT = Path("-")


def show_version(value: bool) -> None:
    if value:
        typer.echo(f"spectra {spectra.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=show_version, is_eager=True, help="print the version")
    ] = False,
) -> None:
    """Spectral analysis of fine-tunes: how much rank did ΔW = W_tuned − W_base really learn?"""


JsonOut = Annotated[
    Path | None, typer.Option("--json", help="write the full analysis (spectra included) to FILE, or - for stdout")
]
SummaryJsonOut = Annotated[
    Path | None,
    typer.Option("--summary-json", help="write a compact JSON (no singular values) to FILE, or - for stdout"),
]
Format = Annotated[str, typer.Option("--format", help="table | markdown | tsv (per-matrix rows, full keys)")]
Summary = Annotated[bool, typer.Option("--summary", "-q", help="print the per-kind summary and recommendation only")]
PerMatrix = Annotated[
    bool | None,
    typer.Option(
        "--per-matrix/--no-per-matrix",
        help=f"print one row per matrix (default: when there are at most {display.PER_MATRIX_MAX})",
        show_default=False,
    ),
]


@app.command()
@options_flags
def rank(
    base: Checkpoint,
    tuned: Tuned = None,
    json_path: JsonOut = None,
    summary_json: SummaryJsonOut = None,
    html: Annotated[Path | None, typer.Option(help="write a self-contained HTML report")] = None,
    fmt: Format = "table",
    tsv: Annotated[bool, typer.Option(help="the same as --format tsv")] = False,
    summary: Summary = False,
    per_matrix: PerMatrix = None,
    label: compare_command.Labels = None,
    resume: Resume = None,
    *,
    options: Options,
) -> None:
    """Print, per matrix, the rank that explains THRESHOLD of ΔW = TUNED − BASE's energy, with the measures around it.

    `spectra rank ADAPTER` (one argument) analyses a PEFT LoRA adapter alone, from its factors; `spectra rank BASE
    T1 T2 …` analyses several fine-tunes of one base side by side (--label names them).
    """
    if tuned and len(tuned) > 1:
        return compare_command.rank_side_by_side(base, tuned, label, json_path, html, tsv, options)
    base_path, tuned_path = (base, tuned[0]) if tuned else (None, base)
    outputs = spectra.Outputs([base_path, tuned_path])
    with user_errors(outputs), outputs:
        fmt = "tsv" if tsv else fmt.lower()
        if fmt not in FORMATS:
            raise OptionsError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if json_path == STDOUT and summary_json == STDOUT:
            raise OptionsError("--json - and --summary-json - would both write to stdout; give one a FILE")
        json_out = outputs.file(None if json_path == STDOUT else json_path, "--json")
        summary_out = outputs.file(None if summary_json == STDOUT else summary_json, "--summary-json")
        html_out = outputs.file(html, "--html")
        journal = resume_journal(outputs, json_out or summary_out or html_out, resume)
        reading = f"reading {base_path} and {tuned_path}" if base_path is not None else f"reading adapter {tuned_path}"
        say(reading, terminal_only=True)
        analysis = spectra.analyze(base_path, tuned_path, options, progress=progress("ΔW spectra"), journal=journal)
        if json_out is not None:
            save_analysis(analysis, outputs.stage(json_out))
        if summary_out is not None:
            spectra.save_summary(analysis, outputs.stage(summary_out))
        if html_out is not None:
            spectra.write_report(analysis, outputs.stage(html_out))  # matplotlib loads only when asked for
    wrote_all(outputs)
    if STDOUT in (json_path, summary_json):  # stdout holds the JSON alone
        typer.echo(spectra.to_json(analysis, summary=summary_json == STDOUT), nl=False)
    elif fmt == "tsv":
        typer.echo(display.layer_tsv(analysis.layers, options.lora_ranks))
    elif fmt == "markdown":
        typer.echo(display.markdown_report(analysis, per_matrix=per_matrix, summary_only=summary), nl=False)
    else:
        out = stdout()
        if summary:
            out.print(display.summary_report(analysis, out.width))
        else:
            out.print(display.rank_report(analysis, out.width, per_matrix=per_matrix))


@app.command()
def report(
    analysis_json: AnalysisJson,
    output: Annotated[Path, typer.Option("--output", "-o", help="the HTML file to write")] = Path("report.html"),
) -> None:
    """Write a self-contained HTML report from a saved record: an analysis, a comparison, a trajectory, a sweep (no
    SVD is recomputed)."""
    outputs = spectra.Outputs([analysis_json])
    with user_errors(outputs), outputs:
        target = outputs.file(output, "--output")
        spectra.write_record_report(spectra.load_record(analysis_json), outputs.stage(target))
    wrote_all(outputs)


TASK_TYPE_HELP = (
    "PEFT task_type in the config: auto (from the base's config.json, none when it says nothing), none (a bare "
    "model, any architecture) or CAUSAL_LM, SEQ_CLS, SEQ_2_SEQ_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION"
)


@app.command()
def recommend(
    analysis_json: AnalysisJson,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="adapter_config.json, or a folder")] = None,
    target: Annotated[float, typer.Option(help="share of ΔW's energy the uniform rank must capture")] = 0.9,
    max_rank: Annotated[int, typer.Option(help="largest uniform rank to recommend")] = 256,
    budget: Annotated[int | None, typer.Option(help="parameters for per-module ranks (default: uniform r's)")] = None,
    rslora: Annotated[
        bool | None,
        typer.Option(
            "--rslora/--no-rslora",
            help="rsLoRA scaling (α/√r, α fixed at 2√8) instead of α = 2r; default: when a rank exceeds 16",
            show_default=False,
        ),
    ] = None,
    include_embeddings: Annotated[bool, typer.Option(help="also target embeddings and lm_head")] = False,
    base_model: Annotated[str | None, typer.Option(help="base_model_name_or_path to put in the config")] = None,
    task_type: Annotated[str, typer.Option(help=TASK_TYPE_HELP)] = "auto",
    variant: Annotated[
        str, typer.Option(help="the config to write: per-module (rank_pattern) or uniform (one r everywhere)")
    ] = "per-module",
    rule: Annotated[
        str | None, typer.Option(help="rank rule: stable (default), gd, mp, energy (reconstructs ΔW)")
    ] = None,
) -> None:
    """Recommend a LoRA configuration (rank, rank_pattern, alpha, target modules) that PEFT loads."""
    outputs = spectra.Outputs([analysis_json])
    with user_errors(outputs), outputs:
        config_out = outputs.file(config_path(output), "--output")
        analysis = load_analysis(analysis_json)
        task = {"auto": analysis.task_type, "none": None}.get(task_type.lower(), task_type)
        settings = RecommendSettings(
            target=target,
            max_rank=max_rank,
            budget=budget,
            rslora=rslora,
            include_embeddings=include_embeddings,
            base_model=base_model or analysis.base_model_name,
            task_type=task,
            variant=variant,
            **({"rule": rule} if rule is not None else {}),
        )
        rec = spectra.recommend(analysis.layers, settings)
        if rec is None:
            raise SpectraError(f"{analysis_json}: no analysed matrices to recommend a LoRA for")
        if config_out is not None:
            write_adapter_config(rec, outputs.stage(config_out))
    written_to = None if config_out is None else outputs.label(config_out)
    if written_to is not None:
        wrote(f"{written_to} ({display.written_variant(rec)})")
    out = stdout()
    out.print(display.recommendation_view(rec, out.width, written=None if written_to is None else str(written_to)))


def config_path(output: Path | None) -> Path | None:
    """The adapter_config.json that `recommend -o OUTPUT` writes: OUTPUT itself if it ends in .json, else inside."""
    return output if output is None or output.suffix.lower() == ".json" else output / "adapter_config.json"


app.command("extract")(extract_command)
app.command("resize")(resize_command)


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
    out_dir: Annotated[Path, typer.Option("--out", help="where the HTML report goes")] = Path("spectra-demo"),
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
            echo=say,
            progress=progress("working"),
        )
    stdout().print(summary)


compare_command.register(app)
trajectory_command.register(app)
sweep_command.register(app)


def main() -> None:
    run(app)


if __name__ == "__main__":
    main()
