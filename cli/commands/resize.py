"""`spectra resize ADAPTER -o DIR`: a PEFT LoRA adapter → one with new per-module ranks, from its factors alone."""

from __future__ import annotations

from typing import Annotated

import typer

import spectra
from spectra import Options

from ..console import progress, user_errors
from ..flags import options_flags
from .extract import Budget, Dtype, Energy, JsonOut, Output, Overwrite, Rank, plan, show, stage_json


@options_flags
def resize(
    adapter: Annotated[str, typer.Argument(help="a PEFT LoRA adapter folder")],
    output: Output,
    rank: Rank = None,
    energy: Energy = None,
    budget: Budget = None,
    base: Annotated[
        str | None, typer.Option(help="the base model: checks shapes and reports ‖ΔW‖/‖W‖ per module")
    ] = None,
    dtype: Dtype = None,
    overwrite: Overwrite = False,
    json_path: JsonOut = None,
    *,
    options: Options,
) -> None:
    """Change a LoRA adapter's ranks without retraining: each module's best approximation at its new rank.

    Give one rank rule: --rank N, --rank auto, --energy TAU or --budget PARAMS. The user's adapter_config.json is
    kept (target modules, dropout, task type, ...); only ranks and alphas change, each module keeping its scale.
    DoRA, IA³ and LoKr adapters are refused.
    """
    outputs = spectra.Outputs([adapter, base])
    with user_errors(outputs), outputs:
        folder, json_out = plan(outputs, output, overwrite, json_path)
        rule = spectra.RankRule.parse(rank, energy, budget)
        result = spectra.resize(
            adapter,
            outputs.stage(folder),
            rule,
            options,
            base=base,
            dtype=dtype,
            overwrite=True,  # the staged folder is new; `plan` checked the output
            progress=progress("resize"),
        )
        result = stage_json(outputs, result, output, json_out)
    show(result, json_path, outputs)
