"""Saved records of several fine-tunes at once: Comparison (`compare`), Trajectory (`trajectory`), SideBySide
(`rank BASE T1 T2 …`), with their settings. Torch-free; JSON through spectra.io.store (`load_record` reads them all).

Formats: "spectra.comparison/1", "spectra.trajectory/1", "spectra.analyses/1" (README, "Saved records").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any, Final

import numpy as np

from spectra.errors import OptionsError, SpectraError
from spectra.io.files import write_atomic
from spectra.io.store import (
    analysis_from_dict,
    analysis_to_dict,
    record_from_dict,
    record_to_dict,
    register_format,
)
from spectra.records import Analysis, GroupSummary, Options, Skipped, Summary

COMPARISON_FORMAT: Final = "spectra.comparison/1"
TRAJECTORY_FORMAT: Final = "spectra.trajectory/1"
SIDE_BY_SIDE_FORMAT: Final = "spectra.analyses/1"
SIDES: Final = ("right", "left")
EPSILONS: Final = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _positive_ints(name: str, values: tuple[int, ...]) -> tuple[int, ...]:
    if not values or any(isinstance(v, bool) or int(v) != v or v < 1 for v in values):
        raise OptionsError(f"{name} must be positive integers, got {values!r}")
    return tuple(sorted({int(v) for v in values}))


@dataclass(frozen=True, slots=True)
class CompareSettings:
    """What `compare` computes beyond the shared Options. Validated on construction.

    Attributes:
        top_k: subspace sizes k for principal angles and φ(k, k); the φ grid runs up to max(top_k).
        side: "right" (default, as Hu et al.: input space, the row space of LoRA's A) or "left" singular vectors.
        intruders: also count intruder dimensions and amplification (a full SVD of every base weight).
        intruder_k: leading singular vectors of W_tuned examined for intruders (10, as the paper and PEFT).
        epsilon: the headline intruder threshold on max |cos| (0.5, as PEFT); `epsilons` is the reported sweep.
        amplification_ranks: r at which ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F is reported.
    """

    top_k: tuple[int, ...] = (16, 64)
    side: str = "right"
    intruders: bool = True
    intruder_k: int = 10
    epsilon: float = 0.5
    epsilons: tuple[float, ...] = EPSILONS
    amplification_ranks: tuple[int, ...] = (4, 16, 64)

    def __post_init__(self) -> None:
        object.__setattr__(self, "top_k", _positive_ints("top_k", tuple(self.top_k)))
        ranks = _positive_ints("amplification_ranks", tuple(self.amplification_ranks))
        object.__setattr__(self, "amplification_ranks", ranks)
        if self.side not in SIDES:
            raise OptionsError(f"side must be one of {', '.join(SIDES)}, got {self.side!r}")
        _positive_ints("intruder_k", (self.intruder_k,))
        epsilons = tuple(sorted({float(e) for e in (*self.epsilons, self.epsilon)}))
        if any(not (0.0 < e <= 1.0) for e in epsilons):  # also rejects NaN
            raise OptionsError(f"epsilon values must be in (0, 1], got {epsilons!r}")
        object.__setattr__(self, "epsilons", epsilons)

    @property
    def n_vectors(self) -> int:
        """Leading singular vectors of each ΔW the comparison needs."""
        return max(*self.top_k, *self.amplification_ranks)


@dataclass(frozen=True, slots=True)
class Intruders:
    """Intruder dimensions of one W_tuned against its W_base (spectra.compare.intruders)."""

    max_cos: np.ndarray = field(compare=False)  # (k,) per leading left vector of W_tuned, max |cos| with W_base's
    counts: dict[float, int]  # ε -> number of the k vectors with max |cos| < ε


@dataclass(frozen=True, slots=True)
class MatrixComparison:
    """Everything `compare` reports about one matrix of A and B (definitions: spectra.compare.subspace)."""

    name: str  # the base checkpoint's key, verbatim
    kind: str
    layer: int | None
    shape: tuple[int, int]  # of ΔW
    dim: int  # dimension d of the compared vectors: columns of ΔW (right side) or rows (left)
    n_a: int  # singular vectors of ΔW_A kept: min(k, numerical rank)
    n_b: int
    energy_a: float  # ‖ΔW_A‖_F²
    energy_b: float
    captured_a: float  # share of ‖ΔW_A‖_F² in its n_a kept directions
    captured_b: float
    diagonal: np.ndarray = field(compare=False)  # φ(i, i), i = 1..min(n_a, n_b)
    angles: dict[int, np.ndarray] = field(compare=False)  # k -> principal angles in degrees, ascending
    intruders_a: Intruders | None  # None: not computed (see note)
    intruders_b: Intruders | None
    amplification_a: dict[int, float | None]  # r -> ‖ΔW‖_F/‖U_rᵀ W V_r‖_F; None: fewer than r directions
    amplification_b: dict[int, float | None]
    note: str | None = None

    def chance(self, k: int) -> float:
        """The chance level of φ(k, k), k/d."""
        return min(k / self.dim, 1.0)


@dataclass(frozen=True, slots=True)
class KindComparison:
    """`compare` summed up over the matrices of one module kind."""

    kind: str
    n: int  # matrices of this kind
    dim: int  # d of the compared vectors (the most common over the kind's matrices)
    grid: np.ndarray = field(compare=False)  # (a, b) mean φ(i, j) over the matrices; NaN where none has i and j
    diagonal: np.ndarray = field(compare=False)  # mean φ(i, i)
    intruders_a: dict[float, int]  # ε -> intruders summed over the matrices (empty: not computed)
    intruders_b: dict[float, int]
    amplification_a: dict[int, float | None]  # r -> median amplification over the matrices
    amplification_b: dict[int, float | None]


@dataclass(frozen=True, slots=True)
class Comparison:
    """The result of `compare_finetunes(base, a, b)`: how the updates of two fine-tunes relate, per matrix and kind."""

    base: str
    a: str
    b: str
    labels: tuple[str, str]
    options: Options
    settings: CompareSettings
    matrices: tuple[MatrixComparison, ...]
    kinds: tuple[KindComparison, ...]
    skipped: tuple[Skipped, ...]
    notes: tuple[str, ...]
    device: str
    elapsed_s: float
    version: str
    created: str


@dataclass(frozen=True, slots=True)
class SideBySide:
    """`rank BASE T1 T2 …`: one Analysis per tuned input against the same base, with its label."""

    labels: tuple[str, ...]
    analyses: tuple[Analysis, ...]


@dataclass(frozen=True, slots=True)
class TrajectorySettings:
    """What `trajectory` computes beyond the shared Options. Validated on construction.

    Attributes:
        steps: training step of each checkpoint, in the order given; None: from `checkpoint-N` names, or unknown.
        labels: a label per checkpoint; None: derived from the paths.
        with_vectors: also compute φ(k, k) between consecutive checkpoints' top-k singular vectors.
        top_k: k of that similarity.
        side: "right" or "left" singular vectors for it.
    """

    steps: tuple[int, ...] | None = None
    labels: tuple[str, ...] | None = None
    with_vectors: bool = False
    top_k: int = 16
    side: str = "right"

    def __post_init__(self) -> None:
        if self.steps is not None:
            if any(isinstance(s, bool) or int(s) != s or s < 0 for s in self.steps):
                raise OptionsError(f"steps must be non-negative integers, got {self.steps!r}")
            object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        if self.labels is not None:
            object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        _positive_ints("top_k", (self.top_k,))
        if self.side not in SIDES:
            raise OptionsError(f"side must be one of {', '.join(SIDES)}, got {self.side!r}")


@dataclass(frozen=True, slots=True)
class PointMatrix:
    """One matrix at one checkpoint: the LayerMetrics a trajectory keeps (no spectrum)."""

    name: str
    kind: str
    layer: int | None
    shape: tuple[int, int]
    rank: int  # energy rank at the threshold
    stable_rank: float
    frobenius_norm: float  # ‖ΔW‖_F
    relative_change: float | None  # ‖ΔW‖_F / ‖W_base‖_F
    captured: dict[int, float]  # LoRA rank r -> E(r)
    random_rank: int
    noisy: bool


@dataclass(frozen=True, slots=True)
class TrajectoryPoint:
    """One checkpoint of a trajectory."""

    label: str
    step: int | None
    path: str  # as given
    summary: Summary  # per kind, per block and overall (spectra.analysis.metrics.summarize)
    matrices: tuple[PointMatrix, ...]
    cached: bool  # its analysis came from the cache


@dataclass(frozen=True, slots=True)
class StepSimilarity:
    """φ(k, k) between the top-k singular vectors of ΔW at two consecutive checkpoints."""

    a: int  # index of the earlier point
    b: int  # index of the later point
    k: int
    matrices: dict[str, float]  # matrix name -> φ(k', k'), k' = min(k, both numerical ranks)
    kinds: dict[str, float]  # module kind -> mean over its matrices
    chance: dict[str, float]  # module kind -> chance level k/d


@dataclass(frozen=True, slots=True)
class Trajectory:
    """The result of `analyze_trajectory(base, checkpoints)`: rank and change per kind and layer vs step."""

    base: str
    options: Options
    settings: TrajectorySettings
    points: tuple[TrajectoryPoint, ...]
    similarity: tuple[StepSimilarity, ...]  # empty unless settings.with_vectors
    skipped: tuple[Skipped, ...]  # of the last checkpoint
    notes: tuple[str, ...]
    device: str
    elapsed_s: float
    version: str
    created: str

    def kinds(self) -> list[str]:
        """Module kinds in order of first appearance."""
        return list(dict.fromkeys(g.key for p in self.points for g in p.summary.kinds))

    def kind_series(self, kind: str) -> list[GroupSummary | None]:
        """The kind's summary at each point (None where a checkpoint has no matrix of that kind)."""
        return [next((g for g in p.summary.kinds if g.key == kind), None) for p in self.points]


def default_label(path: str | PurePath) -> str:
    """A short label for an input: its folder's name for `…/NAME/model.safetensors`, else the last path part."""
    p = PurePath(path)
    if p.suffix == ".safetensors" and p.stem in ("model", "adapter_model") and p.parent.name:
        return p.parent.name
    return p.stem if p.suffix == ".safetensors" else (p.name or str(path))


def unique_labels(labels: list[str]) -> tuple[str, ...]:
    """The labels with repeats numbered (`a`, `a (2)`), so that legends and tables tell inputs apart."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return tuple(out)


def comparison_to_dict(comparison: Comparison) -> dict[str, Any]:
    """The JSON-ready dict of a Comparison (format "spectra.comparison/1")."""
    return record_to_dict(comparison, COMPARISON_FORMAT)


def comparison_from_dict(data: dict[str, Any]) -> Comparison:
    """Rebuild a Comparison from `comparison_to_dict` output.

    Raises:
        SpectraError: not a spectra.comparison/1 record.
    """
    return record_from_dict(Comparison, data, COMPARISON_FORMAT)


def trajectory_to_dict(trajectory: Trajectory) -> dict[str, Any]:
    """The JSON-ready dict of a Trajectory (format "spectra.trajectory/1")."""
    return record_to_dict(trajectory, TRAJECTORY_FORMAT)


def trajectory_from_dict(data: dict[str, Any]) -> Trajectory:
    """Rebuild a Trajectory from `trajectory_to_dict` output.

    Raises:
        SpectraError: not a spectra.trajectory/1 record.
    """
    return record_from_dict(Trajectory, data, TRAJECTORY_FORMAT)


def side_by_side_to_dict(record: SideBySide) -> dict[str, Any]:
    """{"format": "spectra.analyses/1", "labels": [...], "analyses": [a spectra.analysis/1 dict per input]}."""
    return {
        "format": SIDE_BY_SIDE_FORMAT,
        "labels": list(record.labels),
        "analyses": [analysis_to_dict(a) for a in record.analyses],
    }


def side_by_side_from_dict(data: dict[str, Any]) -> SideBySide:
    """Rebuild a SideBySide from `side_by_side_to_dict` output.

    Raises:
        SpectraError: not a spectra.analyses/1 record, or labels and analyses differ in number.
    """
    if not isinstance(data, dict) or data.get("format") != SIDE_BY_SIDE_FORMAT:
        raise SpectraError(f"not a {SIDE_BY_SIDE_FORMAT} record")
    labels, analyses = tuple(str(x) for x in data["labels"]), tuple(analysis_from_dict(a) for a in data["analyses"])
    if len(labels) != len(analyses):
        raise SpectraError(f"{len(labels)} labels for {len(analyses)} analyses")
    return SideBySide(labels, analyses)


Record = Analysis | Comparison | Trajectory | SideBySide


def record_to_json(record: Record) -> str:
    """The JSON text of any saved record (Analysis, Comparison, Trajectory, SideBySide), as `save_record` writes it."""
    if isinstance(record, Analysis):
        data = analysis_to_dict(record)
    elif isinstance(record, SideBySide):
        data = side_by_side_to_dict(record)
    else:
        data = record_to_dict(record, COMPARISON_FORMAT if isinstance(record, Comparison) else TRAJECTORY_FORMAT)
    return json.dumps(data, indent=1, allow_nan=False)


def save_record(record: Record, path: str | Path) -> Path:
    """Write any saved record (Analysis, Comparison, Trajectory, SideBySide) as JSON to `path` atomically.

    `spectra.load_record(path)` reads it back; `spectra report FILE` renders it.

    Raises:
        SpectraError: the file cannot be written.
    """
    return write_atomic(Path(path), record_to_json(record))


register_format(COMPARISON_FORMAT, comparison_from_dict)
register_format(TRAJECTORY_FORMAT, trajectory_from_dict)
register_format(SIDE_BY_SIDE_FORMAT, side_by_side_from_dict)
