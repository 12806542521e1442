"""The demo's headline as a rich renderable: returned, never printed (the caller chooses the console)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .sweep import SWEEP_FOLDER

if TYPE_CHECKING:
    from spectra import Sweep

    from .app import DemoResult


def demo_summary(result: DemoResult) -> RenderableType:
    """The demo's headline: median rank per module kind for the full fine-tune vs the LoRA, and where the report is."""
    threshold = result.full_analysis.options.threshold
    table = Table(
        title=f"median rank@{threshold:g} of ΔW per module kind",
        title_justify="left",
        box=box.SIMPLE_HEAD,  # the same look as `spectra rank`'s tables
        show_edge=False,
        pad_edge=False,
    )
    table.add_column("module kind")
    table.add_column("full fine-tune", justify="right")
    table.add_column(f"LoRA r={result.lora_r}", justify="right")
    for kind, rank in result.full_ranks.items():
        lora = result.lora_ranks.get(kind)
        table.add_row(escape(kind), f"{rank:g}", "-" if lora is None else f"{lora:g}")
    r = result.retrieval
    text = Text()
    text.append(
        f"held-out top-1 retrieval: base {r['base']:.3f}, full fine-tune {r['full']:.3f}, LoRA {r['lora']:.3f}\n"
    )
    text.append(f"largest rank of a merged-LoRA ΔW: {result.lora_max_rank} (≤ r = {result.lora_r})\n")
    text.append(f"report: {result.report}", style="bold")
    if result.sweep is None:
        return Group(table, text)
    return Group(table, text, Text(), sweep_table(result.sweep, result.report.parent / SWEEP_FOLDER))


def sweep_table(sweep: Sweep, folder: Path) -> RenderableType:
    """The sweep's curve as a table: LoRA size, ΔW energy kept and top-1 on both splits per point, and the choice."""
    table = Table(
        title="LoRAs extracted from the full fine-tune (no training), merged, scored by retrieval",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
    )
    for column in ("point", "LoRA params", "% of dense", "ΔW energy kept", "top-1 val", "top-1 test", "gain kept"):
        table.add_column(column, justify="left" if column == "point" else "right")
    for p in sweep.points:
        cells = (
            f"{p.lora_params:,}" if p.kind != "base" else "0",
            f"{100 * p.params_share:.1f}%",
            "-" if p.energy_kept is None else f"{100 * p.energy_kept:.0f}%",
            _value(p.select_metric),
            _value(p.metric),
            "-" if p.gain is None else f"{100 * p.gain:.0f}%",
        )
        if p.error:
            cells = (*cells[:3], "failed", "failed", escape(p.error))
        table.add_row(("* " if p.label == sweep.chosen else "") + escape(p.label), *cells)
    text = Text()
    head = "recommended (chosen on validation, test reported)" if sweep.chosen else "no recommendation"
    text.append(f"{head}: {sweep.reason}\n")
    text.append(f"sweep: {folder / 'sweep.html'} (curves), {folder / 'adapter'} (the chosen LoRA)", style="bold")
    return Group(table, text)


def _value(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
