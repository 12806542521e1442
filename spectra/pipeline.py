"""analyze(): open → plan → engine.run(Values) → metrics → summary → Analysis (analyze_many: one base × N tuned)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from importlib import metadata

from spectra.analysis.metrics import compute_metrics, module_kinds, quantization_notes, reading_order, summarize
from spectra.engine.executor import ProgressHook, identity, run
from spectra.engine.kernels import Values
from spectra.engine.local import LocalExecutor, resolve_device
from spectra.errors import CheckpointError, MismatchError, OptionsError
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.lora.recommend import recommend
from spectra.names import natural_key
from spectra.plan.adapter import plan_adapter
from spectra.plan.dense import plan_pair
from spectra.plan.jobs import Plan
from spectra.records import Analysis, CheckpointInfo, LayerMetrics, Options, Resources, Skipped, Spectrum

log = logging.getLogger(__name__)

__all__ = ["ProgressHook", "analyze", "analyze_many", "build_layers", "identity", "version"]

PathLike = str | os.PathLike[str]


def version() -> str:
    try:
        return metadata.version("spectra-lm")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def analyze(
    base: PathLike | None, tuned: PathLike, options: Options | None = None, *, progress: ProgressHook = identity
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
    (analysis,) = analyze_many(base, [tuned], options, progress=progress)
    return analysis


def analyze_many(
    base: PathLike | None,
    tuned: Sequence[PathLike],
    options: Options | None = None,
    *,
    progress: ProgressHook = identity,
) -> tuple[Analysis, ...]:
    """Return one Analysis per tuned input against the same base, each equal to `analyze(base, tuned[i])`.

    The matrices of all inputs run in one stream, the same matrix of every input back to back, so each base tensor
    is read from disk once (and from the page cache for the other inputs), and the base's header once.

    Args:
        base: as for `analyze`; None only when every tuned input is a PEFT adapter.
        tuned: the tuned checkpoints or adapters, at least one.
        options, progress: as for `analyze` (progress counts the matrices of all inputs).

    Raises:
        as `analyze`, for whichever input is at fault first.
    """
    options = options or Options()
    started = time.perf_counter()
    base_path = None if base is None else os.fspath(base)
    tuned_paths = [os.fspath(t) for t in tuned]
    if not tuned_paths:
        raise OptionsError("analyze_many needs at least one tuned input")
    device = resolve_device(options.device)
    kernel = Values(options.precision)
    executor = LocalExecutor(Resources(str(device), options.threads, options.batch_bytes))
    plans, base_info, tuned_infos = _open_and_plan(base_path, tuned_paths, options)
    spectra: list[list[Spectrum]] = [[] for _ in plans]
    unchanged: list[list[Skipped]] = [[] for _ in plans]
    for job, result in run((job for plan in plans for job in plan.jobs), kernel, executor, progress):
        if isinstance(result, Skipped):
            unchanged[job.source].append(result)
        else:
            spectra[job.source].append(result)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    analyses = []
    for source, plan in enumerate(plans):
        if not spectra[source]:
            adapter = tuned_infos[source].format == "peft-adapter"
            raise MismatchError(_nothing_changed(base_path, tuned_paths[source], len(plan.jobs), adapter))
        analyses.append(
            _analysis(
                base_path,
                tuned_paths[source],
                options,
                spectra[source],
                (*plan.skipped, *unchanged[source]),
                plan.notes,
                (base_info, tuned_infos[source]),
                str(device),
                started,
                created,
            )
        )
    return tuple(analyses)


def _open_and_plan(
    base: str | None, tuned: list[str], options: Options
) -> tuple[list[Plan], CheckpointInfo | None, list[CheckpointInfo]]:
    """Open every input (headers only), check their roles, and plan each tuned input against the base."""
    with contextlib.ExitStack() as stack:
        base_ck = None if base is None else stack.enter_context(open_checkpoint(base, download=options.download))
        tuned_cks = [stack.enter_context(open_checkpoint(t, download=options.download)) for t in tuned]
        if base_ck is not None and base_ck.format == "peft-adapter":
            raise CheckpointError(
                f"{base}: BASE is a PEFT adapter; pass the base model as BASE and the adapter as "
                "TUNED (or the adapter alone)"
            )
        plans = [_plan_input(base_ck, ck, options, source) for source, ck in enumerate(tuned_cks)]
        return plans, (base_ck.info if base_ck is not None else None), [ck.info for ck in tuned_cks]


def _plan_input(base: Checkpoint | None, tuned: Checkpoint, options: Options, source: int) -> Plan:
    """The plan of one tuned input: factored jobs for an adapter, dense pairs otherwise; refuses an empty plan."""
    if tuned.format == "peft-adapter":
        plan = plan_adapter(tuned, base, options, source=source)
        if not plan.jobs:
            reasons = ", ".join(sorted({f"{s.reason}: {s.detail}" if s.detail else s.reason for s in plan.skipped})[:3])
            raise MismatchError(f"{tuned.path}: no LoRA factors to analyse (skipped: {reasons or 'nothing found'})")
        return plan
    if base is None:
        raise CheckpointError(
            f"{tuned.path}: not a PEFT adapter (no adapter_config.json), so a base checkpoint is "
            "needed to form ΔW = tuned − base; pass BASE"
        )
    plan = plan_pair(base, tuned, options, source=source)
    if not plan.jobs:
        raise MismatchError(_no_pairs_message(base, tuned, plan.skipped))
    return plan


def _analysis(
    base: str | None,
    tuned: str,
    options: Options,
    spectra: list[Spectrum],
    skipped: Iterable[Skipped],
    notes: tuple[str, ...],
    infos: tuple[CheckpointInfo | None, CheckpointInfo],
    device: str,
    started: float,
    created: str,
) -> Analysis:
    layers = build_layers(spectra, options)
    return Analysis(
        base=base,
        tuned=tuned,
        options=options,
        layers=layers,
        skipped=tuple(sorted(skipped, key=lambda s: natural_key(s.name))),
        summary=summarize(layers, options.lora_ranks),
        recommendation=recommend(layers),
        base_info=infos[0],
        tuned_info=infos[1],
        device=device,
        elapsed_s=time.perf_counter() - started,
        version=version(),
        created=created,
        notes=(*notes, *quantization_notes(layers, options)),
    )


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


def _no_pairs_message(base: Checkpoint, tuned: Checkpoint, skipped: Iterable[Skipped]) -> str:
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
