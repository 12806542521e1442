"""`spectra compare BASE A B` and `spectra rank BASE T1 T2 …` (side by side): parse, build settings, call one
library function, display, write the record (JSON) and its page (HTML)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group, RenderableType
from rich.table import Table

import spectra
from spectra import (
    CompareSettings,
    Comparison,
    Options,
    OptionsError,
    SideBySide,
)

from ..console import progress, user_errors
from ..flags import options_flags
from ..outputs import wrote_all

Labels = Annotated[
    list[str] | None, typer.Option("--label", help="a name per fine-tune in tables and plots (repeat, in order)")
]
JsonOut = Annotated[
    Path | None,
    typer.Option("--json", help="write the record (reloadable by `spectra report`) to FILE, or - for stdout"),
]
HtmlOut = Annotated[Path | None, typer.Option("--html", help="write a self-contained HTML page")]


def results() -> Console:
    """Results go to stdout; a pipe gets wide lines rather than tables squeezed into 80 columns."""
    console = Console()
    return console if console.is_terminal else Console(width=130)


def parse_ints(flag: str, text: str) -> tuple[int, ...]:
    """ "16,64" -> (16, 64); the library validates the values."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise OptionsError(f"{flag} takes comma-separated integers like 16,64, got {text!r}") from None


STDOUT = Path("-")


def plan_outputs(outputs: spectra.Outputs, json_path: Path | None, html: Path | None) -> tuple[Path | None, ...]:
    """The record's and the page's paths (None for `--json -`), refused before anything runs if one is an input or
    both are one file."""
    return outputs.file(None if json_path == STDOUT else json_path, "--json"), outputs.file(html, "--html")


def write_outputs(
    outputs: spectra.Outputs,
    record: spectra.Comparison | spectra.Trajectory | SideBySide,
    json_path: Path | None,
    html: Path | None,
) -> None:
    """Stage the page and the record; they appear together when the `with outputs:` block ends."""
    if html is not None:
        spectra.write_record_report(record, outputs.stage(html))  # matplotlib loads only when a page is asked for
    if json_path is not None:
        spectra.save_record(record, outputs.stage(json_path))


def show(
    record: spectra.Comparison | spectra.Trajectory | SideBySide, json_path: Path | None, view: RenderableType
) -> None:
    """Tables to stdout, or the record's JSON alone with `--json -`."""
    if json_path == STDOUT:
        typer.echo(spectra.record_to_json(record))
    else:
        results().print(view)


def _short(names: Sequence[str]) -> dict[str, str]:
    """Display names: the common dotted prefix (up to a block index: "layers.3.q_proj") and `.weight` dropped."""
    common = os.path.commonprefix(list(names)) if len(names) > 1 else ""  # noqa: RUF071 - cut back to a dot below
    parts = common.split(".")[:-1]
    while parts and len(names) > 1 and all(n.split(".")[len(parts)].isdigit() for n in names):
        parts.pop()
    prefix = ".".join(parts) + "." if parts else ""
    return {n: n[len(prefix) :].removesuffix(".weight") or n for n in names}


def _n(x: float | int | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    return str(x) if isinstance(x, int) else f"{x:.{digits}g}"


def _share(x: float | None) -> str:
    """A value in [0, 1] (φ, chance level) with three decimals."""
    return "—" if x is None else f"{x:.3f}"


def _phi(values: object, k: int) -> float | None:
    import numpy as np

    v = np.asarray(values)
    return float(v[k - 1]) if 0 < k <= v.size and np.isfinite(v[k - 1]) else None


def comparison_view(c: Comparison) -> RenderableType:
    """Per-kind table, the ε sweep of intruders, and the notes."""
    s, (la, lb) = c.settings, c.labels
    table = Table(title=f"compare: {la} = {c.a}  vs  {lb} = {c.b}  (base {c.base})", title_justify="left")
    for col in ("kind", "n", "d"):
        table.add_column(col, justify="left" if col == "kind" else "right")
    for k in s.top_k:
        table.add_column(f"φ({k},{k})", justify="right")
        table.add_column(f"chance {k}/d", justify="right")
    if s.intruders:
        table.add_column(f"intruders {la} (ε={s.epsilon:g})", justify="right")
        table.add_column(f"intruders {lb}", justify="right")
        for r in s.amplification_ranks:
            table.add_column(f"amplif. r={r} {la}/{lb}", justify="right")
    for kc in c.kinds:
        row = [kc.kind, str(kc.n), str(kc.dim)]
        for k in s.top_k:
            row += [_share(_phi(kc.diagonal, k)), _share(min(k / kc.dim, 1.0))]
        if s.intruders:
            row += [_n(kc.intruders_a.get(s.epsilon)), _n(kc.intruders_b.get(s.epsilon))]
            for r in s.amplification_ranks:
                row.append(f"{_n(kc.amplification_a.get(r))}/{_n(kc.amplification_b.get(r))}")
        table.add_row(*row)
    parts: list[RenderableType] = [table]
    if s.intruders:
        sweep = Table(title=f"intruders among the top {s.intruder_k} left singular vectors, all matrices, by ε")
        sweep.add_column("fine-tune", justify="left")
        for e in s.epsilons:
            sweep.add_column(f"{e:g}", justify="right")
        for label, side in ((la, "a"), (lb, "b")):
            totals = [sum(getattr(kc, f"intruders_{side}").get(e, 0) for kc in c.kinds) for e in s.epsilons]
            sweep.add_row(label, *map(str, totals))
        parts.append(sweep)
    parts += [f"note: {n}" for n in c.notes]
    return Group(*parts)


Top = Annotated[str, typer.Option("--top-k", help="subspace sizes k for φ(k, k) and principal angles")]
Side = Annotated[str, typer.Option(help="right (input space, as Hu et al.) | left singular vectors")]
IntrudersFlag = Annotated[bool, typer.Option(help="count intruder dimensions, amplification (full SVD of W_base)")]
IntruderK = Annotated[int, typer.Option(help="top singular vectors of W_tuned examined for intruders")]
Epsilon = Annotated[float, typer.Option(help="intruder threshold on max |cos| with the base's vectors")]
AmpRanks = Annotated[str, typer.Option(help="ranks r of the amplification ‖ΔW‖/‖U_rᵀWV_r‖")]
CHECKPOINT_HELP = "BASE, then the fine-tunes A and B (files, folders, hub ids, or PEFT adapter folders)"


@options_flags
def compare(
    base: Annotated[str, typer.Argument(help="the base checkpoint")],
    tuned: Annotated[list[str] | None, typer.Argument(help="the fine-tunes A and B", show_default=False)] = None,
    top_k: Top = "16,64",
    side: Side = "right",
    intruders: IntrudersFlag = True,
    intruder_k: IntruderK = 10,
    epsilon: Epsilon = 0.5,
    amplification_ranks: AmpRanks = "4,16,64",
    label: Labels = None,
    json_path: JsonOut = None,
    html: HtmlOut = None,
    *,
    options: Options,
) -> None:
    """Compare two fine-tunes of one base: subspace similarity, principal angles, intruder dimensions, amplification."""
    outputs = spectra.Outputs([base, *(tuned or [])])
    with user_errors(outputs), outputs:
        found = tuned or []
        if len(found) != 2:
            raise OptionsError(f"compare takes BASE and exactly two fine-tunes A B, got {len(found)} after BASE")
        if label is not None and len(label) != 2:
            raise OptionsError(f"give --label twice (A, then B), got {len(label)}")
        settings = CompareSettings(
            top_k=parse_ints("--top-k", top_k),
            side=side,
            intruders=intruders,
            intruder_k=intruder_k,
            epsilon=epsilon,
            amplification_ranks=parse_ints("--amplification-ranks", amplification_ranks),
        )
        json_out, html_out = plan_outputs(outputs, json_path, html)
        comparison = spectra.compare_finetunes(
            base, found[0], found[1], settings, options, labels=label, progress=progress("singular vectors")
        )
        write_outputs(outputs, comparison, json_out, html_out)
    wrote_all(outputs)
    show(comparison, json_path, comparison_view(comparison))


def side_by_side_view(record: SideBySide) -> RenderableType:
    """One row per matrix with each input's rank, then one row per module kind with each input's median rank."""
    first = record.analyses[0]
    tau = f"rank@{first.options.threshold:g}"
    names = list(dict.fromkeys(lm.name for a in record.analyses for lm in a.layers))
    short = _short(names)
    ranks = [{lm.name: lm for lm in a.layers} for a in record.analyses]
    matrices = Table(title=f"{tau} side by side (base {first.base})", title_justify="left")
    matrices.add_column("matrix", justify="left", overflow="fold")
    for label in record.labels:
        matrices.add_column(label, justify="right")
    for name in names:
        matrices.add_row(short[name], *(str(r[name].rank) if name in r else "—" for r in ranks))
    lora = first.options.lora_ranks
    what = f"median {tau} (max) · E(r) % at r={'/'.join(map(str, lora))}"
    kinds = Table(title=f"per module kind: {what}", title_justify="left")
    kinds.add_column("kind", justify="left")
    for label in record.labels:
        kinds.add_column(label, justify="right")
    groups = [{g.key: g for g in a.summary.kinds} for a in record.analyses]
    for kind in dict.fromkeys(k for g in groups for k in g):
        cells = []
        for g in groups:
            grp = g.get(kind)
            captured = "" if grp is None else "/".join(f"{100 * grp.captured.get(r, 0.0):.0f}" for r in lora)
            cells.append("—" if grp is None else f"{grp.median_rank:g} ({grp.max_rank}) · {captured}")
        kinds.add_row(kind, *cells)
    return Group(matrices, kinds)


def side_by_side_tsv(record: SideBySide) -> str:
    """Per-matrix TSV rows of every input, the input's label in a first column."""
    lora = record.analyses[0].options.lora_ranks
    head = ["input", "name", "rows", "cols", "rank", "random_rank", "stable_rank", "relative_change"]
    rows = ["\t".join([*head, *(f"captured_{r}" for r in lora)])]
    for label, analysis in zip(record.labels, record.analyses, strict=True):
        for m in analysis.layers:
            change = "" if m.relative_change is None else f"{m.relative_change:.6g}"
            values = [label, m.name, str(m.shape[0]), str(m.shape[1]), str(m.rank), str(m.random_rank)]
            values += [f"{m.stable_rank:.6g}", change, *(f"{m.captured.get(r, 0.0):.6g}" for r in lora)]
            rows.append("\t".join(values))
    return "\n".join(rows)


def rank_side_by_side(
    base: str | None,
    tuned: Sequence[str],
    labels: Sequence[str] | None,
    json_path: Path | None,
    html: Path | None,
    tsv: bool,
    options: Options,
) -> None:
    """`spectra rank BASE T1 T2 …`: every tuned input against the same base in one stream, shown side by side."""
    outputs = spectra.Outputs([base, *tuned])
    with user_errors(outputs), outputs:
        json_out, html_out = plan_outputs(outputs, json_path, html)
        record = spectra.analyze_side_by_side(base, tuned, options, labels=labels, progress=progress("spectra"))
        write_outputs(outputs, record, json_out, html_out)
    wrote_all(outputs)
    if tsv and json_path != STDOUT:
        typer.echo(side_by_side_tsv(record))
    else:
        show(record, json_path, side_by_side_view(record))


def register(app: typer.Typer) -> None:
    app.command(help=compare.__doc__)(compare)
