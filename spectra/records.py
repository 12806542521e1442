"""Frozen records that cross stage boundaries: Options in, Analysis out, and everything in between.

Records after the spectrum stage hold CPU float64 numpy only, so metrics, recommend and report run without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from html import escape
from typing import TYPE_CHECKING, Any

import numpy as np

from spectra.errors import OptionsError

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped, unused-ignore]
    import torch

DEVICES = ("auto", "cpu", "cuda")
EXECUTORS = ("local", "ray")
DEVICE_NAME = re.compile(r"cpu|cuda(:[0-9]+)?")  # an entry of Options.devices
PRECISIONS = ("fast", "exact")
DEFAULT_LORA_RANKS = (8, 16, 64, 256)
BASE_QUANTIZATIONS = ("nf4", "fp4", "int8")  # bitsandbytes' 4-bit (QLoRA) data types and LLM.int8() weights
QUANT_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' quantize_4bit accepts


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
        devices: local executor only: the devices to run on, one worker each, e.g. ("cuda:0", "cuda:1"); None: every
            visible GPU (when `device` resolves to CUDA), else the CPU.
        executor: "local" (this process) or "ray" (Ray actors, one per GPU or CPU worker). "ray:ADDRESS" and
            "ray://HOST:PORT" are accepted and set `ray_address`.
        ray_address: the Ray cluster to join ("auto", "HOST:PORT", "ray://HOST:PORT"); None with executor "ray":
            start a local Ray. Setting it implies executor "ray".
        base_quantization: "nf4", "fp4" or "int8": form ΔW against dequant(quant(W_base)) computed with
            bitsandbytes, for the linear weights a QLoRA run quantises (a merged QLoRA model); None: W_base as stored.
        quant_block_size: elements per absmax block of the 4-bit types (bitsandbytes' default, 64, is what
            transformers' BitsAndBytesConfig uses); int8 quantises row-wise and ignores it.
        double_quant: the 4-bit absmax values were quantised again (QLoRA's double quantisation,
            bnb_4bit_use_double_quant=True); int8 ignores it.
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
    devices: tuple[str, ...] | None = None
    executor: str = "local"
    ray_address: str | None = None
    base_quantization: str | None = None
    quant_block_size: int = 64
    double_quant: bool = True

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
        self._check_placement()

    def _check_placement(self) -> None:
        """Validate devices, executor and ray_address; "ray:ADDRESS" becomes executor "ray" with that address."""
        if self.devices is not None:
            object.__setattr__(self, "devices", tuple(self.devices))
            bad = [d for d in self.devices if not isinstance(d, str) or not DEVICE_NAME.fullmatch(d)]
            if bad or not self.devices or len(set(self.devices)) < len(self.devices):
                given = ",".join(map(str, self.devices))
                raise OptionsError(f"devices must be distinct names like cuda:0,cuda:1 (or cpu), got {given!r}")
        executor, address = self.executor, self.ray_address
        if isinstance(executor, str) and executor.startswith("ray:"):
            given = executor if executor.startswith("ray://") else executor.removeprefix("ray:")
            if address is not None and address != given:
                raise OptionsError(f"executor {executor!r} and ray_address {address!r} name different Ray clusters")
            executor, address = "ray", given
        if address is not None:
            if not isinstance(address, str) or not address.strip():
                raise OptionsError(f"ray_address must be auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
            if executor == "local":
                executor = "ray"  # --ray-address alone asks for Ray
        if executor not in EXECUTORS:
            raise OptionsError(f"executor must be local, ray, ray:ADDRESS or ray://HOST:PORT, got {self.executor!r}")
        if executor == "ray" and self.devices is not None:
            raise OptionsError("devices apply to the local executor; on Ray each actor takes one GPU (or CPU worker)")
        object.__setattr__(self, "executor", executor)
        object.__setattr__(self, "ray_address", address)
        if self.base_quantization is not None and self.base_quantization not in BASE_QUANTIZATIONS:
            raise OptionsError(
                f"base_quantization must be one of {', '.join(BASE_QUANTIZATIONS)}, got {self.base_quantization!r}"
            )
        if isinstance(self.quant_block_size, bool) or self.quant_block_size not in QUANT_BLOCK_SIZES:
            sizes = ", ".join(map(str, QUANT_BLOCK_SIZES))
            raise OptionsError(f"quant_block_size must be one of {sizes} (bitsandbytes), got {self.quant_block_size!r}")


@dataclass(frozen=True, slots=True)
class Resources:
    """What an executor may use in this process: never analysis settings. The pipeline builds it from Options.

    Attributes:
        device: a resolved torch device name: "cpu", "cuda", "cuda:1" (never "auto").
        threads: cap on intra-op CPU threads (also the number of CPU workers); None leaves torch's default.
        batch_bytes: bytes of matrices (and their results) in flight per device; None derives it from each device.
        devices: several devices, one worker each (the local executor spreads jobs over them, largest first), e.g.
            ("cuda:0", "cuda:1"); `device` is then devices[0]. (): `device` alone.
    """

    device: str = "cpu"
    threads: int | None = None
    batch_bytes: int | None = None
    devices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "devices", tuple(self.devices))
        if self.devices:
            object.__setattr__(self, "device", self.devices[0])
        for device in (self.device, *self.devices):
            if device == "auto" or not device:
                raise OptionsError(f"Resources.device must be resolved ('cpu', 'cuda', ...), got {device!r}")
        if self.batch_bytes is not None and self.batch_bytes < 1:
            raise OptionsError(f"batch_bytes must be positive, got {self.batch_bytes}")
        if self.threads is not None and self.threads < 1:
            raise OptionsError(f"threads must be at least 1, got {self.threads}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """What a model says about itself beside its weights: config.json of a Hugging Face model (or the `config` of an
    in-memory one), or adapter_config.json of a PEFT adapter (its base model and task). None where it says nothing.
    """

    name_or_path: str | None = None  # config.json "_name_or_path"; an adapter's "base_model_name_or_path"
    model_type: str | None = None  # e.g. "llama", "bert", "t5"
    architectures: tuple[str, ...] = ()  # e.g. ("LlamaForCausalLM",)
    is_encoder_decoder: bool | None = None
    task_type: str | None = None  # PEFT task type: an adapter's own, or inferred from `architectures`


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What an input checkpoint is, without its tensors."""

    path: str  # as the user gave it ("<in-memory ...>" for a module or state dict)
    format: str  # "safetensors", "folder", "sharded", "peft-adapter", "module", "state-dict", "peft-model"
    n_tensors: int
    n_bytes: int  # bytes of tensor data on disk (in memory for in-memory inputs)
    dtypes: tuple[str, ...]  # storage dtypes seen, e.g. ("bf16",)
    model: ModelConfig | None = None  # the config beside the weights, when there is one


@dataclass(frozen=True, slots=True)
class Skipped:
    """A tensor that was not analysed, and why."""

    name: str  # checkpoint key, verbatim (tuned side when it exists)
    reason: str  # a key of spectra.names.SKIP_REASONS
    detail: str = ""  # human detail, e.g. "base (32000, 64) vs tuned (32008, 64)"


@dataclass(frozen=True, slots=True)
class QuantProbe:
    """Whether ΔW carries the quantisation error E = dequant(quant(W_base)) − W_base of one bitsandbytes type, as a
    ΔW between a merged QLoRA model and its 16-bit base does; measured on a sample of W_base's blocks."""

    kind: str  # the best-matching type among BASE_QUANTIZATIONS (4-bit at block size 64)
    coefficient: float  # ⟨ΔW, E⟩ / ‖E‖² on the sample: ≈ 1 when ΔW holds E whole, ≈ 0 when unrelated
    energy: float  # ‖E‖_F² estimated for the whole matrix (the sample's, scaled by the element count)


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
    quant: QuantProbe | None = None  # the base-quantisation probe of a linear weight; None: not probed


@dataclass(frozen=True, slots=True)
class Spectrum:
    """Singular values of one ΔW. Values beyond len(s) (up to min(shape)) are exactly zero (factored deltas)."""

    name: str
    shape: tuple[int, int]
    s: np.ndarray = field(compare=False, repr=False)  # float64, descending
    energy: float  # ‖ΔW‖_F², computed directly from ΔW, not from s
    base_norm: float | None
    dtype: str
    noise_energy: float
    method: str  # how s was computed: "svd-f64", "gram-f32", "gram-f64", "factored-f64"
    quant: QuantProbe | None = None  # Delta.quant, passed through


@dataclass(frozen=True, slots=True)
class Factors:
    """The leading singular triplets of one ΔW (the TopK kernel): ΔW ≈ u @ diag(s) @ vt, best rank len(s).

    CPU numpy float64. Only numerically non-zero directions are kept: len(s) = min(k, min(shape), numerical rank),
    where σ ≤ max(shape)·ε₆₄·σ₁ counts as zero (numpy's matrix_rank rule), so a request beyond the rank is trimmed.
    """

    name: str
    shape: tuple[int, int]  # (m, n)
    u: np.ndarray = field(compare=False, repr=False)  # (m, r) orthonormal columns: left singular vectors
    s: np.ndarray = field(compare=False, repr=False)  # (r,) descending, > 0
    vt: np.ndarray = field(compare=False, repr=False)  # (r, n) orthonormal rows: right singular vectors
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
    s: np.ndarray = field(compare=False, repr=False, metadata={"json": "singular_values"})
    quant_error_fraction: float | None = None  # the base's quantisation error / ‖ΔW‖_F² (probe); None: not probed
    quantized_base: str | None = None  # "nf4", "fp4", "int8": ΔW carries that quantisation error of W_base
    # Rank rules that separate signal from the noise bulk (spectra.analysis.baselines; defaults: older analyses)
    mp_rank: int = 0  # σ above the Marchenko–Pastur edge fitted to the median σ²
    mp_edge: float = 0.0  # that edge, in σ units: √(median σ²/μ_β)·(1 + √β)
    stable_rank_ceil: int = 0  # ⌈stable rank⌉
    rank_captured: float = 0.0  # E(rank): what the energy rank keeps (≥ threshold; it reconstructs ΔW)
    gd_captured: float = 0.0  # E(gd_rank)
    mp_captured: float = 0.0  # E(mp_rank)
    stable_captured: float = 0.0  # E(stable_rank_ceil)

    def row(self) -> dict[str, Any]:
        """The JSON's scalar fields, flat: shape as rows/cols, E(r) as captured_<r>, LoRA sizes as lora_params_<r>."""
        return _flat(self)


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

    def row(self) -> dict[str, Any]:
        """The scalar fields, flat (E(r) as captured_<r>)."""
        return _flat(self)


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
    variant: str = "per-module"  # which LoRA `config` holds: "per-module" (rank_pattern) or "uniform" (one r)
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

    @property
    def task_type(self) -> str | None:
        """The PEFT task type the inputs' configs give (the base's first; an adapter's own), None if neither says."""
        return config_task_type(self.base_info, self.tuned_info)

    @property
    def base_model_name(self) -> str | None:
        """The base model's name from its config.json (an adapter's base_model_name_or_path), None if unknown."""
        for info in (self.base_info, self.tuned_info if self.base_info is None else None):
            if info is not None and info.model is not None and info.model.name_or_path:
                return info.model.name_or_path
        return None

    def __repr__(self) -> str:
        """One line: what was compared, counts, median ranks and the recommendation (the full record is the JSON)."""
        o, tau = self.summary.overall, f"{self.options.threshold:g}"
        what = f"{self.tuned} − {self.base}" if self.base is not None else f"{self.tuned} (adapter)"
        rec = self.recommendation
        lora = f"LoRA r={rec.uniform_rank} ({rec.uniform_captured:.1%})" if rec else "no LoRA recommendation"
        ref = 16 if 16 in o.captured else next(iter(o.captured), None)
        e = f"E({ref}) {o.captured[ref]:.1%}; " if ref is not None else ""
        return (
            f"<Analysis {what}: {o.n} matrices, median rank@{tau} {o.median_rank:g} (max {o.max_rank}, "
            f"{o.median_rank_ratio:.2f}× random); {e}{lora}; {len(self.skipped)} skipped>"
        )

    def _repr_html_(self) -> str:
        """Jupyter's view: the headline numbers and the per-kind table."""
        o, tau = self.summary.overall, f"{self.options.threshold * 100:g}%"
        rec = self.recommendation
        ranks = self.options.lora_ranks
        cells = "".join(f"<th>E({r})</th>" for r in ranks)
        rows = "".join(
            f"<tr><td style='text-align:left'><code>{escape(g.key)}</code></td><td>{g.n}</td>"
            f"<td>{g.median_rank:g}</td><td>{g.max_rank}</td><td>{g.median_rank_ratio:.2f}</td>"
            + "".join(f"<td>{g.captured.get(r, float('nan')):.1%}</td>" for r in ranks)
            + "</tr>"
            for g in (*self.summary.kinds, o)
        )
        lora = f"LoRA r = {rec.uniform_rank} captures {rec.uniform_captured:.1%}" if rec else "no LoRA recommendation"
        what = escape(f"{self.tuned} − {self.base}" if self.base is not None else f"{self.tuned} (adapter)")
        return (
            f"<div class='spectra-analysis'><p><strong>spectra</strong> {what}: <strong>{o.n}</strong> matrices, "
            f"median rank@{tau} <strong>{o.median_rank:g}</strong> (max {o.max_rank}), "
            f"<strong>{o.median_rank_ratio:.2f}</strong>× a random matrix; {escape(lora)}.</p>"
            f"<table><thead><tr><th>module kind</th><th>matrices</th><th>median rank@{tau}</th><th>max</th>"
            f"<th>rank / random</th>{cells}</tr></thead><tbody>{rows}</tbody></table></div>"
        )

    def to_pandas(self, by: str = "matrix") -> pd.DataFrame:
        """The analysis as a pandas DataFrame (needs pandas: `pip install 'spectra-lm[pandas]'`).

        Args:
            by: "matrix": one row per analysed matrix, the JSON's scalar fields as columns (`LayerMetrics.row`);
                "kind" or "layer": one row per module kind or block index (`GroupSummary.row`), "kind" ending in
                the "all" row.

        Raises:
            ModuleNotFoundError: pandas is not installed.
            ValueError: `by` is not "matrix", "kind" or "layer".
        """
        try:
            import pandas
        except ModuleNotFoundError:
            raise ModuleNotFoundError(
                "Analysis.to_pandas needs pandas: pip install 'spectra-lm[pandas]' (or pip install pandas)"
            ) from None
        if by == "matrix":
            return pandas.DataFrame([lm.row() for lm in self.layers])
        if by in ("kind", "layer"):
            groups = (*self.summary.kinds, self.summary.overall) if by == "kind" else self.summary.layers
            return pandas.DataFrame([g.row() for g in groups])
        raise ValueError(f"by must be 'matrix', 'kind' or 'layer', got {by!r}")


def config_task_type(*infos: CheckpointInfo | None) -> str | None:
    """The first PEFT task type among the inputs' configs, or None."""
    return next((i.model.task_type for i in infos if i is not None and i.model is not None and i.model.task_type), None)


def _flat(record: Any) -> dict[str, Any]:
    """A record's fields as flat scalars: arrays left out, (m, n) shapes as rows/cols, dicts as <field>_<key>."""
    row: dict[str, Any] = {}
    for f in fields(record):
        value = getattr(record, f.name)
        if isinstance(value, np.ndarray):
            continue
        if f.name == "shape":
            row["rows"], row["cols"] = value
        elif isinstance(value, dict):
            row.update({f"{f.name}_{key}": v for key, v in value.items()})
        else:
            row[f.name] = value
    return row


DEFAULT_SWEEP_RANKS = (1, 2, 4, 8, 16, 32, 64, 128)
EXTRACTED_KINDS = ("uniform", "budget", "recommendation")  # LoRAs extracted from TUNED: the sweep chooses among them
POINT_KINDS = ("base", "full", *EXTRACTED_KINDS, "trained")  # trained: a LoRA given, not extracted


@dataclass(frozen=True, slots=True)
class SweepSettings:
    """What `spectra.sweep` extracts and how it chooses, beyond the shared Options. Validated on construction.

    Attributes:
        ranks: uniform LoRA ranks to evaluate; None: DEFAULT_SWEEP_RANKS without the rungs at which every targeted
            module's LoRA would cost at least its dense matrix (r·(m + n) ≥ m·n).
        budgets: per-module (budgeted) allocations to evaluate: a share of the targeted dense parameters in (0, 1),
            or a number of LoRA parameters ≥ 1.
        recommendation: also evaluate spectra's own recommendation (`RankRule(auto=True)`).
        tolerance: share of the full fine-tune's gain over base a chosen LoRA may lose, in [0, 1).
        lower_is_better: the metric improves downwards (a loss, a perplexity).
        keep_adapters: keep every point's adapter (DIR/adapters/LABEL/); the chosen one is always kept.
        cache: reuse earlier evaluations of the same adapter (or checkpoint) and command.
        cache_dir: where the cache lives; None: $XDG_CACHE_HOME/spectra/sweep (~/.cache/spectra/sweep).
        targets: module kinds or name suffixes to adapt (extract's `targets`); None: all.
        include_embeddings: also adapt embeddings and output heads.
        biases: "carry" the changed biases of adapted modules as PEFT's lora_bias (extract's default: closer to
            TUNED), or "drop" them (a LoRA as usually trained: bias="none").
    """

    ranks: tuple[int, ...] | None = None
    budgets: tuple[float, ...] = ()
    recommendation: bool = True
    tolerance: float = 0.05
    lower_is_better: bool = False
    keep_adapters: bool = False
    cache: bool = True
    cache_dir: str | None = None
    targets: tuple[str, ...] | None = None
    include_embeddings: bool = False
    biases: str = "carry"

    def __post_init__(self) -> None:
        if self.biases not in ("carry", "drop"):
            raise OptionsError(f"biases must be carry or drop, got {self.biases!r}")
        if self.ranks is not None:
            ranks = tuple(self.ranks)
            if not ranks or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in ranks):
                raise OptionsError(f"ranks must be positive integers, got {self.ranks!r}")
            object.__setattr__(self, "ranks", tuple(sorted(set(ranks))))
        budgets = tuple(float(b) for b in self.budgets)
        for b in budgets:
            if not (0.0 < b < 1.0 or (b >= 1.0 and b == int(b))):  # also rejects NaN and inf
                raise OptionsError(
                    f"a budget is a share of the dense parameters in (0, 1) or a whole number of parameters ≥ 1, "
                    f"got {b:g}"
                )
        object.__setattr__(self, "budgets", tuple(sorted(set(budgets))))
        if not 0.0 <= self.tolerance < 1.0:
            raise OptionsError(f"tolerance must be in [0, 1) (0.05: keep 95% of the gain), got {self.tolerance}")
        if self.targets is not None:
            object.__setattr__(self, "targets", tuple(str(t) for t in self.targets))

    @staticmethod
    def parse_ranks(text: str) -> tuple[int, ...]:
        """ "1,2,4" -> (1, 2, 4). Raises OptionsError for anything else."""
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise OptionsError(f"--ranks takes comma-separated integers like 1,2,4,8, got {text!r}") from None

    @staticmethod
    def parse_budgets(text: str) -> tuple[float, ...]:
        """ "1%,5%,200000" -> (0.01, 0.05, 200000.0): a percent or a share below 1 is a share of the dense
        parameters, a whole number ≥ 1 a number of LoRA parameters. Raises OptionsError for anything else."""
        values = []
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            try:
                values.append(float(item[:-1]) / 100 if item.endswith("%") else float(item))
            except ValueError:
                raise OptionsError(f"--budgets takes shares like 1%,5% or parameter counts, got {item!r}") from None
        return tuple(values)


@dataclass(frozen=True, slots=True)
class SweepPoint:
    """One evaluated model of a sweep: the base, the full fine-tune, or a LoRA extracted from it and merged."""

    label: str  # "base", "full fine-tune", "r=4", "budget 5%", "recommendation"
    kind: str  # one of POINT_KINDS
    rank: int | None  # the rung's rank (uniform points)
    rank_min: int  # per-module ranks of the adapter (0 for base and full)
    rank_median: float
    rank_max: int
    n_modules: int  # modules in the adapter
    lora_params: int  # Σ r·(m + n) (+ carried biases); 0 for base; the dense count for the full fine-tune
    dense_params: int  # Σ m·n over the changed targeted modules (the same for every point)
    params_share: float  # lora_params / dense_params
    energy_kept: float | None  # share of Σ‖ΔW‖_F² the adapter holds (0 base, 1 full; None: a trained LoRA)
    dense_modules: int  # modules whose LoRA costs at least their dense matrix (r ≥ m·n/(m+n)): never chosen if > 0
    metric: float | None  # the reported (test) evaluation
    select_metric: float | None  # the selection evaluation (None: no separate one; the choice used `metric`)
    gain: float | None  # (metric − base) / (full − base)
    select_gain: float | None  # the same on the selection metric (= gain when there is none)
    error: str | None  # why the point failed (None: it did not)
    output: str | None  # the failed command's last lines of output
    seconds: float  # extract + merge + evaluate
    cached: bool  # every evaluation came from the cache
    adapter: str | None = None  # where its adapter was kept (relative to the output folder), if it was

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True, slots=True)
class Sweep:
    """The result of `spectra.sweep(base, tuned, evaluate)`: the task metric against LoRA size, and the choice."""

    base: str
    tuned: str
    options: Options
    settings: SweepSettings
    evaluator: str  # the reported evaluation's name (the command, for the CLI)
    select_evaluator: str | None  # the selection evaluation's name; None: the choice used the reported one
    points: tuple[SweepPoint, ...]
    chosen: str | None  # label of the recommended point; None: none qualifies (see reason)
    reason: str  # one sentence with the numbers
    notes: tuple[str, ...]
    elapsed_s: float
    version: str
    created: str

    def point(self, label: str) -> SweepPoint:
        """The point labelled `label` (KeyError if none)."""
        for p in self.points:
            if p.label == label:
                return p
        raise KeyError(label)
