"""A full fine-tune → a PEFT LoRA adapter: the truncated SVD of each ΔW, split into B and A, written streaming.

Passes. The adapter's layout (each module's rank) must be fixed before its first byte is written, so extraction
reads the checkpoints twice: a first pass finds what changed (rank N and from-config: ‖ΔW‖² only, cheap) or
computes every σ (energy, auto, budget: the ranks depend on all spectra); the second computes the leading
singular triplets of each ΔW at its rank (TopK, exact: float64 Gram eigenvectors and one Rayleigh–Ritz step) and
writes each module's factors as soon as they exist, so memory holds a few ΔW and one module's factors.

α = r for every module, so PEFT's scale α/r is 1 and B·A is the truncated ΔW itself: B = U_r·diag(√σ),
A = diag(√σ)·V_rᵀ (spectra.lora.split), and the merged model differs from TUNED by √(1 − E(r))·‖ΔW‖_F.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from spectra.engine.executor import ProgressHook, identity, run
from spectra.engine.kernels import Energy, Kernel, Values
from spectra.engine.local import LocalExecutor, resolve_device
from spectra.errors import CheckpointError, MismatchError, OptionsError
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.lora.rules import RankRule, config_ranks, read_rank_config, spectral_ranks
from spectra.lora.split import ExtractResult, Target, cost_notes, default_dtype, write_adapter
from spectra.lora.targets import (
    base_name,
    changed_biases,
    check_output,
    conv1d_names,
    is_embedding_layer,
    select,
    tensor_changes,
    with_biases,
)
from spectra.names import natural_key
from spectra.peft.config import build_adapter_config
from spectra.peft.task import infer_task_type
from spectra.peft.write import ADAPTER_DTYPES
from spectra.plan.jobs import Dense, Job
from spectra.records import Options, Resources, Skipped, Spectrum

log = logging.getLogger(__name__)

BIASES: Final = ("carry", "drop")


def extract(
    base: str | os.PathLike[str],
    tuned: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    rule: RankRule,
    options: Options | None = None,
    *,
    dtype: str | None = None,
    include_embeddings: bool = False,
    targets: Sequence[str] | None = None,
    biases: str = "carry",
    overwrite: bool = False,
    progress: ProgressHook = identity,
) -> ExtractResult:
    """Write a PEFT LoRA adapter whose merge onto BASE reproduces TUNED as well as the ranks allow.

    Every changed 2-D module weight is a candidate (embeddings and lm_head only with `include_embeddings`);
    unchanged modules and modules given rank 0 are left out and listed. A changed bias of an adapted module is
    carried as PEFT's lora_bias (`biases="carry"`), or left out and listed (`"drop"`); other changed tensors
    (norms) are listed as not representable.

    Args:
        base, tuned: checkpoints as for `analyze` (files, folders, shards, hub ids); not adapters.
        out_dir: the adapter folder to write (atomically: all of it, or nothing).
        rule: how each module's rank is chosen (see RankRule).
        options: device, precision of the σ pass, include/exclude, threads, batch bytes, download.
        dtype: "fp32", "bf16" or "fp16" for the factors; None: bf16/fp16 when TUNED is stored so, else fp32.
        include_embeddings: also adapt embeddings and output heads (vLLM serves no LoRA on them by default).
        targets: module kinds or name suffixes to adapt (PEFT target_modules list semantics); None: all.
        biases: "carry" or "drop" changed biases of adapted modules.
        overwrite: replace a non-empty `out_dir`.
        progress: wraps each pass's stream of matrices (it has a len()).

    Raises:
        OptionsError: a bad setting (dtype, biases, rule values).
        CheckpointError: an input is missing, corrupt or an adapter.
        MismatchError: TUNED is BASE, nothing pairs, no module is targeted, nothing changed.
        SpectraError: the output folder is an input, inside or around one, or not empty without `overwrite`; a
            bias change PEFT cannot carry; the folder cannot be written.
    """
    started = time.perf_counter()
    options = options or Options()
    if biases not in BIASES:
        raise OptionsError(f"biases must be one of {', '.join(BIASES)}, got {biases!r}")
    if dtype is not None and dtype not in ADAPTER_DTYPES:
        raise OptionsError(f"dtype must be one of {', '.join(ADAPTER_DTYPES)}, got {dtype!r}")
    device = resolve_device(options.device)
    executor = LocalExecutor(Resources(str(device), options.threads, options.batch_bytes))
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(open_checkpoint(os.fspath(base), download=options.download))
        tuned_ck = stack.enter_context(open_checkpoint(os.fspath(tuned), download=options.download))
        _check_inputs(base_ck, tuned_ck)
        check_output(out_dir, [base_ck, tuned_ck], overwrite)
        rank_config = None if rule.from_config is None else read_rank_config(rule.from_config)
        jobs, left_out, kinds = select(base_ck, tuned_ck, options, include_embeddings, targets)
        conv1d = conv1d_names(base_ck, [base_name(j) for j in jobs])
        changed, spectra, unchanged, first = _first_pass(jobs, rule, options, executor, progress)
        left_out += unchanged
        if not changed:
            raise MismatchError(
                f"{tuned_ck.path}: none of the {len(jobs)} targeted modules changed; nothing to extract"
            )
        ranks, notes = _ranks(rule, changed, spectra, rank_config, options)
        dropped = [j for j in changed if ranks[j.name] == 0]
        left_out += [Skipped(base_name(j), "rank-0", rule.describe()) for j in dropped]
        kept = [j for j in changed if ranks[j.name] > 0]
        bias_of, bias_left = changed_biases(base_ck, tuned_ck, kept, biases)
        left_out += bias_left + tensor_changes(base_ck, tuned_ck, kept, options)
        plan = [
            Target(j, base_name(j), ranks[j.name], is_embedding_layer(kinds[base_name(j)]), base_name(j) in conv1d)
            for j in kept
        ]
        plan = with_biases(plan, bias_of)
        config, config_notes = build_adapter_config(
            kinds,
            {t.name: t.rank for t in plan},
            rslora=False,
            task_type=infer_task_type(base_ck.location),
            base_model=base_ck.path,
            alphas={t.name: float(t.rank) for t in plan},
            extra={**({"lora_bias": True} if bias_of else {}), **({"fan_in_fan_out": True} if conv1d else {})},
        )
        store = dtype or default_dtype(j.operand.tuned.dtype_name for j in kept if isinstance(j.operand, Dense))
        modules = write_adapter(out_dir, config, plan, store, executor, overwrite=overwrite, progress=progress)
    notes += (*config_notes, *cost_notes(modules))
    dropped_energy = sum(spectra[j.name].energy if j.name in spectra else first.get(j.name, 0.0) for j in dropped)
    return ExtractResult(
        out_dir=str(Path(out_dir)),
        source=os.fspath(tuned),
        base=os.fspath(base),
        rule=rule,
        dtype=store,
        modules=modules,
        left_out=tuple(sorted(left_out, key=lambda s: natural_key(s.name))),
        notes=notes,
        config=config,
        passes=2,
        device=str(device),
        elapsed_s=time.perf_counter() - started,
        dropped_energy=dropped_energy,
    )


def _check_inputs(base: Checkpoint, tuned: Checkpoint) -> None:
    for ck, role in ((base, "BASE"), (tuned, "TUNED")):
        if ck.format == "peft-adapter":
            hint = "pass the base model" if role == "BASE" else "to change an adapter's rank use `spectra resize`"
            raise CheckpointError(f"{ck.path}: {role} is a PEFT adapter; extract reads full checkpoints ({hint})")
    if os.path.realpath(base.location) == os.path.realpath(tuned.location):
        raise MismatchError(f"{tuned.path}: TUNED is the same checkpoint as BASE; there is no ΔW to extract")


def _first_pass(
    jobs: Sequence[Job], rule: RankRule, options: Options, executor: LocalExecutor, progress: ProgressHook
) -> tuple[list[Job], dict[str, Spectrum], list[Skipped], dict[str, float]]:
    """(changed jobs, name -> Spectrum for σ rules, unchanged left-outs, name -> ‖ΔW‖² for the others)."""
    changed: list[Job] = []
    spectra: dict[str, Spectrum] = {}
    energy: dict[str, float] = {}
    unchanged: list[Skipped] = []
    kernel: Kernel[Any] = Values(options.precision) if rule.needs_spectra else Energy()
    for job, result in run(jobs, kernel, executor, progress):
        if isinstance(result, Skipped):
            unchanged.append(Skipped(base_name(job), "unchanged", result.detail))
            continue
        changed.append(job)
        if isinstance(result, Spectrum):
            spectra[job.name] = result
        else:
            energy[job.name] = float(result)
    changed.sort(key=lambda j: natural_key(j.name))
    return changed, spectra, unchanged, energy


def _ranks(
    rule: RankRule,
    jobs: Sequence[Job],
    spectra: Mapping[str, Spectrum],
    config: Mapping[str, Any] | None,
    options: Options,
) -> tuple[dict[str, int], tuple[str, ...]]:
    """job name -> rank (0: left out), and notes."""
    notes = ["α = r for every module (PEFT's scale α/r = 1): B·A is the truncated ΔW itself"]
    if rule.rank is not None:
        return {j.name: min(rule.rank, *j.shape) for j in jobs}, tuple(notes)
    if config is not None:
        assert rule.from_config is not None
        by_base = config_ranks(config, [base_name(j) for j in jobs], rule.from_config)
        ranks = {j.name: min(by_base[base_name(j)], *j.shape) for j in jobs}
        if not any(ranks.values()):
            raise MismatchError(f"{rule.from_config}: the config targets none of the changed modules")
        return ranks, tuple(notes)
    ranks, reason = spectral_ranks(rule, [spectra[j.name] for j in jobs], options)
    if reason is not None:
        notes.append(f"The recommendation: {reason}")
    if not any(ranks.values()):
        raise MismatchError(f"{rule.describe()} gives every module rank 0; nothing to extract")
    return ranks, tuple(notes)
