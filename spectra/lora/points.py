"""What the sweep's points are made of: the labels of budget points, the sizes of an adapter given as a trained
point (read from its factors' shapes), a failed point, and the one-line progress text of a point's metrics."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from spectra.errors import CheckpointError
from spectra.io.checkpoint import open_checkpoint
from spectra.io.header import TensorEntry
from spectra.peft.layout import LORA_KEY
from spectra.records import SweepPoint


def shown(metrics: Sequence[float | None], gains: Sequence[float | None] | None = None) -> str:
    parts = []
    for i, (name, value) in enumerate(zip(("", "select "), metrics, strict=True)):
        if value is None:
            continue
        gain = None if gains is None else gains[i]
        parts.append(f"{name}{value:.4g}" + ("" if gain is None else f" ({100 * gain:.0f}% of gain)"))
    return ", ".join(parts)


def budget_label(b: float) -> tuple[str, str]:
    """(label, folder name) of a budget point: a share of the dense parameters, or a parameter count."""
    return (f"budget {100 * b:g}%", f"budget-{100 * b:g}pct") if b < 1 else (f"budget {int(b):,}", f"budget-{int(b)}")


def check_trained(label: str, folder: Path) -> tuple[Path, tuple[list[int], int, int]]:
    """(the folder as read: resolved, `factor_sizes` of its factors) of a trained point's adapter, checked to be a
    LoRA adapter."""
    with open_checkpoint(os.fspath(folder)) as ck:
        sizes = factor_sizes(ck.entries.values())
        if ck.format != "peft-adapter" or not sizes[0]:
            raise CheckpointError(f"{ck.path}: the adapter of point {label!r} is not a PEFT LoRA adapter folder")
        return ck.location, sizes


def factor_sizes(entries: Iterable[TensorEntry]) -> tuple[list[int], int, int]:
    """(per-module ranks, LoRA parameters, modules at or above break-even) of an adapter's lora_A/lora_B tensors."""
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    params = 0
    for e in entries:
        match = LORA_KEY.match(e.name)
        if match is None or match["part"] == "lora_magnitude_vector":
            continue
        params += math.prod(e.shape)
        if match["param"] != "bias":
            factors.setdefault(match["module"], {})[match["part"][-1]] = e.shape
    ranks, dense = [], 0
    for parts in factors.values():
        if len(parts) == 2 and len(parts["A"]) == len(parts["B"]) == 2:
            r, (m, n) = parts["A"][0], (parts["B"][0], parts["A"][1])
            ranks.append(r)
            dense += r * (m + n) >= m * n
    return ranks, params, dense


def failed(label: str, kind: str, rank: int | None, dense: int, error: str, seconds: float) -> SweepPoint:
    return SweepPoint(label, kind, rank, 0, 0.0, 0, 0, 0, dense, 0.0, 0.0, 0, None, None, None, None, error, None,
                      seconds, False)  # fmt: skip
