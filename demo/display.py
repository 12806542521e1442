"""The demo's headline as a rich renderable: returned, never printed (the caller chooses the console)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
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
    return Group(table, text)
