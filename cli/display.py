"""Records -> rich Tables and TSV strings. Returns them; never prints."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from spectra import Analysis, GroupSummary, LayerMetrics


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
    table = Table(title=f"ΔW spectra: {analysis.tuned} − {analysis.base}", title_justify="left")
    for col in ("matrix", "shape", f"rank@{opts.threshold:g}", "random", "stable", "effective", "‖ΔW‖/‖W‖"):
        table.add_column(col, justify="left" if col == "matrix" else "right", overflow="fold")
    table.add_column(f"E(r) % at r={'/'.join(map(str, opts.lora_ranks))}", justify="right")
    for m in analysis.layers:
        name = Text(names[m.name]) + (Text(" noisy", style="yellow") if m.noisy else Text(""))
        table.add_row(
            name, f"{m.shape[0]}×{m.shape[1]}", str(m.rank), str(m.random_rank),
            f"{m.stable_rank:.1f}", f"{m.effective_rank:.1f}", _ratio(m.relative_change),
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
        table.add_row(Text(g.key) + noisy, str(g.n), f"{g.median_rank:g}", str(g.max_rank),
                      f"{g.median_rank_ratio:.2f}", _captured(g.captured, lora_ranks))
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
    return Group(*parts)


def headline(analysis: Analysis) -> Text:
    """Two lines: the model-level verdict, then what was skipped and any caveats."""
    o, opts = analysis.summary.overall, analysis.options
    noisy = f"; {o.n_noisy} near the rounding-noise floor" if o.n_noisy else ""
    text = Text()
    text.append(f"{o.n} matrices: median rank@{opts.threshold:g} {o.median_rank:g}, max {o.max_rank} "
                f"({o.median_rank_ratio:.2f}× a random matrix of the same shape){noisy}.\n", style="bold")
    captured = ", ".join(f"r={r}: {_pct(o.captured[r])}" for r in opts.lora_ranks)
    text.append(f"Energy a LoRA could capture at most (all matrices): {captured}.\n")
    text.append(f"Skipped {len(analysis.skipped)} tensors ({skip_counts(analysis)}); "
                f"{analysis.elapsed_s:.1f} s on {analysis.device}, precision {opts.precision}.")
    for note in analysis.notes:
        text.append(f"\nnote: {note}", style="yellow")
    return text


def skip_counts(analysis: Analysis) -> str:
    counts: dict[str, int] = {}
    for s in analysis.skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items())) or "none"


def layer_tsv(layers: Sequence[LayerMetrics], lora_ranks: Sequence[int]) -> str:
    """Tab-separated per-matrix rows with a header; full checkpoint keys."""
    head = ["name", "rows", "cols", "rank", "random_rank", "stable_rank", "effective_rank", "spectral_norm",
            "frobenius_norm", "relative_change", "noise_fraction", "noisy", "gd_rank",
            *(f"captured_{r}" for r in lora_ranks)]
    rows = ["\t".join(head)]
    for m in layers:
        values = [m.name, m.shape[0], m.shape[1], m.rank, m.random_rank, m.stable_rank, m.effective_rank,
                  m.spectral_norm, m.frobenius_norm, "" if m.relative_change is None else m.relative_change,
                  m.noise_fraction, int(m.noisy), m.gd_rank, *(m.captured[r] for r in lora_ranks)]
        rows.append("\t".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in values))
    return "\n".join(rows)
