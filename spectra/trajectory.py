"""analyze_trajectory(): one base × the checkpoints of a training run → rank, change, captured energy vs step.

Each checkpoint is analysed as `rank` would (analyze_many: one stream, the base read once), or taken from a cache
of analyses keyed on the identity of the files (resolved path, size, modification time of every file read) and the
options that change the numbers, so a checkpoint already analysed is not recomputed. With `with_vectors`, the
top-k singular vectors of every ΔW are computed in one more stream (TopK) and φ(k, k) (Hu et al. 2021, Eq. 4) is
reported between consecutive checkpoints: 1 when the update keeps its directions, chance k/d when they are new.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Final

import numpy as np

from spectra.compare.records import (
    PointMatrix,
    StepSimilarity,
    Trajectory,
    TrajectoryPoint,
    TrajectorySettings,
    default_label,
    unique_labels,
)
from spectra.compare.run import base_key, plan_against
from spectra.engine.executor import Executor, ProgressHook, identity, run
from spectra.engine.kernels import TopK
from spectra.engine.local import LocalExecutor, resolve_device
from spectra.errors import CheckpointError, OptionsError, SpectraError
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.io.store import FORMAT, load_analysis, save_analysis
from spectra.names import ADAPTER_CONFIG, module_kinds, natural_key, reading_order
from spectra.pipeline import analyze_many, version
from spectra.records import Analysis, Factors, Options, Resources, Skipped

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
CHECKPOINT_DIR: Final = re.compile(r"checkpoint-(\d+)")  # transformers' Trainer: <output_dir>/checkpoint-<step>


def checkpoint_list(paths: Sequence[PathLike]) -> list[tuple[str, int | None]]:
    """The checkpoints named by `paths`, with the step each one's name gives (`…/checkpoint-500` → 500, else None).

    A folder holding `checkpoint-N` subfolders and no weights of its own (a Trainer output folder) stands for its
    checkpoints, ordered by step.

    Raises:
        CheckpointError: such a folder cannot be listed.
    """
    found: list[tuple[str, int | None]] = []
    for path in (os.fspath(p) for p in paths):
        subfolders = _trainer_checkpoints(Path(path))
        if subfolders:
            found += [(str(p), step) for step, p in subfolders]
        else:
            match = CHECKPOINT_DIR.fullmatch(Path(path).name) or CHECKPOINT_DIR.fullmatch(Path(path).parent.name)
            found.append((path, int(match.group(1)) if match else None))
    return found


def _trainer_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    try:
        if not stat.S_ISDIR(os.stat(folder).st_mode):
            return []
        with os.scandir(folder) as listing:
            names = [e.name for e in listing]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise CheckpointError(f"{folder}: cannot list the folder ({exc.strerror or type(exc).__name__})") from None
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return []
    steps = [(int(m.group(1)), folder / n) for n in names if (m := CHECKPOINT_DIR.fullmatch(n))]
    return sorted(steps)


def analyze_trajectory(
    base: PathLike,
    checkpoints: Sequence[PathLike],
    settings: TrajectorySettings | None = None,
    options: Options | None = None,
    *,
    cache: PathLike | None = None,
    progress: ProgressHook = identity,
    executor: Executor | None = None,
) -> Trajectory:
    """Return rank@τ, ‖ΔW‖/‖W‖ and captured energy per matrix, kind and layer at every checkpoint, by step.

    Args:
        base: the base checkpoint the run started from.
        checkpoints: the run's checkpoints (dense or PEFT adapters), or a Trainer output folder of `checkpoint-N`
            subfolders; at least two in all. Ordered by step when every step is known, else as given.
        settings: steps, labels, with_vectors (φ between consecutive checkpoints) and its k and side.
        options: the analysis settings, as for `analyze`.
        cache: a folder for cached analyses (created when missing); None: no cache.
        progress: wraps each stream of computed matrices (analyses of new checkpoints, then vectors).
        executor: where the vectors stream runs; default a LocalExecutor on options.device.

    Raises:
        OptionsError: fewer than two checkpoints, or steps/labels of another length than the checkpoints.
        CheckpointError, MismatchError: as for `analyze`, for whichever input is at fault.
    """
    settings, options = settings or TrajectorySettings(), options or Options()
    started = time.perf_counter()
    listed = checkpoint_list(checkpoints)
    if len(listed) < 2:
        raise OptionsError(f"a trajectory needs at least two checkpoints, got {len(listed)}")
    steps = _steps(listed, settings)
    labels = _labels(listed, steps, settings)
    known = [s for s in steps if s is not None]
    order = sorted(range(len(listed)), key=lambda i: known[i]) if len(known) == len(steps) else list(range(len(steps)))
    paths = [listed[i][0] for i in order]
    steps, labels = [steps[i] for i in order], [labels[i] for i in order]
    base_path = os.fspath(base)
    analyses, cached = _analyses(base_path, paths, options, None if cache is None else Path(cache), progress)
    device = resolve_device(options.device)
    similarity: tuple[StepSimilarity, ...] = ()
    if settings.with_vectors:
        executor = executor or LocalExecutor(Resources(str(device), options.threads, options.batch_bytes))
        similarity = _similarities(base_path, paths, settings, options, executor, progress)
    points = tuple(
        TrajectoryPoint(labels[i], steps[i], paths[i], a.summary, _matrices(a), cached[i])
        for i, a in enumerate(analyses)
    )
    notes = tuple(dict.fromkeys(note for a in analyses for note in a.notes))
    return Trajectory(
        base=base_path,
        options=options,
        settings=settings,
        points=points,
        similarity=similarity,
        skipped=analyses[-1].skipped,
        notes=notes,
        device=str(device),
        elapsed_s=time.perf_counter() - started,
        version=version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def _steps(listed: Sequence[tuple[str, int | None]], settings: TrajectorySettings) -> list[int | None]:
    if settings.steps is None:
        named = [step for _, step in listed]
        return named if None not in named else [None] * len(listed)
    if len(settings.steps) != len(listed):
        raise OptionsError(
            f"--steps has {len(settings.steps)} values for {len(listed)} checkpoints; give one per checkpoint"
        )
    return list(settings.steps)


def _labels(listed: Sequence[tuple[str, int | None]], steps: Sequence[int | None], s: TrajectorySettings) -> list[str]:
    if s.labels is not None:
        if len(s.labels) != len(listed):
            raise OptionsError(f"{len(s.labels)} labels for {len(listed)} checkpoints; give one per checkpoint")
        return list(s.labels)
    return list(
        unique_labels(
            [
                f"step {step}" if step is not None else default_label(p)
                for (p, _), step in zip(listed, steps, strict=True)
            ]
        )
    )


def _matrices(analysis: Analysis) -> tuple[PointMatrix, ...]:
    return tuple(
        PointMatrix(
            lm.name, lm.kind, lm.layer, lm.shape, lm.rank, lm.stable_rank, lm.frobenius_norm, lm.relative_change,
            lm.captured, lm.random_rank, lm.noisy,
        )
        for lm in analysis.layers
    )  # fmt: skip


# ---- the cache of analyses -------------------------------------------------------------------------------------

CACHED_OPTIONS: Final = ("threshold", "lora_ranks", "precision", "include", "exclude")  # what changes the numbers


def file_identity(checkpoint: Checkpoint) -> list[tuple[str, int, int]]:
    """(resolved path, size, mtime in ns) of every file a checkpoint's analysis reads (weights, adapter config)."""
    files = {entry.file for entry in checkpoint.entries.values()}
    if checkpoint.format == "peft-adapter":
        files.add(checkpoint.location / ADAPTER_CONFIG)
    found = []
    for f in sorted(files):
        st = os.stat(f)
        found.append((os.path.realpath(f), st.st_size, st.st_mtime_ns))
    return found


def cache_key(base: Checkpoint, tuned: Checkpoint, options: Options) -> str:
    """The name of a cached analysis: a hash of both inputs' file identities, the options that change the numbers,
    the record format and the spectra version (a new version recomputes)."""
    identity: dict[str, Any] = {
        "format": FORMAT,
        "version": version(),
        "base": file_identity(base),
        "tuned": file_identity(tuned),
        "options": {k: v for k, v in asdict(options).items() if k in CACHED_OPTIONS},
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return f"analysis-{digest[:32]}"


def _analyses(
    base: str, paths: Sequence[str], options: Options, cache: Path | None, progress: ProgressHook
) -> tuple[list[Analysis], list[bool]]:
    """The analysis of every checkpoint, from the cache where it holds one; the rest computed in one stream."""
    found: list[Analysis | None] = [None] * len(paths)
    keys: list[str | None] = [None] * len(paths)
    if cache is not None:
        with contextlib.ExitStack() as stack:
            base_ck = stack.enter_context(open_checkpoint(base, download=options.download))
            for i, path in enumerate(paths):
                keys[i] = key = cache_key(
                    base_ck, stack.enter_context(open_checkpoint(path, download=options.download)), options
                )
                found[i] = _cached(cache / f"{key}.json")
    missing = [i for i, a in enumerate(found) if a is None]
    if missing:
        fresh = analyze_many(base, [paths[i] for i in missing], options, progress=progress)
        for i, analysis in zip(missing, fresh, strict=True):
            found[i] = analysis
            if cache is not None:
                save_analysis(analysis, cache / f"{keys[i]}.json")
    log.info("trajectory: %d of %d checkpoints from the cache", len(paths) - len(missing), len(paths))
    analyses = [a for a in found if a is not None]
    return analyses, [i not in missing for i in range(len(paths))]


def _cached(path: Path) -> Analysis | None:
    if not path.is_file():
        return None
    try:
        return load_analysis(path)
    except SpectraError as exc:  # a damaged entry is recomputed and replaced
        log.info("cache entry not used: %s", exc)
        return None


# ---- subspace similarity of consecutive checkpoints -------------------------------------------------------------


def _similarities(
    base: str,
    paths: Sequence[str],
    settings: TrajectorySettings,
    options: Options,
    executor: Executor,
    progress: ProgressHook,
) -> tuple[StepSimilarity, ...]:
    """φ(k, k) between the top-k vectors of consecutive checkpoints' ΔW, per matrix and mean per kind."""
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(open_checkpoint(base, download=options.download))
        plans = [
            plan_against(base_ck, stack.enter_context(open_checkpoint(p, download=options.download)), options, i)
            for i, p in enumerate(paths)
        ]
    jobs = [job for plan in plans for job in plan.jobs]
    n_of = {base_key(j): 0 for j in jobs}
    for j in jobs:
        n_of[base_key(j)] += 1
    held: dict[str, dict[int, np.ndarray | None]] = {}
    phi: list[dict[str, tuple[float, float]]] = [{} for _ in range(len(paths) - 1)]  # name -> (φ, chance k'/d)
    dims: dict[str, int] = {}
    for job, result in run(jobs, TopK(settings.top_k), executor, progress):
        key = base_key(job)
        vectors = None if isinstance(result, Skipped) else _side(result, settings.side)
        dims[key] = job.shape[1] if settings.side == "right" else job.shape[0]
        held.setdefault(key, {})[job.source] = vectors
        if len(held[key]) == n_of[key]:
            for i, value, k in _consecutive(held.pop(key), len(paths)):
                phi[i][key] = value, min(k / dims[key], 1.0)
    kinds = module_kinds(list(dims))
    order = sorted(dims, key=lambda k: (reading_order(*kinds[k]), natural_key(k)))
    out = []
    for i, found in enumerate(phi):
        by_kind: dict[str, list[tuple[float, float]]] = {}
        for key in (k for k in order if k in found):
            by_kind.setdefault(kinds[key][0], []).append(found[key])
        out.append(
            StepSimilarity(
                a=i,
                b=i + 1,
                k=settings.top_k,
                matrices={key: found[key][0] for key in order if key in found},
                kinds={kind: float(np.mean([v for v, _ in values])) for kind, values in by_kind.items()},
                chance={kind: float(np.mean([c for _, c in values])) for kind, values in by_kind.items()},
            )
        )
    return tuple(out)


def _side(f: Factors, side: str) -> np.ndarray:
    return f.vt.T if side == "right" else f.u


def _consecutive(vectors: dict[int, np.ndarray | None], n: int) -> list[tuple[int, float, int]]:
    """(i, φ(k', k'), k') for consecutive checkpoints i, i + 1 that both hold the matrix; k' = min(k, their ranks)."""
    out = []
    for i in range(n - 1):
        va, vb = vectors.get(i), vectors.get(i + 1)
        if va is None or vb is None:
            continue
        k = min(va.shape[1], vb.shape[1])
        out.append((i, float(np.sum(np.square(va[:, :k].T @ vb[:, :k]))) / k, k))
    return out
