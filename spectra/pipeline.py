"""analyze(): load -> pair/diff -> spectrum -> metrics -> summary -> Analysis."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Protocol, TypeVar

from spectra.analysis.metrics import compute_metrics, module_kinds, reading_order, summarize
from spectra.engine.local import compute_spectra, resolve_device
from spectra.errors import CheckpointError, MismatchError
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.lora.recommend import recommend
from spectra.names import natural_key
from spectra.plan.adapter import adapter_notes, make_factored_delta, pair_adapter
from spectra.plan.dense import make_delta, pair_tensors
from spectra.records import Analysis, Delta, LayerMetrics, Options, Skipped, Spectrum

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


def analyze(
    base: str | None, tuned: str, options: Options | None = None, *, progress: ProgressHook = identity
) -> Analysis:
    """Return the spectral analysis of ΔW = tuned − base for every matched 2-D weight.

    Args:
        base: the base checkpoint: a `.safetensors` file, a model folder (single file or shard index) or a hub id
            `org/name[@revision]` in the local Hugging Face cache; None only when `tuned` is a PEFT adapter.
        tuned: the fine-tuned checkpoint, same layouts, or a PEFT LoRA adapter folder (ΔW = scale·B@A, factored).
        options: settings (threshold, device, precision, filters, download, ...); defaults to Options().
        progress: wraps the stream of computed matrices, e.g. `rich.progress.track` (it has a len()).

    Raises:
        CheckpointError: a checkpoint is missing (or not cached), corrupt, truncated or a pickle; an adapter is not a
            LoRA; BASE is an adapter; no BASE for a dense TUNED.
        MismatchError: no analysable tensor pairs, or nothing changed.
        OptionsError: device "cuda" without a GPU.
    """
    options = options or Options()
    started = time.perf_counter()
    device = resolve_device(options.device)
    with contextlib.ExitStack() as stack:
        base_ck = None if base is None else stack.enter_context(open_checkpoint(base, download=options.download))
        tuned_ck = stack.enter_context(open_checkpoint(tuned, download=options.download))
        if base_ck is not None and base_ck.format == "peft-adapter":
            raise CheckpointError(
                f"{base}: BASE is a PEFT adapter; pass the base model as BASE and the adapter as "
                "TUNED (or the adapter alone)"
            )
        if tuned_ck.format == "peft-adapter":
            spectra, skipped, n_pairs = _adapter_spectra(base_ck, tuned_ck, options, device, progress)
            notes = adapter_notes(base_ck)
        elif base_ck is None:
            raise CheckpointError(
                f"{tuned}: not a PEFT adapter (no adapter_config.json), so a base checkpoint is "
                "needed to form ΔW = tuned − base; pass BASE"
            )
        else:
            spectra, skipped, n_pairs, notes = _dense_spectra(base_ck, tuned_ck, options, device, progress)
        base_info, tuned_info = (base_ck.info if base_ck is not None else None), tuned_ck.info
    if not spectra:
        raise MismatchError(_nothing_changed(base, tuned, n_pairs, tuned_info.format == "peft-adapter"))
    layers = build_layers(spectra, options)
    return Analysis(
        base=base,
        tuned=tuned,
        options=options,
        layers=layers,
        skipped=tuple(sorted(skipped, key=lambda s: natural_key(s.name))),
        summary=summarize(layers, options.lora_ranks),
        recommendation=recommend(layers),
        base_info=base_info,
        tuned_info=tuned_info,
        device=str(device),
        elapsed_s=time.perf_counter() - started,
        version=version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=notes,
    )


def _dense_spectra(
    base: Checkpoint, tuned: Checkpoint, options: Options, device: Any, progress: ProgressHook
) -> tuple[list[Spectrum], list[Skipped], int, tuple[str, ...]]:
    """Spectra of ΔW = tuned − base, formed densely; the skipped tensors; the number of matched pairs; notes."""
    pairs, skipped = pair_tensors(base, tuned, options)
    if not pairs:
        raise MismatchError(_no_pairs_message(base, tuned, skipped))
    spectra = _spectra_in_shape_order(
        pairs, lambda p: make_delta(base, tuned, p, options), skipped, options, device, progress
    )
    return spectra, skipped, len(pairs), tuple(p.note for p in pairs if p.note is not None)


def _adapter_spectra(
    base: Checkpoint | None, adapter: Checkpoint, options: Options, device: Any, progress: ProgressHook
) -> tuple[list[Spectrum], list[Skipped], int]:
    """Spectra of an adapter's ΔW = scale·B@A from the factors; the skipped tensors; the number of modules."""
    pairs, skipped = pair_adapter(adapter, base, options)
    if not pairs:
        reasons = ", ".join(sorted({f"{s.reason}: {s.detail}" if s.detail else s.reason for s in skipped})[:3])
        raise MismatchError(f"{adapter.path}: no LoRA factors to analyse (skipped: {reasons or 'nothing found'})")
    spectra = _spectra_in_shape_order(
        pairs, lambda p: make_factored_delta(adapter, base, p), skipped, options, device, progress
    )
    return spectra, skipped, len(pairs)


def _nothing_changed(base: str | None, tuned: str, n_pairs: int, adapter: bool) -> str:
    if adapter:
        return (
            f"{tuned}: all {n_pairs} adapted modules have ΔW = 0 (lora_B is zero, as PEFT initialises it); "
            "was the adapter trained?"
        )
    return f"{tuned}: all {n_pairs} matched 2-D tensors equal those of {base}; nothing changed"


def build_layers(spectra: Iterable[Spectrum], options: Options) -> tuple[LayerMetrics, ...]:
    """Per-matrix metrics in reading order (embeddings, then each block in execution order, then heads)."""
    spectra = list(spectra)
    kinds = module_kinds([s.name for s in spectra])
    ordered = sorted(spectra, key=lambda s: (reading_order(*kinds[s.name]), natural_key(s.name)))
    return tuple(compute_metrics(s, options, *kinds[s.name]) for s in ordered)


class _Counted(Sized, Iterable[T]):
    """An iterator that knows its length, so progress bars can show a total."""

    def __init__(self, items: Iterator[T], n: int) -> None:
        self.items, self.n = items, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[T]:
        return self.items


class _Job(Protocol):
    """A matrix to compute: a dense pair or an adapter module."""

    @property
    def name(self) -> str: ...

    @property
    def shape(self) -> tuple[int, int]: ...


J = TypeVar("J", bound=_Job)


def _spectra_in_shape_order(
    jobs: list[J],
    make: Callable[[J], Delta | Skipped],
    skipped: list[Skipped],
    options: Options,
    device: Any,
    progress: ProgressHook,
) -> list[Spectrum]:
    """Make deltas grouped by shape (so same-shape matrices batch together); unchanged ones go to `skipped`."""
    ordered = sorted(jobs, key=lambda p: (p.shape, natural_key(p.name)))

    def deltas() -> Iterator[Delta]:  # runs on the spectrum stage's reader thread
        for job in ordered:
            delta = make(job)
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
        return (
            f"{tuned.path}: no tensor names in common with {base.path} (e.g. base {example_b!r}, tuned "
            f"{example_t!r}); same architecture?"
        )
    return (
        f"{tuned.path}: no 2-D floating-point tensors to compare with {base.path} "
        f"(skipped: {', '.join(reasons) or 'none'}); check --include/--exclude and that both are the same model"
    )
