"""Records -> rich Tables that fit the console, and TSV/markdown strings. Returns them; never prints.

Tables never cut a number: when a table is wider than the console, columns are dropped (least useful first) and
matrix names shortened for display (the common key prefix is said once, in the caption); keys in records, JSON
and TSV stay verbatim. Every name shown goes through `spectra.printable` (control characters escaped).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from rich import box
from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from spectra import Analysis, GroupSummary, KindUse, LayerMetrics, Recommendation, kind_use, printable, rank_use
from spectra import use_sentences as adapter_sentences

PER_MATRIX_MAX = 40  # up to this many matrices, the per-matrix table is shown by default


# ---------------------------------------------------------------------------------------------------- fitting


@dataclass(frozen=True, slots=True)
class Col:
    """One column: header, cells, and when to drop it (0 never; larger values are dropped first)."""

    header: str
    cells: list[str | Text]
    drop: int = 0
    left: bool = False
    name: bool = False  # the name column: may fold as a last resort, everything else never wraps
    style: str | None = None
    tags: frozenset[str] = field(default_factory=frozenset)


def _table(columns: Sequence[Col]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for col in columns:
        widest = max((len(c) for c in col.cells), default=0)  # cell_len: names are printable, numbers ASCII
        table.add_column(
            col.header,
            justify="left" if col.left else "right",
            no_wrap=not col.name,
            overflow="fold" if col.name else "ellipsis",
            min_width=None if col.name else max(widest, len(col.header)),
            style=col.style,
        )
    for row in zip(*(col.cells for col in columns), strict=True):
        table.add_row(*(cell if isinstance(cell, Text) else Text(cell) for cell in row))
    return table


_MEASURE = Console(width=10_000, color_system=None)


def natural_width(table: Table) -> int:
    """Columns the table needs to show every cell on one line."""
    return Measurement.get(_MEASURE, _MEASURE.options, table).maximum


def fit_table(
    variants: Sequence[tuple[Sequence[Col], int]], width: int, title: str | None = None, caption: str | None = None
) -> RenderableType:
    """The first variant that fits `width` once its columns with `drop` ≥ the variant's floor are dropped in order
    (highest `drop` first, rightmost first among equals); the last one, reduced that way, when none fits. The title
    (bold) and caption (dim) are lines of their own, wrapped at the console's width, not the table's.

    Args:
        variants: (columns, floor) pairs, e.g. full names dropping only luxuries, then short names dropping more.
    """
    table = None
    for columns, floor in variants:
        kept = list(columns)
        while True:
            table = _table(kept)
            droppable = [i for i, c in enumerate(kept) if c.drop >= max(floor, 1)]
            if natural_width(table) <= width or not droppable:
                break
            worst = max(kept[i].drop for i in droppable)
            kept.pop(max(i for i in droppable if kept[i].drop == worst))
        if natural_width(table) <= width:
            break
    assert table is not None
    parts: list[RenderableType] = [Text(title, style="bold")] if title else []
    parts.append(table)
    if caption:
        parts.append(Text(caption, style="dim"))
    return Group(*parts)


# ------------------------------------------------------------------------------------------------- names


@dataclass(frozen=True, slots=True)
class Names:
    """Display names of a set of checkpoint keys: a layer cell and a module cell per key, and the caption that says
    what was elided."""

    layer: dict[str, str]
    module: dict[str, str]
    kind: dict[str, str] | None  # the module kind alone, when (layer, kind) still tells every key apart
    caption: str


def _split(name: str) -> tuple[str | None, str, str]:
    """(block prefix ending in ".", block index, the rest without ".weight"), or (None, "", key) outside blocks."""
    parts = name.split(".")
    at = next((i for i, p in enumerate(parts) if p.isascii() and p.isdigit()), None)
    if at is None:
        return None, "", name.removesuffix(".weight")
    rest = ".".join(parts[at + 1 :]).removesuffix(".weight") or parts[at]
    return ".".join(parts[:at]) + "." if at else "", parts[at], rest


def display_names(layers: Sequence[LayerMetrics]) -> Names:
    """Short names for display only: the block prefix (e.g. `model.layers.`) and `.weight` elided, the layer index
    in a column of its own; keys outside blocks are shown whole."""
    split = {lm.name: _split(lm.name) for lm in layers}
    prefixes = sorted({p for p, _, _ in split.values() if p is not None})
    common = prefixes[0] if len(prefixes) == 1 else ""
    layer = {name: printable((p or "")[len(common) :] + i) for name, (p, i, _) in split.items()}
    module = {name: printable(rest) for name, (_, _, rest) in split.items()}
    kinds = {lm.name: printable(lm.kind) if split[lm.name][0] is not None else module[lm.name] for lm in layers}
    unique = len({(layer[n], kinds[n]) for n in kinds}) == len(kinds)
    caption = f"names: {printable(common)}<layer>.<module>.weight" if common else "names without .weight"
    return Names(layer, module, kinds if unique and kinds != module else None, caption)


# ------------------------------------------------------------------------------------------------- numbers


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _pct0(x: float | None) -> str:
    """E(r) in percent with one decimal, rounded down (99.97% is not shown as 100%); "100%" only when whole."""
    if x is None:
        return "-"
    if x >= 1.0 - 1e-12:
        return "100%"
    return f"{math.floor(1000 * x) / 10:.1f}%"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2g}"


def _share(x: float) -> str:
    """A ratio like rank / random rank: two decimals, or two significant digits below 0.1."""
    return f"{x:.2f}" if x >= 0.1 or x == 0 else f"{x:.2g}"


def _captured_cols(captured: Sequence[dict[int, float]], lora_ranks: Sequence[int]) -> list[Col]:
    return [Col(f"E({r})", [_pct0(c.get(r)) for c in captured], drop=1) for r in lora_ranks]


# ------------------------------------------------------------------------------------------------- tables


def layer_table(analysis: Analysis, width: int) -> RenderableType:
    """One row per analysed matrix, fitted to `width` columns."""
    opts, layers = analysis.options, analysis.layers
    names = display_names(layers)
    relative = [m.relative_change for m in layers]
    rank_cells: list[str | Text] = [
        Text.assemble(str(m.rank), ("*", "yellow")) if m.noisy else Text(str(m.rank)) for m in layers
    ]
    blocks = any(names.layer.values())
    tail = [
        Col("shape", [f"{m.shape[0]}×{m.shape[1]}" for m in layers], drop=3),
        Col(f"rank@{opts.threshold:g}", rank_cells),
        Col("random", [str(m.random_rank) for m in layers], drop=2),
        *_captured_cols([m.captured for m in layers], opts.lora_ranks),
        *([Col("‖ΔW‖/‖W‖", [_ratio(x) for x in relative], drop=4)] if any(x is not None for x in relative) else []),
        Col("stable", [f"{m.stable_rank:.1f}" for m in layers], drop=5),
        Col("effective", [f"{m.effective_rank:.1f}" for m in layers], drop=6),
    ]
    cells = [names.layer[m.name] for m in layers]
    layer_col = [Col("layer", list(cells), left=not all(c.isdigit() for c in cells if c))] if blocks else []

    def variant(module: dict[str, str]) -> list[Col]:
        return [*layer_col, Col("module", [module[m.name] for m in layers], left=True, name=True), *tail]

    short = [(variant(names.kind), 4), (variant(names.kind), 1)] if names.kind else []
    variants = [(variant(names.module), 4 if short else 1), *short]
    captions = [names.caption]
    if any(m.noisy for m in layers):
        captions.append("* rounding noise alone could move this rank")
    captions.append(f"E(r): share of ‖ΔW‖_F² a rank-r LoRA can capture; random: rank@{opts.threshold:g} of noise")
    return fit_table(variants, width, title=f"ΔW per matrix: {_what(analysis)}", caption="; ".join(captions))


def _what(analysis: Analysis) -> str:
    tuned = printable(str(analysis.tuned))
    return f"{tuned} − {printable(str(analysis.base))}" if analysis.base is not None else f"{tuned} (adapter alone)"


def summary_table(
    title: str, groups: Sequence[GroupSummary], lora_ranks: Sequence[int], threshold: float, width: int
) -> RenderableType:
    """Median/max rank and energy-weighted captured energy per module kind or per layer, fitted to `width`."""
    noisy = any(g.n_noisy for g in groups)
    columns = [
        Col(title, [printable(g.key) for g in groups], left=True, name=True),
        Col("n", [str(g.n) for g in groups], drop=3),
        Col("median", [f"{g.median_rank:g}" for g in groups]),
        Col("max", [str(g.max_rank) for g in groups], drop=2),
        Col("÷random", [_share(g.median_rank_ratio) for g in groups], drop=2),
        *_captured_cols([g.captured for g in groups], lora_ranks),
        *([Col("noisy", [str(g.n_noisy) for g in groups], drop=4)] if noisy else []),
    ]
    return fit_table(
        [(columns, 1)],
        width,
        title=f"rank@{threshold:g} per {title}: median and max over its matrices",
        caption="÷random: median rank / random-matrix rank; E(r) energy-weighted over the group",
    )


def kind_tables(analysis: Analysis, width: int, layers: bool = True) -> list[RenderableType]:
    opts, summary = analysis.options, analysis.summary
    parts: list[RenderableType] = [summary_table("module kind", summary.kinds, opts.lora_ranks, opts.threshold, width)]
    if layers and len(summary.layers) > 1:
        parts.append(summary_table("layer", summary.layers, opts.lora_ranks, opts.threshold, width))
    return parts


def shows_per_matrix(analysis: Analysis, per_matrix: bool | None) -> bool:
    """--per-matrix / --no-per-matrix, or by default up to PER_MATRIX_MAX matrices."""
    return per_matrix if per_matrix is not None else len(analysis.layers) <= PER_MATRIX_MAX


def rank_report(analysis: Analysis, width: int, *, per_matrix: bool | None = None) -> RenderableType:
    """Everything `spectra rank` prints: matrices (when shown), per-kind and per-layer summaries, headline, adapter
    rank use, recommendation, notes."""
    parts: list[RenderableType] = []
    if shows_per_matrix(analysis, per_matrix):
        parts.append(layer_table(analysis, width))
    else:
        parts.append(Text(f"({len(analysis.layers)} matrices: per-matrix rows with --per-matrix)", style="dim"))
    parts += kind_tables(analysis, width)
    parts.append(headline(analysis))
    parts += adapter_view(analysis, width)
    if analysis.recommendation is not None:
        parts.append(recommendation_view(analysis.recommendation, width))
    return _spaced(parts)


def _spaced(parts: Sequence[RenderableType]) -> Group:
    """Sections one blank line apart."""
    spaced: list[RenderableType] = []
    for part in parts:
        spaced += [Text(""), part] if spaced else [part]
    return Group(*spaced)


def summary_report(analysis: Analysis, width: int) -> RenderableType:
    """`spectra rank -q`: the per-kind summary and the recommendation only."""
    parts: list[RenderableType] = kind_tables(analysis, width, layers=False)
    if analysis.recommendation is not None:
        parts.append(recommendation_view(analysis.recommendation, width, compact=True))
    return _spaced(parts)


def adapter_view(analysis: Analysis, width: int) -> list[RenderableType]:
    """For an adapter: its r next to the rank each kind uses, and which kinds saturate r or could be resized."""
    kinds = kind_use(rank_use(analysis))
    if not kinds:
        return []
    tau = f"{analysis.options.threshold:g}"
    columns = [
        Col("module kind", [printable(k.kind) for k in kinds], left=True, name=True),
        Col("n", [str(k.n) for k in kinds], drop=2),
        Col("r", [_ranks(k) for k in kinds]),
        Col(f"median rank@{tau}", [f"{k.median_rank:g}" for k in kinds]),
        Col("max", [str(k.max_rank) for k in kinds], drop=1),
        Col("saturated", [str(k.n_saturated) for k in kinds]),
        Col("≤ half", [str(k.n_fraction) for k in kinds]),
    ]
    table = fit_table(
        [(columns, 1)],
        width,
        title="adapter: configured rank r against the rank its updates use",
        caption="saturated: rank@τ ≥ 80% of r; ≤ half: rank@τ ≤ 50% of r (modules per kind)",
    )
    return [table, Text("\n".join(map(printable, adapter_sentences(analysis))))]


def _ranks(k: KindUse) -> str:
    return ",".join(map(str, k.ranks))


def _alpha_text(alpha: object) -> str:
    """lora_alpha as written, a float shortened (2√8 = 5.65685…)."""
    return f"{alpha:.4g}" if isinstance(alpha, float) else str(alpha)


def written_variant(rec: Recommendation) -> str:
    """Which config `rec` holds (what `spectra recommend -o` writes), in one phrase read from the config itself."""
    config = rec.config
    variant = rec.variant
    pattern = len(config.get("rank_pattern") or {})
    rslora = ", use_rslora" if config.get("use_rslora") else ""
    keys = f", {pattern} rank_pattern keys" if pattern else ""
    return (
        f"the {variant} variant (r = {config.get('r')}, lora_alpha = {_alpha_text(config.get('lora_alpha'))}"
        f"{rslora}{keys}, "
        f"task_type {config.get('task_type')})"
    )


def _other_variant(rec: Recommendation) -> str:
    if rec.variant == "uniform":
        return f"--variant per-module: per-module ranks capturing {_pct(rec.allocation_captured)}"
    return f"--variant uniform: r = {rec.uniform_rank} on every target module, capturing {_pct(rec.uniform_captured)}"


def recommendation_view(
    rec: Recommendation, width: int, compact: bool = False, written: str | None = None
) -> RenderableType:
    """The recommendation: reason, the variant the config file holds, the caveat once; the trade-off table and
    the advice (kept apart from derived numbers) unless `compact`.

    Args:
        written: the adapter_config.json just written, if any (else the line says which command writes it).
    """
    where = f"wrote {printable(written)}:" if written else "`spectra recommend ANALYSIS -o DIR` writes"
    lines = [
        Text.assemble(("Recommended LoRA (derived from the spectra): ", "bold"), printable(rec.reason)),
        Text(f"target_modules: {', '.join(map(printable, rec.target_modules))}"),
        Text(f"{where} {written_variant(rec)}; {_other_variant(rec)}."),
    ]
    if rec.cap_binds:
        lines.append(
            Text(
                f"The cap max_rank={rec.max_rank} binds: a LoRA of that rank cannot capture "
                f"{_pct(rec.target)} of ΔW's energy.",
                style="yellow",
            )
        )
    lines.append(Text(printable(rec.caveat), style="italic"))
    if compact:
        return Group(*lines)

    def cells(values: Sequence[str]) -> list[str | Text]:
        return [
            Text(v, style="bold green" if o.r == rec.uniform_rank else "")
            for v, o in zip(values, rec.tradeoff, strict=True)
        ]

    options = rec.tradeoff
    columns = [
        Col("r", cells([str(o.r) for o in options])),
        Col("E(r)", cells([_pct(o.captured) for o in options])),
        Col("LoRA parameters", cells([f"{o.params:,}" for o in options])),
        Col("% of full", cells([f"{100 * o.params_fraction:.2f}%" for o in options]), drop=1),
    ]
    table = fit_table([(columns, 1)], width, title="uniform LoRA rank: trade-off over the targeted matrices")
    advice: list[Text] = []
    if rec.advice:
        heading = "\nAdvice not derived from the spectrum (practice, and measurements on the demo task):"
        advice.append(Text(heading, style="bold"))
        advice.extend(Text(f"  - {printable(line)}") for line in rec.advice)
    return Group(table, Text(""), *lines, *advice)


def headline(analysis: Analysis) -> Text:
    """The model-level verdict, what a LoRA could capture, what was skipped, and notes."""
    o, opts = analysis.summary.overall, analysis.options
    noisy = f"; {o.n_noisy} near the rounding-noise floor" if o.n_noisy else ""
    text = Text()
    text.append(
        f"{o.n} matrices: median rank@{opts.threshold:g} {o.median_rank:g}, max {o.max_rank} "
        f"({_share(o.median_rank_ratio)}× a random matrix of the same shape){noisy}.\n",
        style="bold",
    )
    captured = ", ".join(f"r={r}: {_pct(o.captured[r])}" for r in opts.lora_ranks)
    text.append(f"Energy a LoRA could capture at most (all matrices): {captured}.\n")
    text.append(
        f"Skipped {_count(len(analysis.skipped), 'tensor')} ({skip_counts(analysis)}); "
        f"{analysis.elapsed_s:.1f} s on {analysis.device}, precision {opts.precision}."
    )
    for note in analysis.notes:
        text.append(f"\nnote: {printable(note)}", style="yellow")
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def skip_counts(analysis: Analysis) -> str:
    counts: dict[str, int] = {}
    for s in analysis.skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"


# ------------------------------------------------------------------------------------------------- TSV, markdown


def layer_tsv(layers: Sequence[LayerMetrics], lora_ranks: Sequence[int]) -> str:
    """Tab-separated per-matrix rows with a header; full checkpoint keys (control characters escaped)."""
    head = [
        "name",
        "rows",
        "cols",
        "rank",
        "random_rank",
        "stable_rank",
        "effective_rank",
        "spectral_norm",
        "frobenius_norm",
        "relative_change",
        "noise_fraction",
        "noisy",
        "gd_rank",
        *(f"captured_{r}" for r in lora_ranks),
    ]
    rows = ["\t".join(head)]
    for m in layers:
        values = [
            printable(m.name),
            m.shape[0],
            m.shape[1],
            m.rank,
            m.random_rank,
            m.stable_rank,
            m.effective_rank,
            m.spectral_norm,
            m.frobenius_norm,
            "" if m.relative_change is None else m.relative_change,
            m.noise_fraction,
            int(m.noisy),
            m.gd_rank,
            *(m.captured[r] for r in lora_ranks),
        ]
        rows.append("\t".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values))
    return "\n".join(rows)


def _md_cell(text: str) -> str:
    """Text for a markdown table cell or paragraph: control characters escaped, pipes escaped, no backticks."""
    return printable(text).replace("|", "\\|").replace("`", "'")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A GitHub-flavoured markdown table; the first `left` columns are left-aligned, the rest right-aligned."""
    align = [":---" if i < left else "---:" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def markdown_report(analysis: Analysis, *, per_matrix: bool | None = None, summary_only: bool = False) -> str:
    """`spectra rank --format markdown`: the per-kind table (and per-matrix rows when shown), headline and
    recommendation as markdown for a PR or a model card."""
    opts, s = analysis.options, analysis.summary
    tau = f"{opts.threshold:g}"
    e_heads = [f"E({r})" for r in opts.lora_ranks]
    parts = [f"### spectra: {_md_cell(_what(analysis))}"]
    groups = [*s.kinds, s.overall]
    parts.append(
        markdown_table(
            ["module kind", "matrices", f"median rank@{tau}", "max", "÷random", *e_heads],
            [
                [
                    f"`{_md_cell(g.key)}`" if g is not s.overall else "**all**",
                    str(g.n),
                    f"{g.median_rank:g}",
                    str(g.max_rank),
                    f"{g.median_rank_ratio:.2f}",
                    *(_pct0(g.captured.get(r)) for r in opts.lora_ranks),
                ]
                for g in groups
            ],
        )
    )
    if not summary_only and shows_per_matrix(analysis, per_matrix):
        parts.append(
            markdown_table(
                ["matrix", "shape", f"rank@{tau}", "random", *e_heads],
                [
                    [
                        f"`{_md_cell(m.name)}`",
                        f"{m.shape[0]}×{m.shape[1]}",
                        f"{m.rank}{' ⚠' if m.noisy else ''}",
                        str(m.random_rank),
                        *(_pct0(m.captured.get(r)) for r in opts.lora_ranks),
                    ]
                    for m in analysis.layers
                ],
            )
        )
    rec = analysis.recommendation
    if not summary_only:
        parts.append("  \n".join(_md_cell(line) for line in headline(analysis).plain.split("\n")))
        parts.extend(_md_cell(line) for line in adapter_sentences(analysis))
    if rec is not None:
        parts.append(f"**Recommended LoRA:** {_md_cell(rec.reason)}")
        parts.append(f"adapter_config.json holds {_md_cell(written_variant(rec))}.")
        parts.append(f"*{_md_cell(rec.caveat)}*")
    return "\n\n".join(parts) + "\n"
