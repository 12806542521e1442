"""`spectra trajectory BASE CKPT…`: rank, change and captured energy of a run's checkpoints against step."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Group, RenderableType
from rich.table import Table

import spectra
from spectra import Options, OptionsError, Trajectory, TrajectorySettings

from ..console import progress, user_errors
from ..flags import options_flags
from ..outputs import wrote_all
from .compare import STDOUT, HtmlOut, JsonOut, Labels, parse_ints, plan_outputs, show, write_outputs

CACHE_NAME = "spectra-cache"  # default cache folder, beside the first output


def default_cache(json_path: Path | None, html: Path | None) -> Path | None:
    """`spectra-cache/` beside the --json output (else the --html one); None without outputs."""
    out = json_path if json_path not in (None, STDOUT) else html
    return None if out is None else out.parent / CACHE_NAME


def trajectory_view(t: Trajectory) -> RenderableType:
    """One row per checkpoint (overall), then one row per module kind with its median rank at each checkpoint."""
    tau = f"rank@{t.options.threshold:g}"
    lora = t.options.lora_ranks
    points = Table(title=f"trajectory against {t.base}", title_justify="left")
    for col in (
        "checkpoint",
        "step",
        f"median {tau}",
        "max",
        "median ‖ΔW‖/‖W‖",
        f"E(r) % r={'/'.join(map(str, lora))}",
    ):
        points.add_column(col, justify="left" if col == "checkpoint" else "right")
    points.add_column("cached", justify="left")
    for p in t.points:
        overall = p.summary.overall
        changes = sorted(m.relative_change for m in p.matrices if m.relative_change is not None)
        change = f"{changes[(len(changes) - 1) // 2]:.3g}" if changes else "—"
        points.add_row(
            p.label,
            "—" if p.step is None else str(p.step),
            f"{overall.median_rank:g}",
            str(overall.max_rank),
            change,
            "/".join(f"{100 * overall.captured.get(r, 0.0):.0f}" for r in lora),
            "yes" if p.cached else "",
        )
    kinds = Table(title=f"median {tau} per module kind", title_justify="left")
    kinds.add_column("kind", justify="left")
    for p in t.points:
        kinds.add_column(p.label, justify="right")
    for kind in t.kinds():
        kinds.add_row(kind, *("—" if g is None else f"{g.median_rank:g}" for g in t.kind_series(kind)))
    parts: list[RenderableType] = [points, kinds]
    if t.similarity:
        phi = Table(
            title=f"φ({t.settings.top_k},{t.settings.top_k}) with the previous checkpoint", title_justify="left"
        )
        phi.add_column("kind", justify="left")
        for s in t.similarity:
            phi.add_column(f"{t.points[s.a].label} → {t.points[s.b].label}", justify="right")
        for kind in t.kinds():
            phi.add_row(kind, *(f"{s.kinds[kind]:.3f}" if kind in s.kinds else "—" for s in t.similarity))
        parts.append(phi)
    return Group(*parts)


@options_flags
def trajectory(
    base: Annotated[str, typer.Argument(help="the base checkpoint the run started from")],
    checkpoints: Annotated[
        list[str] | None,
        typer.Argument(
            help="the checkpoints, or a Trainer output folder of checkpoint-N subfolders", show_default=False
        ),
    ] = None,
    steps: Annotated[str | None, typer.Option(help="training step of each checkpoint, e.g. 500,1000,1500")] = None,
    label: Labels = None,
    with_vectors: Annotated[bool, typer.Option(help="also φ(k, k) of consecutive checkpoints' top-k vectors")] = False,
    top_k: Annotated[int, typer.Option("--top-k", help="k of --with-vectors")] = 16,
    side: Annotated[str, typer.Option(help="right | left singular vectors for --with-vectors")] = "right",
    cache: Annotated[
        Path | None, typer.Option(help=f"folder of cached analyses (default: {CACHE_NAME}/ beside --json or --html)")
    ] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="analyse every checkpoint again")] = False,
    json_path: JsonOut = None,
    html: HtmlOut = None,
    *,
    options: Options,
) -> None:
    """Follow rank@THRESHOLD per module kind and layer across a training run's checkpoints."""
    outputs = spectra.Outputs([base, *(checkpoints or [])])
    with user_errors(outputs), outputs:
        found = checkpoints or []
        if not found:
            raise OptionsError("trajectory takes BASE and at least two checkpoints (or a folder of checkpoint-N)")
        settings = TrajectorySettings(
            steps=None if steps is None else parse_ints("--steps", steps),
            labels=None if label is None else tuple(label),
            with_vectors=with_vectors,
            top_k=top_k,
            side=side,
        )
        json_out, html_out = plan_outputs(outputs, json_path, html)
        folder = None if no_cache else (cache or default_cache(json_path, html))
        record = spectra.analyze_trajectory(base, found, settings, options, cache=folder, progress=progress("spectra"))
        write_outputs(outputs, record, json_out, html_out)
    wrote_all(outputs)
    show(record, json_path, trajectory_view(record))


def register(app: typer.Typer) -> None:
    app.command(help=trajectory.__doc__)(trajectory)
