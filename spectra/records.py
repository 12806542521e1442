"""Frozen records that cross stage boundaries: Options in, Analysis out, and everything in between.

Records after the spectrum stage hold CPU float64 numpy only, so metrics, recommend and report run without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra.errors import OptionsError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fast", "exact")
DEFAULT_LORA_RANKS = (8, 16, 64, 256)


@dataclass(frozen=True, slots=True)
class Options:
    """Every setting of an analysis; CLI flags map 1:1 onto these fields. Validated on construction.

    Attributes:
        threshold: share of ‖ΔW‖_F² the reported rank must explain, in (0, 1].
        lora_ranks: LoRA ranks at which captured energy E(r) is reported, each ≥ 1.
        device: "auto" (CUDA when available), "cpu" or "cuda".
        precision: "fast" (Gram + eigvalsh) or "exact" (float64 SVD).
        include, exclude: regular expressions searched in tensor names (re.search).
        batch_bytes: memory budget for one batch of stacked ΔW; None derives it from the device.
        threads: cap on intra-op CPU threads; None leaves torch's default.
        download: allow huggingface_hub to download a hub id missing from the local cache.
    """

    threshold: float = 0.9
    lora_ranks: tuple[int, ...] = DEFAULT_LORA_RANKS
    device: str = "auto"
    precision: str = "fast"
    include: str | None = None
    exclude: str | None = None
    batch_bytes: int | None = None
    threads: int | None = None
    download: bool = False

    def __post_init__(self) -> None:
        if not (0.0 < self.threshold <= 1.0):  # also rejects NaN
            raise OptionsError(f"threshold must be in (0, 1], got {self.threshold} (0.9 means 90% of the energy)")
        if not self.lora_ranks or any(int(r) != r or r < 1 for r in self.lora_ranks):
            raise OptionsError(f"lora_ranks must be positive integers, got {self.lora_ranks!r}")
        object.__setattr__(self, "lora_ranks", tuple(sorted({int(r) for r in self.lora_ranks})))
        if self.device not in DEVICES:
            raise OptionsError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.precision not in PRECISIONS:
            raise OptionsError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for flag, pattern in (("include", self.include), ("exclude", self.exclude)):
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise OptionsError(f"{flag} {pattern!r} is not a valid regular expression: {exc}") from None
        if self.batch_bytes is not None and self.batch_bytes < 1:
            raise OptionsError(f"batch_bytes must be positive, got {self.batch_bytes}")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads must be at least 1, got {self.threads}")


@dataclass(frozen=True, slots=True)
class Resources:
    """What an executor may use in this process: never analysis settings. The pipeline builds it from Options.

    Attributes:
        device: a resolved torch device name: "cpu", "cuda", "cuda:1" (never "auto").
        threads: cap on intra-op CPU threads (also the number of CPU workers); None leaves torch's default.
        batch_bytes: bytes of matrices (and their results) in flight; None derives it from the device.
    """

    device: str = "cpu"
    threads: int | None = None
    batch_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.device == "auto" or not self.device:
            raise OptionsError(f"Resources.device must be resolved ('cpu', 'cuda', ...), got {self.device!r}")
        if self.batch_bytes is not None and self.batch_bytes < 1:
            raise OptionsError(f"batch_bytes must be positive, got {self.batch_bytes}")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads must be at least 1, got {self.threads}")


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What an input checkpoint is, without its tensors."""

    path: str  # as the user gave it
    format: str  # "safetensors", "folder", "sharded", "peft-adapter"
    n_tensors: int
    n_bytes: int  # bytes of tensor data on disk
    dtypes: tuple[str, ...]  # storage dtypes seen, e.g. ("bf16",)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A tensor that was not analysed, and why."""

    name: str  # checkpoint key, verbatim (tuned side when it exists)
    reason: str  # a key of spectra.names.SKIP_REASONS
    detail: str = ""  # human detail, e.g. "base (32000, 64) vs tuned (32008, 64)"


@dataclass(frozen=True, slots=True)
class Delta:
    """A materialised job (spectra.plan.delta): ΔW = W_tuned − W_base for one matched 2-D weight, dense or factored
    (adapters), or a raw weight W. Lives in the torch stages, inside an executor.

    Exactly one of `values` and `factors` is set. `factors` = (B, A) with ΔW = B @ A, the scale already folded in.
    """

    name: str  # the job's name: tuned checkpoint key, verbatim
    shape: tuple[int, int]  # (out_features, in_features)
    values: torch.Tensor | None  # float32 or float64 (out, in), formed after upcasting both sides
    factors: tuple[torch.Tensor, torch.Tensor] | None
    base_norm: float | None  # ‖W_base‖_F, None when no base was given
    dtype: str  # storage dtype of the tuned tensor, e.g. "bf16"
    noise_energy: float  # expected ‖rounding noise‖_F² that storing W_tuned in `dtype` adds to ΔW


@dataclass(frozen=True, slots=True)
class Spectrum:
    """Singular values of one ΔW. Values beyond len(s) (up to min(shape)) are exactly zero (factored deltas)."""

    name: str
    shape: tuple[int, int]
    s: np.ndarray = field(compare=False)  # float64, descending
    energy: float  # ‖ΔW‖_F², computed directly from ΔW, not from s
    base_norm: float | None
    dtype: str
    noise_energy: float
    method: str  # how s was computed: "svd-f64", "gram-f32", "gram-f64", "factored-f64"


@dataclass(frozen=True, slots=True)
class Factors:
    """The leading singular triplets of one ΔW (the TopK kernel): ΔW ≈ u @ diag(s) @ vt, best rank len(s).

    CPU numpy float64. Only numerically non-zero directions are kept: len(s) = min(k, min(shape), numerical rank),
    where σ ≤ max(shape)·ε₆₄·σ₁ counts as zero (numpy's matrix_rank rule), so a request beyond the rank is trimmed.
    """

    name: str
    shape: tuple[int, int]  # (m, n)
    u: np.ndarray = field(compare=False)  # (m, r) orthonormal columns: left singular vectors
    s: np.ndarray = field(compare=False)  # (r,) descending, > 0
    vt: np.ndarray = field(compare=False)  # (r, n) orthonormal rows: right singular vectors
    energy: float  # ‖ΔW‖_F², computed directly from ΔW (or the factors' core), not from s
    base_norm: float | None
    dtype: str
    noise_energy: float
    method: str  # "gram-f64" (Gram eigenvectors + Rayleigh–Ritz), "svd-f64", "factored-f64"


@dataclass(frozen=True, slots=True)
class LayerMetrics:
    """Every per-matrix measure (definitions in the README, "What every number means")."""

    name: str  # checkpoint key, verbatim
    shape: tuple[int, int]
    kind: str  # module kind derived from the key, e.g. "q_proj"
    layer: int | None  # block index derived from the key, None for e.g. lm_head
    rank: int  # energy rank at the analysis threshold
    stable_rank: float  # ‖ΔW‖_F² / σ₁²
    effective_rank: float  # exp(entropy of σ/Σσ)
    spectral_norm: float  # σ₁
    frobenius_norm: float  # ‖ΔW‖_F
    relative_change: float | None  # ‖ΔW‖_F / ‖W_base‖_F, None without a base
    captured: dict[int, float]  # LoRA rank r -> E(r) = Σ_{i≤r} σᵢ² / ‖ΔW‖_F²
    lora_params: dict[int, int]  # LoRA rank r -> r·(m+n)
    random_rank: int  # energy rank of a Gaussian matrix of this shape (Marchenko–Pastur)
    noise_fraction: float  # estimated storage-rounding energy / ‖ΔW‖_F²
    noisy: bool  # rounding noise alone could move the rank: noise_fraction ≥ 1 − threshold
    gd_rank: int  # Gavish–Donoho count of σ above the noise level
    dtype: str  # storage dtype of the tuned tensor
    method: str  # spectrum method, see Spectrum.method
    s: np.ndarray = field(compare=False, metadata={"json": "singular_values"})
    # Rank rules that separate signal from the noise bulk (spectra.analysis.baselines; defaults: older analyses)
    mp_rank: int = 0  # σ above the Marchenko–Pastur edge fitted to the median σ²
    mp_edge: float = 0.0  # that edge, in σ units: √(median σ²/μ_β)·(1 + √β)
    stable_rank_ceil: int = 0  # ⌈stable rank⌉
    rank_captured: float = 0.0  # E(rank): what the energy rank keeps (≥ threshold; it reconstructs ΔW)
    gd_captured: float = 0.0  # E(gd_rank)
    mp_captured: float = 0.0  # E(mp_rank)
    stable_captured: float = 0.0  # E(stable_rank_ceil)


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """Summary over the matrices of one module kind, or of one layer index."""

    key: str  # the module kind ("q_proj") or the layer index ("3"); "all" for the whole model
    n: int
    median_rank: float
    max_rank: int
    median_rank_ratio: float  # median of rank / random_rank
    captured: dict[int, float]  # energy-weighted: Σ_m Σ_{i≤r} σ² / Σ_m ‖ΔW_m‖_F²
    energy: float  # Σ_m ‖ΔW_m‖_F²
    n_noisy: int


@dataclass(frozen=True, slots=True)
class Summary:
    overall: GroupSummary
    kinds: tuple[GroupSummary, ...]
    layers: tuple[GroupSummary, ...]


@dataclass(frozen=True, slots=True)
class RankOption:
    """One row of the uniform-rank trade-off table."""

    r: int
    captured: float  # energy-weighted E(r) over the targeted matrices
    params: int  # LoRA parameters at this uniform rank
    params_fraction: float  # params / parameters of the targeted matrices (a full fine-tune of them)


@dataclass(frozen=True, slots=True)
class Recommendation:
    """A LoRA setup derived from the spectra, and the trade-off behind it."""

    target: float  # energy share the uniform rank must reach
    max_rank: int
    uniform_rank: int
    uniform_captured: float
    cap_binds: bool  # max_rank was reached before target: LoRA at the cap captures less than target
    tradeoff: tuple[RankOption, ...]
    budget: int  # parameter budget of the per-module allocation
    allocation: dict[str, int]  # matrix name -> rank
    allocation_captured: float
    allocation_params: int
    target_modules: tuple[str, ...]
    config: dict[str, Any]  # adapter_config.json content, loadable by peft.LoraConfig
    reason: str  # one or two sentences, shown verbatim
    advice: tuple[str, ...]  # practice not derived from the spectrum (LoRA+, learning rates), labelled as such
    caveat: str  # what captured energy does and does not promise (README, "The recommendation"), shown with it
    rule: str = "energy"  # the rank rule behind it (spectra.analysis.baselines.RULES)
    not_low_rank: tuple[str, ...] = ()  # matrices whose asked-for rank reaches m·n/(m+n): fine-tune them fully


@dataclass(frozen=True, slots=True)
class Analysis:
    """The result of `analyze`: inputs, options, one LayerMetrics per analysed matrix, summaries, advice."""

    base: str | None  # paths as given
    tuned: str
    options: Options
    layers: tuple[LayerMetrics, ...]
    skipped: tuple[Skipped, ...]
    summary: Summary
    recommendation: Recommendation | None
    base_info: CheckpointInfo | None
    tuned_info: CheckpointInfo
    device: str  # the device actually used
    elapsed_s: float
    version: str
    created: str  # ISO 8601, UTC
    notes: tuple[str, ...] = ()  # what this analysis could not report, e.g. relative change without a base
