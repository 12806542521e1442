"""The demo's sweep: LoRAs extracted from its full fine-tune at a ladder of ranks, scored by the demo's own retrieval
evaluator in-process, with the LoRA it trained as a point on the same axes (`spectra.sweep`).

The choice is made on a validation split (as many training pairs as the test split holds, 500, that the 40 steps
never drew) and top-1 on the held-out test pairs is reported, as `spectra sweep --eval-select` does: choosing on
the reported metric would flatter it. Evaluations are cached inside the trained checkpoints' cache entry, so a
second run evaluates nothing and a retrained entry starts afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import spectra
from spectra import Candidate, Evaluator, Options, ProgressHook, Sweep, SweepSettings

from .data import CodePair, Corpus
from .train import Recipe, Trained, _load_base, model_dir, top1_retrieval, training_batches

LADDER = (1, 2, 4, 8, 16)  # the curve is flat from r = 4 on this task; few rungs keep the first run short
SWEEP_FOLDER = "sweep"  # inside the demo's output folder: sweep.json, sweep.html, adapter/ (the chosen LoRA)


def validation_pairs(corpus: Corpus, recipe: Recipe) -> list[CodePair]:
    """As many training pairs as the test split holds (recipe.n_test), the first that no training batch drew."""
    used = {p.origin for batch in training_batches(corpus.train, recipe) for p in batch}
    return [p for p in corpus.train if p.origin not in used][: recipe.n_test]


def retrieval_evaluator(
    name: str, pairs: Sequence[CodePair], recipe: Recipe, key: str, known: dict[str, float] | None = None
) -> Evaluator:
    """An in-process evaluator: top-1 retrieval of `pairs` by the model stored at the candidate's path.

    Args:
        name: shown in tables and in the record.
        pairs: the split to score.
        recipe: token limits of queries and code.
        key: the cache identity (the corpus and recipe it depends on, and the split).
        known: label -> a value already measured by `top1_retrieval` on the same weights and pairs (the base and
            the full fine-tune during training), returned instead of measuring again.
    """
    from safetensors.torch import load_file

    loaded: list[tuple[Any, Any]] = []  # (tokenizer, model), built on the first evaluation

    def evaluate(candidate: Candidate) -> float:
        if known and candidate.label in known:
            return known[candidate.label]
        if not loaded:
            loaded.append(_load_base(model_dir(), "cpu"))
        tokenizer, model = loaded[0]
        stored = load_file(str(candidate.model))
        model.load_state_dict({k: stored[k] for k in model.state_dict()}, strict=True)
        return top1_retrieval(model, tokenizer, pairs, recipe, "cpu")

    return Evaluator(name, evaluate, key)


def sweep_full_fine_tune(
    trained: Trained,
    corpus: Corpus,
    recipe: Recipe,
    out_dir: Path,
    cache_dir: Path,
    options: Options,
    *,
    echo: Callable[[str], None],
    progress: ProgressHook,
) -> Sweep:
    """Run the sweep on the demo's full fine-tune and write OUT_DIR/sweep/ (sweep.json, sweep.html, adapter/).

    Args:
        trained: the cached fine-tunes (the full one is swept, the trained LoRA is a point).
        corpus: the demo corpus (its test split is reported, unused training pairs select).
        recipe: the training recipe (token limits, batches).
        out_dir: the demo's output folder.
        cache_dir: where evaluations are cached (keyed on the fine-tunes' files and the split).
        options: threads and device of the extraction.
        echo, progress: as for `spectra.sweep`.
    """
    base = model_dir() / "model.safetensors"
    identity = f"spectra-demo/{trained.folder.name}"
    known = {"base": trained.retrieval["base"], "full fine-tune": trained.retrieval["full"]}
    test = retrieval_evaluator(
        f"top-1 retrieval, {len(corpus.test)} held-out test pairs", corpus.test, recipe, f"{identity}/test", known
    )
    validation = validation_pairs(corpus, recipe)
    select = retrieval_evaluator(
        f"top-1 retrieval, {len(validation)} unused training pairs (validation)",
        validation,
        recipe,
        f"{identity}/validation",
    )
    # biases dropped: the LoRAs hold only B·A of the 36 matrices, like the trained LoRA (PEFT's bias="none")
    settings = SweepSettings(ranks=LADDER, recommendation=True, cache_dir=str(cache_dir), biases="drop")
    record = spectra.sweep(
        base,
        trained.full,
        test,
        select=select,
        settings=settings,
        options=options,
        out_dir=out_dir / SWEEP_FOLDER,
        overwrite=True,
        adapters={f"trained LoRA r={recipe.lora_r}": trained.lora_adapter},
        echo=echo,
        progress=progress,
    )
    # the page names no folder of this machine (the cache, site-packages); sweep.json keeps the real paths
    shown = replace(record, base="all-MiniLM-L6-v2/model.safetensors", tuned="full-fine-tune/model.safetensors")
    spectra.write_sweep_report(shown, out_dir / SWEEP_FOLDER / "sweep.html")
    return record
