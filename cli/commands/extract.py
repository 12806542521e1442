"""`spectra extract BASE TUNED -o DIR`: a full fine-tune → a PEFT LoRA adapter; and the summary both it and
`spectra resize` print (one row per module, totals, what was left out)."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console, Group, RenderableType
from rich.markup import escape
from rich.table import Table
from rich.text import Text

import spectra
from spectra import Options

if TYPE_CHECKING:
    from spectra import ExtractResult  # lazy in spectra: loads torch, which `spectra --version` must not

from ..console import progress, user_errors, wrote
from ..flags import options_flags

STDOUT = Path("-")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
SHOWN_PER_REASON = 3  # left-out names shown per reason (the JSON lists them all)

Rank = Annotated[str | None, typer.Option(help="rank N for every module, or auto (spectra's recommendation)")]
Energy = Annotated[float | None, typer.Option(help="per module, the smallest rank holding TAU of its ‖ΔW‖_F²")]
Budget = Annotated[int | None, typer.Option(help="LoRA parameters, spent where they capture the most energy")]
Output = Annotated[Path, typer.Option("--output", "-o", help="the adapter folder to write (atomically)")]
Dtype = Annotated[str | None, typer.Option(help="fp32 | bf16 | fp16 for the factors (default: as stored)")]
Overwrite = Annotated[bool, typer.Option(help="replace a non-empty output folder")]
JsonOut = Annotated[Path | None, typer.Option("--json", help="write the per-module summary as JSON to FILE, or -")]
Checkpoint = Annotated[str, typer.Argument(help="a .safetensors file, a model folder, or a hub id org/name")]


@options_flags
def extract(
    base: Checkpoint,
    tuned: Checkpoint,
    output: Output,
    rank: Rank = None,
    energy: Energy = None,
    budget: Budget = None,
    from_config: Annotated[
        Path | None, typer.Option(help="take the ranks from this adapter_config.json (e.g. spectra recommend's)")
    ] = None,
    target: Annotated[
        str | None, typer.Option(help="module kinds to adapt, comma-separated, e.g. q_proj,v_proj (default: all)")
    ] = None,
    include_embeddings: Annotated[bool, typer.Option(help="also adapt embeddings and lm_head")] = False,
    drop_biases: Annotated[bool, typer.Option(help="leave changed biases out (listed) instead of lora_bias")] = False,
    dtype: Dtype = None,
    overwrite: Overwrite = False,
    json_path: JsonOut = None,
    *,
    options: Options,
) -> None:
    """Turn a full fine-tune into a PEFT LoRA adapter: the truncated SVD of each ΔW = TUNED − BASE, split into B·A.

    Give one rank rule: --rank N, --rank auto, --energy TAU, --budget PARAMS or --from-config CFG. The merged
    adapter differs from TUNED by the predicted relative error √(1 − E(r)) per module (printed).
    """
    with user_errors():
        rule = spectra.RankRule.parse(rank, energy, budget, None if from_config is None else str(from_config))
        result = spectra.extract(
            base,
            tuned,
            output,
            rule,
            options,
            dtype=dtype,
            include_embeddings=include_embeddings,
            targets=None if target is None else target.split(","),
            biases="drop" if drop_biases else "carry",
            overwrite=overwrite,
            progress=progress("extract"),
        )
        show(result, json_path)


def show(result: ExtractResult, json_path: Path | None) -> None:
    """Report a written adapter: the JSON to a file or stdout, the summary to stdout (stderr with `--json -`)."""
    if json_path is not None and json_path != STDOUT:
        wrote(spectra.save_extraction(result, json_path))
    wrote(result.out_dir)
    if json_path == STDOUT:
        typer.echo(spectra.extraction_json(result), nl=False)
        return
    width = None if Console().is_terminal else 130
    Console(width=width, highlight=False).print(summary(result))


def summary(result: ExtractResult) -> RenderableType:
    """One row per module (rank, parameters, captured energy, predicted error), totals, left-outs, notes."""
    names = _short([m.name for m in result.modules])
    table = Table(title=f"LoRA adapter {escape(printable(result.out_dir))} ({result.rule.describe()})",
                  title_justify="left")  # fmt: skip
    for col in ("module", "shape", "rank", "params", "captured", "error", "‖ΔW‖/‖W‖"):
        table.add_column(col, justify="left" if col == "module" else "right", overflow="fold")
    for m in result.modules:
        extra = (" +bias" if m.bias else "") + (f" ({m.padded} zero)" if m.padded else "")
        table.add_row(
            escape(printable(names[m.name])) + extra,
            f"{m.shape[0]}×{m.shape[1]}",
            str(m.rank),
            f"{m.params:,}",
            f"{100 * m.captured:.1f}%",
            f"{m.error:.4f}",
            "-" if m.relative_change is None else f"{m.relative_change:.2e}",
        )
    share = result.params / result.dense_params if result.dense_params else 0.0
    total = Text(
        f"{len(result.modules)} modules, {result.params:,} parameters ({100 * share:.1f}% of the adapted matrices), "
        f"{result.dtype}; captured {100 * result.captured:.1f}% of ‖ΔW‖², predicted error {result.error:.4f} "
        f"(relative, Frobenius, after merging)"
    )
    return Group(table, total, *_left_out(result), *(Text(printable(n), style="dim") for n in result.notes))


def _left_out(result: ExtractResult) -> list[Text]:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for s in result.left_out:
        by_reason[s.reason].append(s.name)
    lines = []
    for reason, names in sorted(by_reason.items()):
        details = Counter(s.detail for s in result.left_out if s.reason == reason).most_common(1)
        shown = ", ".join(printable(n) for n in names[:SHOWN_PER_REASON]) + (", …" if len(names) > 3 else "")
        why = f" ({printable(details[0][0])})" if details and details[0][0] else ""
        lines.append(Text(f"left out, {reason}: {len(names)}{why}: {shown}", style="yellow"))
    return lines


def printable(text: str) -> str:
    """Control characters (ESC, newline, C1) as escapes: checkpoint keys are data, not terminal input."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape", "backslashreplace").decode("ascii"), text)


def _short(names: list[str]) -> dict[str, str]:
    """Display names: the shared dotted prefix (up to a block index) and ".weight" dropped; keys never change."""
    parts = names[0].split(".")[:-1] if len(names) > 1 else []
    while parts and not all(n.startswith(".".join(parts) + ".") for n in names):
        parts.pop()
    while parts and all(n.split(".")[len(parts)].isdigit() for n in names):
        parts.pop()  # keep "layers." before the index: "layers.3.q_proj", not "3.q_proj"
    prefix = ".".join(parts) + "." if parts else ""
    return {n: n[len(prefix) :].removesuffix(".weight") or n for n in names}
