"""Records -> rich Tables and TSV strings. Returns them; never prints."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from spectra import Analysis, GroupSummary, LayerMetrics, Recommendation, printable


def short_names(names: Sequence[str]) -> dict[str, str]:
    """Display names: the common dotted prefix and a trailing `.weight` dropped (keys themselves never change)."""
    common = os.path.commonprefix(list(names)) if len(names) > 1 else ""  # noqa: RUF071 - cut back to a dot below
    parts = common.split(".")[:-1]
    while parts and len(names) > 1 and all(n.split(".")[len(parts)].isdigit() for n in names):
        parts.pop()  # keep "layers." in front of the index: "layers.3.q_proj", not "3.q_proj"
    prefix = ".".join(parts) + "." if parts else ""
    return {n: n[len(prefix) :].removesuffix(".weight") or n for n in names}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


def layer_table(analysis: Analysis) -> Table:
    """One row per analysed matrix."""
    opts = analysis.options
    names = short_names([m.name for m in analysis.layers])
    tuned, base = printable(str(analysis.tuned)), printable(str(analysis.base))
    what = f"{tuned} − {base}" if analysis.base else f"{tuned} (adapter alone)"
    table = Table(title=f"ΔW spectra: {what}", title_justify="left")
    for col in ("matrix", "shape", f"rank@{opts.threshold:g}", "random", "stable", "effective", "‖ΔW‖/‖W‖"):
        table.add_column(col, justify="left" if col == "matrix" else "right", overflow="fold")
    table.add_column(f"E(r) % at r={'/'.join(map(str, opts.lora_ranks))}", justify="right")
    for m in analysis.layers:
        name = Text(printable(names[m.name])) + (Text(" noisy", style="yellow") if m.noisy else Text(""))
        table.add_row(
            name,
            f"{m.shape[0]}×{m.shape[1]}",
            str(m.rank),
            str(m.random_rank),
            f"{m.stable_rank:.1f}",
            f"{m.effective_rank:.1f}",
            _ratio(m.relative_change),
            _captured(m.captured, opts.lora_ranks),
        )
    return table


def _captured(captured: dict[int, float], ranks: Sequence[int]) -> str:
    return "/".join(f"{100 * captured[r]:.0f}" for r in ranks)


def summary_table(title: str, groups: Sequence[GroupSummary], lora_ranks: Sequence[int], threshold: float) -> Table:
    """Median/max rank and energy-weighted captured energy per module kind or per layer."""
    table = Table()
    for col in (title, "matrices", f"median rank@{threshold:g}", "max", "rank/random"):
        table.add_column(col, justify="left" if col == title else "right")
    table.add_column(f"E(r) % at r={'/'.join(map(str, lora_ranks))}", justify="right")
    for g in groups:
        noisy = Text(f" ({g.n_noisy} noisy)", style="yellow") if g.n_noisy else Text("")
        table.add_row(
            Text(printable(g.key)) + noisy,
            str(g.n),
            f"{g.median_rank:g}",
            str(g.max_rank),
            f"{g.median_rank_ratio:.2f}",
            _captured(g.captured, lora_ranks),
        )
    return table


def rank_report(analysis: Analysis) -> RenderableType:
    """Everything `spectra rank` prints: matrices, per-kind and per-layer summaries, headline, notes."""
    opts, summary = analysis.options, analysis.summary
    parts: list[RenderableType] = [
        layer_table(analysis),
        summary_table("module kind", summary.kinds, opts.lora_ranks, opts.threshold),
    ]
    if summary.layers:
        parts.append(summary_table("layer", summary.layers, opts.lora_ranks, opts.threshold))
    parts.append(headline(analysis))
    if analysis.recommendation is not None:
        parts.append(recommendation_view(analysis.recommendation))
    return Group(*parts)


def recommendation_view(rec: Recommendation) -> RenderableType:
    """The trade-off table, the chosen configuration, the reasoning, and advice kept apart from derived numbers."""
    table = Table(title="uniform LoRA rank: trade-off over the targeted matrices", title_justify="left")
    for col in ("r", "captured energy", "LoRA parameters", "% of full fine-tune"):
        table.add_column(col, justify="right")
    for row in rec.tradeoff:
        style = "bold green" if row.r == rec.uniform_rank else None
        table.add_row(
            str(row.r), _pct(row.captured), f"{row.params:,}", f"{100 * row.params_fraction:.2f}%", style=style
        )
    config = rec.config
    rslora = ", use_rslora" if config.get("use_rslora") else ""
    gain = rec.allocation_captured - rec.uniform_captured
    lines = [
        Text.assemble(("Recommendation (derived from the spectra): ", "bold"), rec.reason),
        Text(
            f"  uniform LoRA: r = {rec.uniform_rank} captures {_pct(rec.uniform_captured)}; "
            f"target_modules = {printable(', '.join(rec.target_modules))}"
        ),
        Text(
            f"  per-module ranks at the same budget ({rec.budget:,} parameters) capture "
            f"{_pct(rec.allocation_captured)} ({100 * gain:+.1f} points): config r = {config.get('r')}, "
            f"lora_alpha = {config.get('lora_alpha')}{rslora}, {len(config.get('rank_pattern') or {})} "
            f"rank_pattern keys"
        ),
    ]
    if rec.cap_binds:
        lines.append(
            Text(
                f"  the cap max_rank={rec.max_rank} binds: a LoRA of that rank cannot capture "
                f"{_pct(rec.target)} of ΔW's energy.",
                style="yellow",
            )
        )
    lines.append(Text(rec.caveat, style="italic"))
    if rec.advice:
        lines.append(Text("Advice not derived from the spectrum (common practice):", style="bold"))
        lines.extend(Text(f"  - {line}") for line in rec.advice)
    return Group(table, *lines)


def headline(analysis: Analysis) -> Text:
    """Two lines: the model-level verdict, then what was skipped and any caveats."""
    o, opts = analysis.summary.overall, analysis.options
    noisy = f"; {o.n_noisy} near the rounding-noise floor" if o.n_noisy else ""
    text = Text()
    text.append(
        f"{o.n} matrices: median rank@{opts.threshold:g} {o.median_rank:g}, max {o.max_rank} "
        f"({o.median_rank_ratio:.2f}× a random matrix of the same shape){noisy}.\n",
        style="bold",
    )
    captured = ", ".join(f"r={r}: {_pct(o.captured[r])}" for r in opts.lora_ranks)
    text.append(f"Energy a LoRA could capture at most (all matrices): {captured}.\n")
    text.append(
        f"Skipped {len(analysis.skipped)} tensors ({skip_counts(analysis)}); "
        f"{analysis.elapsed_s:.1f} s on {analysis.device}, precision {opts.precision}."
    )
    for note in analysis.notes:
        text.append(f"\nnote: {printable(note)}", style="yellow")
    return text


def skip_counts(analysis: Analysis) -> str:
    counts: dict[str, int] = {}
    for s in analysis.skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"


def layer_tsv(layers: Sequence[LayerMetrics], lora_ranks: Sequence[int]) -> str:
    """Tab-separated per-matrix rows with a header; full checkpoint keys."""
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
