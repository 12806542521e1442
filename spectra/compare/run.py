"""compare_finetunes(): ΔW of fine-tunes A and B of one base → engine.run(TopK) → subspaces, intruders, amplification.

Three streams per chunk of matrices, all through the engine (no SVD is run here on a tensor read from disk):
1. the top-K singular triplets of ΔW_A and ΔW_B (TopK(K), K = max(top_k, amplification ranks)) → φ, angles;
2. the top-10 left singular vectors of W_A and W_B themselves (raw weights, plan_weights) → intruder candidates;
3. every singular triplet of W_base (TopK(min(m, n)), float64 SVD) → intruder cosines and ‖U_rᵀ W V_r‖_F.
Streams 2 and 3 run only with `intruders` on. A PEFT adapter input has no W_tuned on disk: W_base + ΔW is rebuilt
from stream 3's triplets and the adapter's (complete, low-rank) ΔW triplets of stream 1. Chunks bound the vectors
held at once (CHUNK_BYTES) whatever the model size; the same tensors are read again in the next stream of the chunk,
shortly after, so from the page cache when they fit in memory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Final

import numpy as np

from spectra.compare.intruders import intruder_counts, max_cosines, top_left_vectors
from spectra.compare.records import (
    CompareSettings,
    Comparison,
    Intruders,
    KindComparison,
    MatrixComparison,
    default_label,
    unique_labels,
)
from spectra.compare.subspace import amplification, principal_angles, projected_norm, subspace_similarity
from spectra.engine.executor import Executor, ProgressHook, identity, run
from spectra.engine.kernels import Kernel, TopK
from spectra.engine.local import LocalExecutor, resolve_device
from spectra.errors import CheckpointError, MismatchError, OptionsError
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.io.header import TensorEntry
from spectra.names import module_kinds, natural_key, reading_order
from spectra.pipeline import version
from spectra.plan.adapter import plan_adapter
from spectra.plan.dense import plan_pair, plan_weights
from spectra.plan.jobs import Dense, Job, Plan
from spectra.records import Factors, Options, Resources, Skipped

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]
CHUNK_BYTES: Final = 512 * 2**20  # singular vectors held at once across the matrices of one chunk
COMPLETE: Final = 1e-9  # ΔW's kept triplets are all of it when they hold ≥ (1 − COMPLETE)·‖ΔW‖_F²
UNIT_ROUNDOFF: Final = {"f64": 2.0**-53, "f32": 2.0**-24, "bf16": 2.0**-8, "f16": 2.0**-11}


@dataclass(slots=True)
class _Pair:
    """The matrices of A and B over one base weight, and what the streams have delivered so far (internal)."""

    key: str  # base key
    kind: str
    layer: int | None
    jobs: tuple[Job, Job]
    delta: list[Factors | None] = field(default_factory=lambda: [None, None])
    tuned_u: list[np.ndarray | None] = field(default_factory=lambda: [None, None])
    unchanged: list[bool] = field(default_factory=lambda: [False, False])
    note: str | None = None


@dataclass(slots=True)
class _KindSum:
    """Running sums of φ grids over the matrices of one kind (internal)."""

    size: int
    total: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.total, self.count = np.zeros((self.size, self.size)), np.zeros((self.size, self.size))

    def add(self, grid: np.ndarray) -> None:
        a, b = grid.shape
        self.total[:a, :b] += grid
        self.count[:a, :b] += 1

    def mean(self) -> np.ndarray:
        rows, cols = int(np.count_nonzero(self.count.any(axis=1))), int(np.count_nonzero(self.count.any(axis=0)))
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(self.count > 0, self.total / np.maximum(self.count, 1), np.nan)
        return mean[:rows, :cols]


def compare_finetunes(
    base: PathLike,
    a: PathLike,
    b: PathLike,
    settings: CompareSettings | None = None,
    options: Options | None = None,
    *,
    labels: Sequence[str] | None = None,
    progress: ProgressHook = identity,
    executor: Executor | None = None,
) -> Comparison:
    """Return how the updates ΔW_A = A − BASE and ΔW_B = B − BASE relate, per matrix and per module kind.

    Subspace similarity φ(i, j) of their leading singular vectors (Hu et al. 2021, Eq. 4) with the chance level,
    principal angles between the top-k subspaces, intruder dimensions of A and of B against BASE (Shuttleworth et
    al. 2024, PEFT's definition) and the amplification ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F (Hu et al. 2021 §7.3). Definitions
    in spectra.compare.subspace and spectra.compare.intruders.

    Args:
        base: the base checkpoint (file, folder, shards or cached hub id).
        a, b: the two fine-tunes: dense checkpoints of the same model, or PEFT LoRA adapter folders.
        settings: what to compute (top-k, side, intruders, ε, amplification ranks); default CompareSettings().
        options: shared settings (device, include/exclude, threads, batch bytes); threshold is not used.
        labels: names of A and B in tables and plots; default from the paths.
        progress: wraps the stream of computed matrices (it has a len()).
        executor: where kernels run; default a LocalExecutor on options.device.

    Raises:
        CheckpointError: a checkpoint is missing or unreadable, or BASE is an adapter.
        MismatchError: A or B does not pair with BASE, or A and B share no matrix (different architectures).
        OptionsError: bad labels, or device "cuda" without a GPU.
    """
    settings, options = settings or CompareSettings(), options or Options()
    started = time.perf_counter()
    paths = (os.fspath(a), os.fspath(b))
    names = unique_labels([default_label(p) for p in paths]) if labels is None else tuple(labels)
    if len(names) != 2:
        raise OptionsError(f"compare takes two labels (one for A, one for B), got {len(names)}")
    device = resolve_device(options.device)
    executor = executor or LocalExecutor(Resources(str(device), options.threads, options.batch_bytes))
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(open_checkpoint(os.fspath(base), download=options.download))
        if base_ck.format == "peft-adapter":
            raise CheckpointError(f"{base}: BASE is a PEFT adapter; pass the base model as BASE and adapters as A, B")
        tuned = [stack.enter_context(open_checkpoint(p, download=options.download)) for p in paths]
        plans = [plan_against(base_ck, ck, options, source) for source, ck in enumerate(tuned)]
        pairs, skipped = _pair_up(plans, names, paths)
        passes = list(_passes(pairs, base_ck, tuned, settings))
    total = sum(len(jobs) for jobs, _, _ in passes)
    matrices, kinds, notes = _collect(pairs, progress(_Stream(passes, executor, total)), settings, names)
    for pair in pairs.values():
        for source in (0, 1):
            if pair.unchanged[source]:
                skipped.append(Skipped(pair.key, "unchanged", f"ΔW is exactly zero in {names[source]}"))
    if not matrices:
        raise MismatchError(f"{paths[0]} and {paths[1]}: no matrix changed in both fine-tunes; nothing to compare")
    return Comparison(
        base=os.fspath(base),
        a=paths[0],
        b=paths[1],
        labels=(names[0], names[1]),
        options=options,
        settings=settings,
        matrices=matrices,
        kinds=kinds,
        skipped=tuple(sorted(skipped, key=lambda s: natural_key(s.name))),
        notes=notes,
        device=str(device),
        elapsed_s=time.perf_counter() - started,
        version=version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def plan_against(base: Checkpoint, tuned: Checkpoint, options: Options, source: int) -> Plan:
    """The jobs of one tuned input against the base: factored for a PEFT adapter, dense pairs otherwise.

    Raises:
        MismatchError: nothing pairs (another architecture, or filters that leave nothing).
    """
    plan = (
        plan_adapter(tuned, base, options, source=source)
        if tuned.format == "peft-adapter"
        else plan_pair(base, tuned, options, source=source)
    )
    if not plan.jobs:
        reasons = ", ".join(sorted({s.reason for s in plan.skipped})) or "nothing found"
        raise MismatchError(
            f"{tuned.path}: no matrix pairs with {base.path} (skipped: {reasons}); is it a fine-tune of this "
            "base model (same architecture)? check --include/--exclude"
        )
    return plan


def base_key(job: Job) -> str:
    """The base checkpoint's key of a job's matrix: what the same matrix of A and B have in common."""
    base = getattr(job.operand, "base", None)
    return base.name if isinstance(base, TensorEntry) else job.name


def _pair_up(
    plans: Sequence[Plan], labels: Sequence[str], paths: Sequence[str]
) -> tuple[dict[str, _Pair], list[Skipped]]:
    """Match A's and B's jobs by base key; everything that does not match both is skipped with the reason."""
    by_key = [{base_key(job): job for job in plan.jobs} for plan in plans]
    common = [k for k in by_key[0] if k in by_key[1]]
    skipped = list(dict.fromkeys(s for plan in plans for s in plan.skipped if s.reason != "only-in-base"))
    for source, other in ((0, 1), (1, 0)):
        for key in by_key[source].keys() - by_key[other].keys():
            skipped.append(Skipped(key, "only-in-tuned", f"analysed in {labels[source]} only"))
    if not common:
        raise MismatchError(
            f"{paths[0]} and {paths[1]} have no matrix in common; are they fine-tunes of the same base model "
            "(same architecture, same modules)?"
        )
    kinds = module_kinds(common)
    pairs: dict[str, _Pair] = {}
    for key in sorted(common, key=lambda k: (reading_order(*kinds[k]), natural_key(k))):
        job_a, job_b = by_key[0][key], by_key[1][key]
        if job_a.shape != job_b.shape:
            skipped.append(
                Skipped(key, "shape-mismatch", f"ΔW {job_a.shape} in {labels[0]}, {job_b.shape} in {labels[1]}")
            )
            continue
        pairs[key] = _Pair(key, *kinds[key], (job_a, job_b), note=job_a.note or job_b.note)
    if not pairs:
        raise MismatchError(f"{paths[0]} and {paths[1]}: every common matrix differs in shape; same architecture?")
    return pairs, skipped


def _same_shape_as_base(job: Job) -> bool:
    base = job.operand.base
    return base is not None and tuple(base.shape) == job.shape


def _passes(
    pairs: dict[str, _Pair], base: Checkpoint, tuned: Sequence[Checkpoint], settings: CompareSettings
) -> Iterator[tuple[list[Job], Kernel[Factors], str]]:
    """(jobs, kernel, tag) of every stream of every chunk, in the order they run."""
    delta_kernel = TopK(settings.n_vectors)
    for chunk in _chunks(list(pairs.values()), settings):
        yield [job for pair in chunk for job in pair.jobs], delta_kernel, "delta"
        if not settings.intruders:
            continue
        eligible = [pair for pair in chunk if all(_same_shape_as_base(job) for job in pair.jobs)]
        weights: list[Job] = []
        for source in (0, 1):
            dense = [p.jobs[source] for p in eligible if isinstance(p.jobs[source].operand, Dense)]
            names = [job.operand.tuned.name for job in dense if isinstance(job.operand, Dense)]
            weights += plan_weights(tuned[source], names, source=source).jobs
        if weights:
            yield weights, TopK(settings.intruder_k), "tuned"
        if eligible:
            bases = plan_weights(base, [p.key for p in eligible]).jobs
            yield list(bases), TopK(max(min(job.shape) for job in bases), "svd"), "base"


def _chunks(pairs: list[_Pair], settings: CompareSettings) -> Iterator[list[_Pair]]:
    """Consecutive pairs whose held vectors (ΔW_A, ΔW_B and the W_tuned candidates) fit in CHUNK_BYTES."""
    chunk: list[_Pair] = []
    held = 0
    for pair in pairs:
        m, n = pair.jobs[0].shape
        size = 2 * 8 * (min(settings.n_vectors, m, n) * (m + n) + settings.intruder_k * m)
        if chunk and held + size > CHUNK_BYTES:
            yield chunk
            chunk, held = [], 0
        chunk.append(pair)
        held += size
    if chunk:
        yield chunk


class _Stream:
    """Every result of every stream, tagged, in order; it has a len() for progress bars."""

    def __init__(self, passes: list[tuple[list[Job], Kernel[Factors], str]], executor: Executor, n: int) -> None:
        self.passes, self.executor, self.n = passes, executor, n

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[tuple[str, Job, Factors | Skipped]]:
        for jobs, kernel, tag in self.passes:
            for job, result in run(jobs, kernel, self.executor):
                yield tag, job, result


def _collect(
    pairs: dict[str, _Pair],
    stream: Iterable[tuple[str, Job, Factors | Skipped]],
    settings: CompareSettings,
    labels: Sequence[str],
) -> tuple[tuple[MatrixComparison, ...], tuple[KindComparison, ...], tuple[str, ...]]:
    """Consume the tagged results: a MatrixComparison per pair once all its streams are in, then the kind sums."""
    tuned_key = [
        {job.operand.tuned.name: key for key, p in pairs.items() if isinstance((job := p.jobs[s]).operand, Dense)}
        for s in (0, 1)
    ]
    done: dict[str, MatrixComparison] = {}
    sums: dict[str, _KindSum] = {}

    def finish(pair: _Pair, w: Factors | None) -> None:
        made = _finish(pair, w, settings)
        if made is not None:
            done[pair.key] = made[0]
            sums.setdefault(pair.kind, _KindSum(max(settings.top_k))).add(made[1])

    for tag, job, result in stream:
        if tag == "delta":
            pair = pairs[base_key(job)]
            if isinstance(result, Skipped):
                pair.unchanged[job.source] = True
            else:
                pair.delta[job.source] = above_rounding(result)
            if not settings.intruders and _both_in(pair):
                finish(pair, None)
        elif tag == "tuned":
            pair = pairs[tuned_key[job.source][job.name]]
            pair.tuned_u[job.source] = None if isinstance(result, Skipped) else result.u
        else:
            finish(pairs[job.name], None if isinstance(result, Skipped) else result)
    for pair in pairs.values():  # intruders on, but W_base was not examined (its shape differs from ΔW's)
        if pair.key not in done:
            finish(pair, None)
    matrices = tuple(done[k] for k in pairs if k in done)
    return matrices, _kinds(matrices, sums, settings), _notes(matrices, settings, labels)


def rounding_floor(f: Factors) -> float:
    """The σ at or below which a direction of a stored dense ΔW may be storage rounding alone (0 for factors).

    bf16/f16 files: the top edge √(E_N/(m·n))·(√m + √n) of a random matrix holding the estimated rounding energy
    E_N (Marchenko–Pastur). f32/f64 files: Weyl's bound ‖N‖₂ ≤ ‖N‖_F ≤ 2u(‖W_base‖_F + ‖ΔW‖_F), u the unit roundoff.
    """
    if f.method.startswith("factored"):
        return 0.0
    m, n = f.shape
    if f.noise_energy > 0.0:
        return math.sqrt(f.noise_energy / (m * n)) * (math.sqrt(m) + math.sqrt(n))
    return 2.0 * UNIT_ROUNDOFF.get(f.dtype, 2.0**-24) * ((f.base_norm or 0.0) + math.sqrt(f.energy))


def above_rounding(f: Factors) -> Factors:
    """The triplets of `f` whose σ is above `rounding_floor(f)` (the others may be storage rounding, and a merged
    LoRA's ΔW has nothing else beyond its rank); at least one is kept."""
    keep = max(int(np.count_nonzero(f.s > rounding_floor(f))), 1)
    if keep == len(f.s):
        return f
    return replace(f, u=f.u[:, :keep], s=f.s[:keep], vt=f.vt[:keep])


def _both_in(pair: _Pair) -> bool:
    return all(pair.delta[s] is not None or pair.unchanged[s] for s in (0, 1))


def _vectors(f: Factors, side: str, k: int) -> np.ndarray:
    return f.vt[:k].T if side == "right" else f.u[:, :k]


def _finish(pair: _Pair, w: Factors | None, settings: CompareSettings) -> tuple[MatrixComparison, np.ndarray] | None:
    """The pair's MatrixComparison and φ grid from its ΔW triplets (and W_base's, when examined), or None when a
    ΔW is exactly zero (reported as skipped); the pair's vectors are dropped."""
    fa, fb = pair.delta
    pair.delta, tuned_u, pair.tuned_u = [None, None], pair.tuned_u, [None, None]
    if fa is None or fb is None:
        return None
    k = max(settings.top_k)
    va, vb = _vectors(fa, settings.side, k), _vectors(fb, settings.side, k)
    grid = subspace_similarity(va, vb)
    m, n = fa.shape
    note = pair.note
    if settings.intruders and w is None and note is None:
        note = "intruders and amplification not computed: W_base has another shape than ΔW"
    made = MatrixComparison(
        name=pair.key,
        kind=pair.kind,
        layer=pair.layer,
        shape=fa.shape,
        dim=n if settings.side == "right" else m,
        n_a=len(fa.s),
        n_b=len(fb.s),
        energy_a=fa.energy,
        energy_b=fb.energy,
        captured_a=_captured(fa),
        captured_b=_captured(fb),
        diagonal=np.diagonal(grid).copy(),
        angles={t: principal_angles(va[:, :t], vb[:, :t]) for t in settings.top_k},
        intruders_a=None if w is None else _intruders(fa, tuned_u[0], pair.jobs[0], w, settings),
        intruders_b=None if w is None else _intruders(fb, tuned_u[1], pair.jobs[1], w, settings),
        amplification_a={r: None if w is None else _amplification(fa, w, r) for r in settings.amplification_ranks},
        amplification_b={r: None if w is None else _amplification(fb, w, r) for r in settings.amplification_ranks},
        note=note,
    )
    return made, grid


def _captured(f: Factors) -> float:
    return min(float(np.sum(np.square(f.s))) / f.energy, 1.0) if f.energy > 0.0 else 0.0


def _intruders(
    delta: Factors, tuned_u: np.ndarray | None, job: Job, w: Factors, settings: CompareSettings
) -> Intruders | None:
    """Intruders of W_tuned: from its own top vectors (dense input) or from W_base + ΔW rebuilt (an adapter)."""
    if tuned_u is None:
        if isinstance(job.operand, Dense) or _captured(delta) < 1.0 - COMPLETE:
            return None  # a zero tuned weight, or an adapter ΔW not held completely in its top triplets
        rebuilt = (w.u * w.s) @ w.vt + (delta.u * delta.s) @ delta.vt
        tuned_u = top_left_vectors(rebuilt, settings.intruder_k)
    cos = max_cosines(tuned_u, w.u)
    return Intruders(cos, intruder_counts(cos, settings.epsilons))


def _amplification(delta: Factors, w: Factors, r: int) -> float | None:
    if r > len(delta.s):
        return None
    projected = projected_norm(delta.u[:, :r], delta.vt[:r], w.u, w.s, w.vt)
    return amplification(math.sqrt(delta.energy), projected)


def _kinds(
    matrices: Sequence[MatrixComparison], sums: dict[str, _KindSum], settings: CompareSettings
) -> tuple[KindComparison, ...]:
    groups: dict[str, list[MatrixComparison]] = {}
    for mc in matrices:
        groups.setdefault(mc.kind, []).append(mc)
    kinds = []
    for kind, group in groups.items():
        grid = sums[kind].mean()
        kinds.append(
            KindComparison(
                kind=kind,
                n=len(group),
                dim=Counter(mc.dim for mc in group).most_common(1)[0][0],
                grid=grid,
                diagonal=np.diagonal(grid).copy(),
                intruders_a=_summed([mc.intruders_a for mc in group], settings),
                intruders_b=_summed([mc.intruders_b for mc in group], settings),
                amplification_a=_median([mc.amplification_a for mc in group], settings),
                amplification_b=_median([mc.amplification_b for mc in group], settings),
            )
        )
    return tuple(kinds)


def _summed(found: Sequence[Intruders | None], settings: CompareSettings) -> dict[float, int]:
    known = [i for i in found if i is not None]
    return {eps: sum(i.counts[eps] for i in known) for eps in settings.epsilons} if known else {}


def _median(found: Sequence[dict[int, float | None]], settings: CompareSettings) -> dict[int, float | None]:
    out: dict[int, float | None] = {}
    for r in settings.amplification_ranks:
        values = [x for d in found if (x := d.get(r)) is not None]
        out[r] = float(np.median(values)) if values else None
    return out


def _notes(matrices: Sequence[MatrixComparison], settings: CompareSettings, labels: Sequence[str]) -> tuple[str, ...]:
    side = "right (input-space, as Hu et al.)" if settings.side == "right" else "left (output-space)"
    notes = [f"φ and principal angles use the {side} singular vectors of ΔW"]
    k = max(settings.top_k)
    for label, n in ((labels[0], [mc.n_a for mc in matrices]), (labels[1], [mc.n_b for mc in matrices])):
        if max(n) < k:
            notes.append(
                f"ΔW of {label} has at most {max(n)} directions above zero and the storage-rounding floor (< {k}): "
                "its φ grid and principal angles stop there"
            )
    if not settings.intruders:
        notes.append("intruder dimensions and amplification were not computed (intruders off)")
    elif any(mc.intruders_a is None or mc.intruders_b is None for mc in matrices):
        n_missing = sum(mc.intruders_a is None or mc.intruders_b is None for mc in matrices)
        notes.append(f"intruders not computed for {n_missing} matrices (see their notes)")
    return tuple(notes)
