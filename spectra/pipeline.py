"""analyze(): open → plan → engine.run(Values) → metrics → summary → Analysis (analyze_many: one base × N tuned).

Inputs are paths (streamed from disk) or, for a notebook right after training, in-memory models and state dicts
(spectra.plan.memory). Options may be given as an `Options` or as its fields by keyword.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Union

import torch

from spectra.analysis.metrics import compute_metrics, module_kinds, quantization_notes, reading_order, summarize
from spectra.engine.executor import ProgressHook, identity, run
from spectra.engine.kernels import Values
from spectra.engine.local import LocalExecutor, resolve_devices
from spectra.engine.ray import RayExecutor
from spectra.errors import CheckpointError, MismatchError, OptionsError
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.io.config import read_model_config
from spectra.lora.recommend import recommend
from spectra.names import natural_key
from spectra.peft.task import infer_task_type
from spectra.plan import memory
from spectra.plan.adapter import plan_adapter
from spectra.plan.dense import plan_pair
from spectra.plan.jobs import Plan
from spectra.records import (
    Analysis,
    CheckpointInfo,
    LayerMetrics,
    ModelConfig,
    Options,
    Resources,
    Skipped,
    Spectrum,
    config_task_type,
)

log = logging.getLogger(__name__)

__all__ = ["ProgressHook", "analyze", "analyze_many", "build_layers", "identity", "make_executor", "version"]

PathLike = str | os.PathLike[str]
# a checkpoint path or hub id, or in memory: an nn.Module (a PeftModel too) or a state dict of tensors
Source = Union[PathLike, Mapping[str, torch.Tensor], torch.nn.Module]  # noqa: UP007 - a runtime alias with torch
Progress = ProgressHook | bool
ADAPTER_FORMATS = ("peft-adapter", "peft-model")  # inputs whose ΔW come from LoRA factors


def version() -> str:
    try:
        return metadata.version("spectra-lm")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def analyze(
    base: Source | None,
    tuned: Source,
    options: Options | None = None,
    *,
    progress: Progress = identity,
    **changes: Any,
) -> Analysis:
    """Return the spectral analysis of ΔW = tuned − base for every matched 2-D weight.

    >>> analyze("base", "tuned", threshold=0.8, device="cpu")      # Options fields as keywords
    >>> analyze(base_model.state_dict(), model, progress=True)      # in memory, right after training

    Args:
        base: the base checkpoint: a `.safetensors` file, a model folder (single file or shard index) or a hub id
            `org/name[@revision]` in the local Hugging Face cache; or in memory, an nn.Module or a state dict;
            None only when `tuned` is a PEFT adapter (a folder or a PeftModel).
        tuned: the fine-tuned checkpoint, same forms, or a PEFT LoRA adapter folder or PeftModel (ΔW = scale·B@A,
            from the factors). In-memory inputs are not copied or saved; both sides must then be in memory.
        options: settings (threshold, device, precision, filters, download, ...); defaults to Options().
        progress: wraps the stream of computed matrices, e.g. `rich.progress.track` (it has a len()); True shows
            a `tqdm.auto` bar (a widget in Jupyter).
        **changes: Options fields to set on top of `options`, e.g. `threshold=0.8` (validated like Options).

    Raises:
        CheckpointError: a checkpoint is missing (or not cached), corrupt, truncated or a pickle; an adapter is not a
            LoRA; BASE is an adapter; no BASE for a dense TUNED.
        MismatchError: no analysable tensor pairs, or nothing changed.
        OptionsError: device "cuda" without a GPU, or a bad option value.
        TypeError: a keyword that is not an Options field.
    """
    (analysis,) = analyze_many(base, [tuned], options, progress=progress, **changes)
    return analysis


def analyze_many(
    base: Source | None,
    tuned: Sequence[Source],
    options: Options | None = None,
    *,
    progress: Progress = identity,
    **changes: Any,
) -> tuple[Analysis, ...]:
    """Return one Analysis per tuned input against the same base, each equal to `analyze(base, tuned[i])`.

    The matrices of all inputs run in one stream, the same matrix of every input back to back, so each base tensor
    is read from disk once (and from the page cache for the other inputs), and the base's header once.

    Args:
        base: as for `analyze`; None only when every tuned input is a PEFT adapter.
        tuned: the tuned checkpoints or adapters, at least one.
        options, progress, changes: as for `analyze` (progress counts the matrices of all inputs).

    Raises:
        as `analyze`, for whichever input is at fault first.
    """
    options = with_changes(options, changes)
    hook = progress_hook(progress)
    started = time.perf_counter()
    if not tuned:
        raise OptionsError("analyze_many needs at least one tuned input")
    kernel = Values(options.precision)
    executor = make_executor(options)
    if any(memory.is_in_memory(x) for x in (base, *tuned)):
        base_path, tuned_paths = memory.labels(base, tuned)
        plans, base_info, tuned_infos = memory.plan_in_memory(base, tuned, options)
        base_info = base_info and dataclasses.replace(base_info, model=_with_task(base_info.model))
        tuned_infos = [dataclasses.replace(i, model=_with_task(i.model)) for i in tuned_infos]
    else:
        base_path = None if base is None else os.fspath(base)  # type: ignore[arg-type]
        tuned_paths = [os.fspath(t) for t in tuned]  # type: ignore[arg-type]
        plans, base_info, tuned_infos = _open_and_plan(base_path, tuned_paths, options)
    spectra: list[list[Spectrum]] = [[] for _ in plans]
    unchanged: list[list[Skipped]] = [[] for _ in plans]
    for job, result in run((job for plan in plans for job in plan.jobs), kernel, executor, hook):
        if isinstance(result, Skipped):
            unchanged[job.source].append(result)
        else:
            spectra[job.source].append(result)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    analyses = []
    for source, plan in enumerate(plans):
        if not spectra[source]:
            adapter = tuned_infos[source].format in ADAPTER_FORMATS
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
                executor.label,
                started,
                created,
            )
        )
    return tuple(analyses)


def make_executor(options: Options) -> LocalExecutor | RayExecutor:
    """The executor `options` ask for: Ray actors (executor "ray"), else this process on `devices` (default: every
    visible GPU, or the CPU). Every command builds its executor here, once; its `label` names the devices used.

    Raises:
        OptionsError: a CUDA device asked for that torch does not see (local; Ray checks its cluster when it runs).
    """
    if options.executor == "ray":
        return RayExecutor(
            options.ray_address, device=options.device, threads=options.threads, batch_bytes=options.batch_bytes
        )
    devices = resolve_devices(options.device, options.devices)
    many = devices if len(devices) > 1 else ()
    return LocalExecutor(Resources(devices[0], options.threads, options.batch_bytes, many))


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
        return plans, (_info(base_ck) if base_ck is not None else None), [_info(ck) for ck in tuned_cks]


def with_changes(options: Options | None, changes: Mapping[str, Any]) -> Options:
    """`options` (default Options()) with the fields in `changes` replaced, validated again.

    Raises:
        TypeError: a key that is not an Options field.
        OptionsError: a value out of range.
    """
    names = {f.name for f in dataclasses.fields(Options)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise TypeError(
            f"unknown option {', '.join(map(repr, unknown))}; Options fields are {', '.join(sorted(names))}"
        )
    return dataclasses.replace(options or Options(), **changes)


def progress_hook(progress: Progress) -> ProgressHook:
    """The hook for `progress`: as given, none for False, a `tqdm.auto` bar for True.

    Raises:
        OptionsError: progress=True without tqdm installed.
    """
    if progress is False:
        return identity
    if progress is not True:
        return progress
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped, unused-ignore]
    except ModuleNotFoundError:
        raise OptionsError("progress=True shows a tqdm bar: pip install tqdm (or pass a hook)") from None
    return lambda items: tqdm(items, desc="ΔW spectra", unit="matrix")


def _info(checkpoint: Checkpoint) -> CheckpointInfo:
    """The checkpoint's info with the config beside its weights (and the PEFT task type that config implies)."""
    adapter = checkpoint.format == "peft-adapter"
    model = read_model_config(checkpoint.location, adapter=adapter)
    return dataclasses.replace(checkpoint.info, model=_with_task(model))


def _with_task(model: ModelConfig | None) -> ModelConfig | None:
    if model is None or model.task_type is not None or not model.architectures:
        return model
    raw: dict[str, Any] = {"architectures": list(model.architectures), "model_type": model.model_type}
    if model.is_encoder_decoder is not None:
        raw["is_encoder_decoder"] = model.is_encoder_decoder
    return dataclasses.replace(model, task_type=infer_task_type(raw))


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
        recommendation=recommend(layers, task_type=config_task_type(*infos)),
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
