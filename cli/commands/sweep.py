"""`spectra sweep BASE TUNED --eval CMD`: the task metric of LoRAs extracted at a ladder of sizes, and the smallest
that keeps the full fine-tune's gain (table on stdout, one progress line per step on stderr)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import spectra
from spectra import Options, Sweep, SweepSettings, printable

from ..console import progress, say, stdout, user_errors
from ..flags import options_flags
from ..outputs import wrote_all

EVAL_HELP = (
    "the evaluation, a shell command template: {model} (required) is replaced by the model to evaluate (BASE's "
    "form), {adapter} by the LoRA folder (empty for base/full), {base}, {tuned}; it must print the metric as the "
    "last line of stdout"
)
Checkpoint = Annotated[str, typer.Argument(help="a .safetensors file, a model folder, or a hub id org/name")]


def sweep(
    base: Checkpoint,
    tuned: Checkpoint,
    eval_cmd: Annotated[str, typer.Option("--eval", help=escape(EVAL_HELP), show_default=False)],
    eval_select: Annotated[
        str | None, typer.Option(help="the evaluation the choice is made on (a validation split); default: --eval")
    ] = None,
    ranks: Annotated[str | None, typer.Option(help="uniform ranks, e.g. 1,2,4 (default 1..128)")] = None,
    budgets: Annotated[str | None, typer.Option(help="per-module budgets: shares like 1%,5% or counts")] = None,
    tolerance: Annotated[float, typer.Option(help="share of the full fine-tune's gain the choice may lose")] = 0.05,
    lower_is_better: Annotated[bool, typer.Option(help="the metric improves downwards (a loss, a perplexity)")] = False,
    recommendation: Annotated[bool, typer.Option(help="also evaluate spectra's rank recommendation")] = True,
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for sweep.json, sweep.html, adapter/")] = Path(
        "spectra-sweep"
    ),
    keep_adapters: Annotated[bool, typer.Option(help="keep every point's adapter in DIR/adapters/")] = False,
    cache: Annotated[Path | None, typer.Option(help="cache folder (default: ~/.cache/spectra/sweep)")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="evaluate everything again, store nothing")] = False,
    timeout: Annotated[float | None, typer.Option(help="seconds before an evaluation is killed (it fails)")] = None,
    target: Annotated[str | None, typer.Option(help="module kinds to adapt, comma-separated (default: all)")] = None,
    include_embeddings: Annotated[bool, typer.Option(help="also adapt embeddings and lm_head")] = False,
    drop_biases: Annotated[
        bool, typer.Option(help="leave changed biases out of the LoRAs (default: lora_bias)")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="replace a non-empty output folder")] = False,
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="[LABEL=]DIR: a LoRA you trained on BASE, evaluated on the same axes (repeatable)"),
    ] = None,
    *,
    options: Options,
) -> None:
    """Extract LoRAs from a full fine-tune at a ladder of ranks and budgets, merge and evaluate each with --eval,
    and recommend the smallest keeping all but --tolerance of the full fine-tune's gain over BASE."""
    outputs = spectra.Outputs([base, tuned])
    with user_errors(outputs), outputs:
        folder = outputs.folder(output, "--output", overwrite=overwrite)
        settings = SweepSettings(
            ranks=None if ranks is None else SweepSettings.parse_ranks(ranks),
            budgets=() if budgets is None else SweepSettings.parse_budgets(budgets),
            recommendation=recommendation,
            tolerance=tolerance,
            lower_is_better=lower_is_better,
            keep_adapters=keep_adapters,
            cache=not no_cache,
            cache_dir=None if cache is None else str(cache),
            targets=None if target is None else tuple(target.split(",")),
            include_embeddings=include_embeddings,
            biases="drop" if drop_biases else "carry",
        )
        trained = dict(_labelled(a) for a in adapter or ())
        if len(trained) < len(adapter or ()):
            raise typer.BadParameter("each --adapter needs its own label", param_hint="--adapter")
        evaluate = spectra.shell_evaluator(eval_cmd, timeout)
        select = None if eval_select is None else spectra.shell_evaluator(eval_select, timeout)
        try:
            record = spectra.sweep(base, tuned, evaluate, settings=settings, select=select, options=options,
                                   out_dir=outputs.stage(folder), overwrite=True, adapters=trained,
                                   page=spectra.sweep_html, echo=say, progress=progress("extract"))  # fmt: skip
        except spectra.EvaluationError as exc:
            for line in (exc.output or "").splitlines():
                say(line)
            raise
    wrote_all(outputs)
    stdout().print(sweep_view(record))


def _labelled(given: str) -> tuple[str, str]:
    """ "LABEL=DIR" -> (LABEL, DIR); "DIR" -> (the folder's name, DIR)."""
    label, sep, folder = given.partition("=")
    if not sep:
        return Path(given).name or given, given
    if not label or not folder:
        raise typer.BadParameter(f"expected LABEL=DIR or DIR, got {given!r}", param_hint="--adapter")
    return label, folder


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.4g}"


def sweep_view(s: Sweep) -> RenderableType:
    """One row per point (size, energy kept, metric, gain, time), the recommendation with its reason, the notes."""
    selecting = s.select_evaluator is not None
    table = Table(title=f"sweep of {escape(printable(s.tuned))} against {escape(printable(s.base))}",
                  title_justify="left")  # fmt: skip
    columns = ["point", "ranks", "modules", "LoRA params", "% dense", "energy kept", "metric", "gain"]
    columns += ["select", "select gain"] if selecting else []
    for col in (*columns, "s", "note"):
        table.add_column(col, justify="left" if col in ("point", "note") else "right", overflow="fold")
    for p in s.points:
        ranks = "—" if not p.n_modules else str(p.rank_max) if p.rank_min == p.rank_max else (
            f"{p.rank_min}–{p.rank_max}")  # fmt: skip
        note = "cached" if p.cached else ""
        if p.error:
            note = f"failed: {p.error}"
        elif p.dense_modules:
            note = f"{p.dense_modules} modules ≥ break-even: not chosen"
        row = [("★ " if p.label == s.chosen else "") + p.label, ranks, str(p.n_modules or "—"), f"{p.lora_params:,}",
               _pct(p.params_share), _pct(p.energy_kept), _num(p.metric), _pct(p.gain)]  # fmt: skip
        row += [_num(p.select_metric), _pct(p.select_gain)] if selecting else []
        table.add_row(*(escape(printable(c)) for c in (*row, f"{p.seconds:.1f}", note)))
    head = "recommended" if s.chosen is not None else "no recommendation"  # the reason starts with the label
    lines = [Text(f"{head}: {printable(s.reason)}", style="bold" if s.chosen else "yellow")]
    lines += [Text(printable(n), style="dim") for n in s.notes]
    return Group(table, *lines)


def register(app: typer.Typer) -> None:
    app.command(help=sweep.__doc__)(options_flags(sweep))
