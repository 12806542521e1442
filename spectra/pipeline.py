"""analyze(): load -> pair/diff -> spectrum -> metrics -> summary -> Analysis."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, TypeVar

from spectra.diff import Pair, make_delta, natural_key, pair_tensors
from spectra.errors import MismatchError
from spectra.load import Checkpoint, open_checkpoint
from spectra.metrics import compute_metrics, module_kinds, summarize
from spectra.records import Analysis, Delta, LayerMetrics, Options, Skipped, Spectrum
from spectra.spectrum import compute_spectra, resolve_device

log = logging.getLogger(__name__)

T = TypeVar("T")
ProgressHook = Callable[[Iterable[Any]], Iterable[Any]]


def identity(items: Iterable[T]) -> Iterable[T]:
    return items


def version() -> str:
    try:
        return metadata.version("spectra-lm")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def analyze(base: str, tuned: str, options: Options | None = None, *, progress: ProgressHook = identity) -> Analysis:
    """Return the spectral analysis of ΔW = tuned − base for every matched 2-D weight.

    Args:
        base: the base checkpoint: a `.safetensors` file or a model folder (single file or shard index).
        tuned: the fine-tuned checkpoint, same layouts.
        options: settings (threshold, device, precision, filters, ...); defaults to Options().
        progress: wraps the stream of computed matrices, e.g. `rich.progress.track` (it has a len()).

    Raises:
        CheckpointError: a checkpoint is missing, corrupt, truncated or a pickle.
        MismatchError: no analysable tensor pairs, or nothing changed.
        OptionsError: device "cuda" without a GPU.
    """
    options = options or Options()
    started = time.perf_counter()
    device = resolve_device(options.device)
    with open_checkpoint(base) as base_ck, open_checkpoint(tuned) as tuned_ck:
        pairs, skipped = pair_tensors(base_ck, tuned_ck, options)
        if not pairs:
            raise MismatchError(_no_pairs_message(base_ck, tuned_ck, skipped))
        spectra = _spectra_in_shape_order(base_ck, tuned_ck, pairs, skipped, options, device, progress)
        base_info, tuned_info = base_ck.info, tuned_ck.info
    if not spectra:
        raise MismatchError(f"{tuned}: all {len(pairs)} matched 2-D tensors equal those of {base}; nothing changed")
    layers = build_layers(spectra, options)
    return Analysis(
        base=base, tuned=tuned, options=options, layers=layers,
        skipped=tuple(sorted(skipped, key=lambda s: natural_key(s.name))),
        summary=summarize(layers, options.lora_ranks), recommendation=None,
        base_info=base_info, tuned_info=tuned_info, device=str(device),
        elapsed_s=time.perf_counter() - started, version=version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def build_layers(spectra: Iterable[Spectrum], options: Options) -> tuple[LayerMetrics, ...]:
    """Per-matrix metrics in natural key order, with module kinds and layer indices derived from all names."""
    ordered = sorted(spectra, key=lambda s: natural_key(s.name))
    kinds = module_kinds([s.name for s in ordered])
    return tuple(compute_metrics(s, options, *kinds[s.name]) for s in ordered)


class _Counted(Sized, Iterable[T]):
    """An iterator that knows its length, so progress bars can show a total."""

    def __init__(self, items: Iterator[T], n: int) -> None:
        self.items, self.n = items, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[T]:
        return self.items


def _spectra_in_shape_order(
    base: Checkpoint, tuned: Checkpoint, pairs: list[Pair], skipped: list[Skipped],
    options: Options, device: Any, progress: ProgressHook,
) -> list[Spectrum]:
    """Read pairs grouped by shape (so same-shape matrices batch together); unchanged ones go to `skipped`."""
    ordered = sorted(pairs, key=lambda p: (p.shape, natural_key(p.name)))

    def deltas() -> Iterator[Delta]:  # runs on the spectrum stage's reader thread
        for pair in ordered:
            delta = make_delta(base, tuned, pair, options)
            if isinstance(delta, Skipped):
                skipped.append(delta)
            else:
                yield delta

    stream = compute_spectra(deltas(), options, device)
    with contextlib.closing(stream):
        return list(progress(_Counted(stream, len(ordered))))


def _no_pairs_message(base: Checkpoint, tuned: Checkpoint, skipped: list[Skipped]) -> str:
    reasons = sorted({s.reason for s in skipped})
    if not set(base.entries) & set(tuned.entries) and "shape-mismatch" not in reasons:
        example_b = next(iter(sorted(base.entries)), "-")
        example_t = next(iter(sorted(tuned.entries)), "-")
        return (f"{tuned.path}: no tensor names in common with {base.path} (e.g. base {example_b!r}, tuned "
                f"{example_t!r}); same architecture?")
    return (f"{tuned.path}: no 2-D floating-point tensors to compare with {base.path} "
            f"(skipped: {', '.join(reasons) or 'none'}); check --include/--exclude and that both are the same model")
