"""The one way tests build analysis records: from planted singular values, through the library's own metrics code.

`layer_metrics` turns a planted σ into a `LayerMetrics` with `compute_metrics` (so every field is what an analysis
of that ΔW would hold); `make_analysis` assembles a whole `Analysis` of such layers with `summarize`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from spectra import Analysis, CheckpointInfo, LayerMetrics, Options, Recommendation, Skipped, Spectrum
from spectra.analysis.metrics import compute_metrics, module_kinds, summarize

PlantedSpectrum = Sequence[float] | np.ndarray  # singular values, any order


def layer_metrics(
    name: str,
    shape: tuple[int, int],
    values: PlantedSpectrum,
    *,
    kind: str | None = None,
    layer: int | None = None,
    noisy: bool = False,
    options: Options | None = None,
    base_norm: float | None = None,
    dtype: str = "f32",
    method: str = "svd-f64",
) -> LayerMetrics:
    """LayerMetrics of a ΔW whose singular values are `values` (sorted here; len(values) < min(shape) means the
    rest are zero, as for an adapter), computed by `compute_metrics` with ‖ΔW‖_F² = Σσ².

    Args:
        kind, layer: default to what `module_kinds` derives from `name` alone.
        noisy: plant storage-rounding noise as large as ΔW itself, so the metrics flag the matrix as noisy.
        options: threshold and LoRA ranks of the analysis; default `Options()`.
        base_norm: ‖W_base‖_F; None for no base (relative_change is then None).
    """
    s = np.sort(np.abs(np.asarray(values, dtype=np.float64)))[::-1]
    energy = float(np.sum(s**2))
    spectrum = Spectrum(
        name=name,
        shape=shape,
        s=s,
        energy=energy,
        base_norm=base_norm,
        dtype=dtype,
        noise_energy=energy if noisy else 0.0,
        method=method,
    )
    derived_kind, derived_layer = module_kinds([name])[name]
    return compute_metrics(
        spectrum, options or Options(), kind or derived_kind, layer if layer is not None else derived_layer
    )


KINDS = ("q_proj", "v_proj", "down_proj")
ANALYSIS_OPTIONS = Options(threshold=0.9, lora_ranks=(4, 8, 16), device="cpu", precision="exact")


def planted_spectrum(rank: int, length: int, tail: float = 1e-2) -> np.ndarray:
    """`rank` singular values 1.0 plus a small tail: rank@0.9 is ceil(0.9·rank), +1 where 0.9·rank is whole (the
    tail's energy, ~1e-4·rank, is far above the rank's relative slack of 1e-6)."""
    return np.concatenate([np.ones(rank), tail * np.maximum(np.exp(-np.arange(length - rank) / 5.0), 1e-6)])


def make_analysis(
    n_layers: int = 2,
    kinds: Sequence[str] = KINDS,
    shape: tuple[int, int] = (64, 48),
    names: dict[tuple[int, str], str] | None = None,
    recommendation: Recommendation | None = None,
    length: int | None = None,
    notes: tuple[str, ...] = ("relative change is not reported for adapters",),
    skipped: tuple[Skipped, ...] = (Skipped("model.norm.weight", "not-2d"),),
) -> Analysis:
    """n_layers × kinds matrices; matrix (layer i, kind j) has 4 + 3·j + 2·i equal singular values (and a tail),
    scaled by 1 + i, with ‖W_base‖_F = 50 and bf16 storage.

    The matrix of layer 0 and the last kind is flagged noisy. `names` overrides checkpoint keys.
    """
    options = ANALYSIS_OPTIONS
    length = length or min(shape)
    layers = []
    for i in range(n_layers):
        for j, kind in enumerate(kinds):
            name = (names or {}).get((i, kind), f"model.layers.{i}.{kind}.weight")
            s = planted_spectrum(4 + 3 * j + 2 * i, length) * (1.0 + i)
            noisy = i == 0 and j == len(kinds) - 1
            layers.append(
                layer_metrics(
                    name, shape, s, kind=kind, layer=i, noisy=noisy, options=options, base_norm=50.0, dtype="bf16"
                )
            )
    info = CheckpointInfo(path="base.safetensors", format="safetensors", n_tensors=7, n_bytes=123_456, dtypes=("bf16",))
    return Analysis(
        base="runs/base & co/base.safetensors",
        tuned="runs/tuned.safetensors",
        options=options,
        layers=tuple(layers),
        skipped=skipped,
        summary=summarize(layers, options.lora_ranks),
        recommendation=recommendation,
        base_info=info,
        tuned_info=info,
        device="cpu",
        elapsed_s=1.25,
        version="0.1.0",
        created="2025-01-02T03:04:05Z",
        notes=notes,
    )


def empty_analysis() -> Analysis:
    """Nothing analysed: every tensor skipped."""
    return replace(make_analysis(), layers=(), summary=summarize([], ANALYSIS_OPTIONS.lora_ranks))


def adapter_analysis(r: int = 12, n_layers: int = 2, kinds: Sequence[str] = KINDS) -> Analysis:
    """An adapter analysed alone: every module has exactly `r` singular values (factored, ΔW = B·A), no base.

    Planted as in `make_analysis`: matrix (layer i, kind j) has 4 + 3·j + 2·i equal σ within its r.
    """
    analysis = make_analysis(n_layers=n_layers, kinds=kinds, length=r, notes=())
    layers = tuple(replace(lm, method="factored-f64", relative_change=None, noisy=False) for lm in analysis.layers)
    info = CheckpointInfo(
        path="adapter", format="peft-adapter", n_tensors=2 * len(layers), n_bytes=9_999, dtypes=("f32",)
    )
    return replace(
        analysis,
        base=None,
        tuned="runs/my-adapter",
        base_info=None,
        tuned_info=info,
        layers=layers,
        summary=summarize(layers, ANALYSIS_OPTIONS.lora_ranks),
    )
