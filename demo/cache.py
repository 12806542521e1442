"""The demo's checkpoint cache: one folder per training recipe, complete once its marker file is written.

An entry is built in a temporary folder beside its final place and renamed into place after the marker is written,
so an interrupted run never leaves an entry that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

from .train import Recipe, Trained

log = logging.getLogger(__name__)

RECIPE_VERSION = 1  # bump when training changes in a way the recipe does not show, to invalidate caches
MARKER = "demo.json"  # written last: a cache folder without it is incomplete


def default_cache_dir() -> Path:
    """Return $XDG_CACHE_HOME/spectra/demo, or ~/.cache/spectra/demo."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "spectra" / "demo"


def cache_key(recipe: Recipe, device: str, model_file: Path) -> str:
    """Return the cache folder name of a recipe: readable settings, then a hash of everything training depends on.

    Args:
        recipe: the training recipe.
        device: "cpu" or "cuda" (results differ in the last bits).
        model_file: the base model.safetensors; its size stands for its version.
    """
    identity = {
        "recipe": RECIPE_VERSION,
        "settings": asdict(recipe),
        "device": device,
        "python": platform.python_version(),
        "model": model_file.stat().st_size,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return f"s{recipe.steps}-b{recipe.batch_size}-seed{recipe.seed}-{device}-{digest}"


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


def train_or_reuse(
    folder: Path,
    train: Callable[[Path], Trained],
    *,
    fresh: bool = False,
    echo: Callable[[str], None] = lambda line: None,
) -> tuple[Trained, bool]:
    """Return (training outcome, whether it came from the cache) for the cache entry `folder`.

    A complete entry is reused unless `fresh`; otherwise `train(into)` trains into a new folder `into` (which it
    must create), and that folder is marked complete and renamed to `folder`, replacing any stale entry.

    Args:
        folder: the entry, e.g. `default_cache_dir() / cache_key(...)`.
        train: builds the checkpoints inside the folder it is given and returns the outcome.
        fresh: retrain even when the entry is complete.
        echo: receives one-line progress messages.
    """
    trained = None if fresh else load_trained(folder)
    if trained is not None:
        r = trained.retrieval
        echo(
            f"reusing the fine-tunes cached in {folder} (--fresh retrains); held-out top-1 retrieval: "
            f"base {r['base']:.3f}, full fine-tune {r['full']:.3f}, LoRA {r['lora']:.3f}"
        )
        return trained, True
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        trained = train(partial)
        save_trained(trained)
        shutil.rmtree(folder, ignore_errors=True)  # stale or incomplete
        os.replace(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    log.info("cached the demo fine-tunes in %s", folder)
    return replace(trained, folder=folder), False
