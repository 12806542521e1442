"""A PEFT LoRA adapter → a smaller one: new per-module ranks from the adapter's own factors, ΔW never formed.

Each module's ΔW = scale·B·A is decomposed from its factors (QR of B and Aᵀ, an r×r SVD: the engine's factored
routes), so a pass costs (m + n)·r² per module, whatever the model. A first pass gives every σ (the ranks of
energy, auto and budget depend on them; a fixed rank is capped at each module's numerical rank); the second
computes the top triplets at the new ranks and writes them. The user's adapter_config.json is kept: only r,
lora_alpha, rank_pattern and alpha_pattern change, each module keeping its scale (α/r, or α/√r with rsLoRA), and
modules given rank 0 are appended to exclude_modules (spectra.peft.config.resized_config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import numpy as np
import torch

from spectra.engine.executor import ProgressHook, identity, run
from spectra.engine.kernels import Values
from spectra.engine.local import LocalExecutor, resolve_device
from spectra.errors import CheckpointError, MismatchError, OptionsError
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.lora.rules import RankRule, config_ranks, read_rank_config, spectral_ranks
from spectra.lora.split import ExtractResult, Target, cost_notes, default_dtype, write_adapter
from spectra.lora.targets import check_output
from spectra.names import natural_key, printable
from spectra.peft.config import resized_config
from spectra.peft.layout import LORA_KEY, adapter_key
from spectra.peft.read import LoraSettings, read_lora_settings
from spectra.peft.write import ADAPTER_DTYPES
from spectra.plan.adapter import plan_adapter
from spectra.plan.dense import filter_reason
from spectra.plan.jobs import Factored, Job
from spectra.records import Options, Resources, Skipped, Spectrum

log = logging.getLogger(__name__)

EPS64: Final = float(np.finfo(np.float64).eps)
# PEFT adapter types that are not LoRA, and why their rank cannot be changed here
NOT_LORA: Final = {
    "IA3": "IA³ scales activations by learned vectors: it has no rank to change",
    "LOKR": "LoKr's ΔW is a Kronecker product of factors, not scale·B·A; truncating its factors is another method",
    "LOHA": "LoHa's ΔW is a Hadamard product of two low-rank products, not scale·B·A",
    "ADALORA": "AdaLoRA stores P·Λ·Q with its own rank budget; resize takes plain LoRA adapters",
}


def resize(
    adapter: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    rule: RankRule,
    options: Options | None = None,
    *,
    base: str | os.PathLike[str] | None = None,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: ProgressHook = identity,
) -> ExtractResult:
    """Write a copy of a PEFT LoRA adapter with new per-module ranks, each module its best approximation at its rank.

    Modules left out by `options.include`/`exclude` are kept at their rank (refactored exactly). Modules with
    ΔW = 0 or given rank 0 are dropped (exclude_modules) and listed; lora_B biases are carried.

    Args:
        adapter: a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
        out_dir: the adapter folder to write (atomically).
        rule: the new ranks (a fixed rank is capped at each module's current rank).
        options: device, include/exclude, threads, batch bytes.
        base: the base model, to check shapes and report ‖ΔW‖/‖W‖ per module; optional.
        dtype: "fp32", "bf16", "fp16"; None: the adapter's own storage dtype.
        overwrite: replace a non-empty `out_dir`.
        progress: wraps each pass's stream of matrices.

    Raises:
        OptionsError: a bad setting.
        CheckpointError: not a LoRA adapter (DoRA, IA³, LoKr, ... refused with the reason), tensors resize cannot
            carry (modules_to_save copies, trainable tokens), a malformed adapter.
        MismatchError: no module to resize, or every module would get rank 0.
        SpectraError: the output folder is an input or not empty without `overwrite`; it cannot be written.
    """
    started = time.perf_counter()
    options = options or Options()
    if dtype is not None and dtype not in ADAPTER_DTYPES:
        raise OptionsError(f"dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {dtype!r}")
    device = resolve_device(options.device)
    executor = LocalExecutor(Resources(str(device), options.threads, options.batch_bytes))
    with contextlib.ExitStack() as stack:
        ck = stack.enter_context(open_checkpoint(os.fspath(adapter), download=options.download))
        base_ck = None if base is None else stack.enter_context(open_checkpoint(os.fspath(base)))
        settings = _lora_settings(ck)
        check_output(out_dir, [ck] if base_ck is None else [ck, base_ck], overwrite)
        rank_config = None if rule.from_config is None else read_rank_config(rule.from_config)
        jobs, biases = _plan(ck, base_ck, settings)
        selected = [j for j in jobs if filter_reason(j.name, options) is None]
        if not selected:
            raise MismatchError(f"{ck.path}: no LoRA module matches --include/--exclude; nothing to resize")
        spectra, left_out = _first_pass(jobs, options, executor, progress)
        ranks = _ranks(rule, [j for j in selected if j.name in spectra], spectra, rank_config, options)
        for job in jobs:  # modules not selected keep their rank
            if job.name in spectra and job not in selected:
                ranks[job.name] = numerical_rank(spectra[job.name])
        modules_of = {job.name: module_of(job) for job in jobs}
        left_out += [Skipped(n, "rank-0", rule.describe()) for n, r in ranks.items() if r == 0]
        left_out += [
            Skipped(adapter_key(modules_of[n], "bias"), "not-representable", "the module's lora_B.bias is dropped")
            for n, r in ranks.items()
            if r == 0 and n in biases
        ]
        if not any(ranks.values()):
            raise MismatchError(f"{ck.path}: {rule.describe()} gives every module rank 0; nothing to write")
        new = {modules_of[j.name]: ranks.get(j.name, 0) for j in jobs}
        config, notes = resized_config(settings.raw, new)
        plan = [_target(ck, job, modules_of[job.name], ranks[job.name], settings, biases) for job in jobs]
        plan = [t for t in plan if t.rank > 0]
        store = dtype or default_dtype(j.operand.a.dtype_name for j in jobs if isinstance(j.operand, Factored))
        modules = write_adapter(out_dir, config, plan, store, executor, overwrite=overwrite, progress=progress)
    return ExtractResult(
        out_dir=str(Path(out_dir)),
        source=os.fspath(adapter),
        base=None if base is None else os.fspath(base),
        rule=rule,
        dtype=store,
        modules=modules,
        left_out=tuple(sorted(left_out, key=lambda s: natural_key(s.name))),
        notes=(*notes, *cost_notes(modules)),
        config=config,
        passes=2,
        device=str(device),
        elapsed_s=time.perf_counter() - started,
        dropped_energy=sum(spectra[n].energy for n, r in ranks.items() if r == 0),
    )


def _lora_settings(ck: Checkpoint) -> LoraSettings:
    """The adapter's validated LoRA settings; other adapter types and LoRA variants are refused with the reason."""
    if ck.format != "peft-adapter":
        raise CheckpointError(
            f"{ck.path}: not a PEFT adapter folder (adapter_config.json + adapter_model.safetensors); "
            "to turn a full fine-tune into an adapter use `spectra extract BASE TUNED`"
        )
    try:
        settings = read_lora_settings(ck.location, ck.path)
    except CheckpointError as exc:
        kind = re.search(r"adapter type (\S+) is not supported", str(exc))
        if kind is not None and kind.group(1) in NOT_LORA:
            raise CheckpointError(f"{ck.path}: cannot resize: {NOT_LORA[kind.group(1)]}") from None
        raise
    if settings.variant is not None:
        raise CheckpointError(
            f"{ck.path}: cannot resize a {settings.variant} adapter: its ΔW is not scale·B·A, so truncating B·A "
            "does not give its best lower-rank version; resize takes plain LoRA adapters"
        )
    return settings


def _plan(ck: Checkpoint, base: Checkpoint | None, settings: LoraSettings) -> tuple[list[Job], dict[str, str]]:
    """Every LoRA module as a factored job (include/exclude applied later), and job name -> its lora_B.bias key.

    Raises:
        CheckpointError: the adapter holds tensors a resized LoRA cannot carry, or no LoRA module.
    """
    plan = plan_adapter(ck, base, Options())
    biases = {s.name for s in plan.skipped if s.reason == "not-2d" and s.detail.startswith("LoRA bias")}
    blocking = [s for s in plan.skipped if s.reason != "not-2d" or s.name not in biases]
    if blocking:
        first = blocking[0]
        raise CheckpointError(
            f"{ck.path}: cannot resize: {printable(first.name)}: {first.detail or first.reason}"
            + (f" (and {len(blocking) - 1} more)" if len(blocking) > 1 else "")
            + "; resize writes LoRA factors only (save the adapter without such tensors, e.g. "
            "save_embedding_layers=False)"
        )
    if not plan.jobs:
        raise MismatchError(f"{ck.path}: no LoRA factors to resize")
    jobs = sorted(plan.jobs, key=lambda j: natural_key(j.name))
    bias_of = {}
    for job in jobs:
        key = adapter_key(module_of(job), "bias")
        if key in biases:
            bias_of[job.name] = key
    return jobs, bias_of


def module_of(job: Job) -> str:
    """The adapter's own module name of a factored job (its lora_A key without the LoRA parts)."""
    assert isinstance(job.operand, Factored)
    match = LORA_KEY.match(job.operand.a.name)
    assert match is not None, job.operand.a.name
    return match["module"]


def _first_pass(
    jobs: Sequence[Job], options: Options, executor: LocalExecutor, progress: ProgressHook
) -> tuple[dict[str, Spectrum], list[Skipped]]:
    spectra: dict[str, Spectrum] = {}
    unchanged: list[Skipped] = []
    for job, result in run(jobs, Values(options.precision), executor, progress):
        if isinstance(result, Skipped):
            unchanged.append(dataclasses.replace(result, name=job.name))
        else:
            spectra[job.name] = result
    if not spectra:
        raise MismatchError("every module of the adapter has ΔW = 0 (lora_B is zero: untrained?); nothing to resize")
    return spectra, unchanged


def numerical_rank(s: Spectrum) -> int:
    """Directions above max(m, n)·ε₆₄·σ₁ (numpy's matrix_rank rule, as the TopK kernel trims)."""
    return int(np.count_nonzero(s.s > max(s.shape) * EPS64 * s.s[0])) if s.s.size and s.s[0] > 0 else 0


def _ranks(
    rule: RankRule,
    jobs: Sequence[Job],
    spectra: Mapping[str, Spectrum],
    config: Mapping[str, object] | None,
    options: Options,
) -> dict[str, int]:
    """job name -> new rank for the selected modules, never above the module's numerical rank."""
    if rule.rank is not None:
        ranks = {j.name: rule.rank for j in jobs}
    elif config is not None:
        assert rule.from_config is not None
        ranks = config_ranks(config, [f"{module_of(j)}.weight" for j in jobs], rule.from_config)
        ranks = {j.name: ranks[f"{module_of(j)}.weight"] for j in jobs}
    else:
        ranks, _ = spectral_ranks(rule, [spectra[j.name] for j in jobs], options)
    return {j.name: min(ranks[j.name], numerical_rank(spectra[j.name])) for j in jobs}


def _target(
    ck: Checkpoint, job: Job, module: str, rank: int, settings: LoraSettings, biases: Mapping[str, str]
) -> Target:
    """The module to write: its orientation as stored, and its merged Δbias = scale·lora_B.bias when it has one."""
    assert isinstance(job.operand, Factored)
    embedding = "lora_embedding_A" in job.operand.a.name
    bias = None
    if job.name in biases:
        bias = ck.read(biases[job.name]).to(torch.float64) * settings.scale(module)
    return Target(job, f"{module}.weight", rank, embedding, job.operand.transpose, bias)
