"""The README's real numbers for `compare` and `trajectory`: the demo's fine-tunes of all-MiniLM-L6-v2.

1. The demo's two fine-tunes (full, LoRA r=8; trained by `spectra demo`'s own code and cache, or reused).
2. The full fine-tune trained again with the same recipe (same batches, seed, lr), saved at a few steps as a
   Trainer-style folder run/checkpoint-N/model.safetensors (the last one is the demo's full fine-tune).
3. compare(base, full, LoRA merged) and compare(base, full, LoRA adapter); trajectory(base, run) with vectors.

    python benchmarks/compare_demo.py [OUT_DIR] [--steps 1,5,10,20,40]

Writes comparison/trajectory JSON and HTML into OUT_DIR (default /tmp/spectra-compare-demo) and prints the numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

import spectra
from spectra import CompareSettings, Options, TrajectorySettings
from spectra_demo.app import DemoSettings, _torch_threads
from spectra_demo.cache import cache_key, default_cache_dir, train_or_reuse
from spectra_demo.data import load_corpus
from spectra_demo.train import Recipe, _fine_tune, _load_base, model_dir, save_like_base, train_models, training_batches


def train_with_checkpoints(recipe: Recipe, src: Path, run: Path, steps: set[int]) -> None:
    """The demo's full fine-tune, saved after each step in `steps` (same batches, seed and lr as the demo)."""
    corpus = load_corpus(recipe.n_test)
    batches = training_batches(corpus.train, recipe)
    tokenizer, model = _load_base(src, "cpu")

    def saving(items: Iterable[Any]) -> Iterator[Any]:
        for step, batch in enumerate(items, start=1):
            yield batch  # the loop trains on it; control comes back here after optimizer.step()
            if step in steps:
                out = run / f"checkpoint-{step}"
                out.mkdir(parents=True, exist_ok=True)
                save_like_base(model.state_dict(), src / "model.safetensors", out / "model.safetensors")
                print(f"saved {out}", flush=True)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        _fine_tune(model, tokenizer, batches, recipe.full_lr, recipe, "cpu", saving)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", type=Path, default=Path("/tmp/spectra-compare-demo"))
    parser.add_argument("--steps", default="1,5,10,20,40")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    steps = sorted({int(x) for x in args.steps.split(",")})
    settings = DemoSettings(recipe=Recipe(steps=max(steps)))
    recipe, src = settings.recipe, model_dir()
    base = src / "model.safetensors"
    folder = default_cache_dir() / cache_key(recipe, "cpu", base)
    started = time.perf_counter()
    with _torch_threads(1):
        trained, cached = train_or_reuse(
            folder, lambda into: train_models(load_corpus(recipe.n_test), recipe, src, into, "cpu", print, lambda x: x)
        )
        print(f"demo fine-tunes {'reused from' if cached else 'trained into'} {folder}; retrieval {trained.retrieval}")
        run = out / "run"
        if not all((run / f"checkpoint-{s}" / "model.safetensors").is_file() for s in steps):
            train_with_checkpoints(recipe, src, run, set(steps))
    print(f"training: {time.perf_counter() - started:.0f} s")
    from safetensors.torch import load_file

    last = load_file(str(run / f"checkpoint-{max(steps)}" / "model.safetensors"))
    demo_full = load_file(str(trained.full))
    print("last checkpoint == the demo's full fine-tune:", all(torch.equal(last[k], demo_full[k]) for k in demo_full))
    options = Options(device="cpu", threads=1)

    started = time.perf_counter()
    merged = spectra.compare_finetunes(base, trained.full, trained.lora_merged, CompareSettings(), options,
                                       labels=("full", "LoRA r=8"))  # fmt: skip
    print(f"compare full vs LoRA merged: {time.perf_counter() - started:.1f} s")
    adapter = spectra.compare_finetunes(base, trained.full, trained.lora_adapter, CompareSettings(), options,
                                        labels=("full", "LoRA r=8 adapter"))  # fmt: skip
    for record, name in ((merged, "compare_merged"), (adapter, "compare_adapter")):
        spectra.save_record(record, out / f"{name}.json")
        spectra.write_record_report(record, out / f"{name}.html")
    started = time.perf_counter()
    trajectory = spectra.analyze_trajectory(base, [run], TrajectorySettings(with_vectors=True, top_k=16), options,
                                            cache=out / "cache")  # fmt: skip
    print(f"trajectory: {time.perf_counter() - started:.1f} s")
    spectra.save_record(trajectory, out / "trajectory.json")
    spectra.write_record_report(trajectory, out / "trajectory.html")
    print(json.dumps(numbers(merged, adapter, trajectory), indent=1))


def numbers(merged: spectra.Comparison, adapter: spectra.Comparison, t: spectra.Trajectory) -> dict[str, Any]:
    s = merged.settings
    eps = s.epsilons

    def sweep(c: spectra.Comparison, side: str) -> list[int]:
        return [sum(getattr(kc, f"intruders_{side}").get(e, 0) for kc in c.kinds) for e in eps]

    return {
        "matrices": len(merged.matrices),
        "epsilons": list(eps),
        "intruders_full": sweep(merged, "a"),
        "intruders_lora_merged": sweep(merged, "b"),
        "intruders_lora_adapter": sweep(adapter, "b"),
        "matrices_with_intruder_at_0.5": {
            "full": sum(1 for mc in merged.matrices if mc.intruders_a and mc.intruders_a.counts[0.5] > 0),
            "lora": sum(1 for mc in merged.matrices if mc.intruders_b and mc.intruders_b.counts[0.5] > 0),
        },
        "per_kind": {
            kc.kind: {
                "n": kc.n,
                "d": kc.dim,
                "phi_8_8": float(kc.diagonal[7]),
                "chance_8": 8 / kc.dim,
                "phi_1_1": float(kc.diagonal[0]),
                "intruders_full_0.5": kc.intruders_a.get(0.5),
                "intruders_lora_0.5": kc.intruders_b.get(0.5),
                "amplification_full_r4_16_64": [kc.amplification_a.get(r) for r in s.amplification_ranks],
                "amplification_lora_r4": kc.amplification_b.get(4),
            }
            for kc in merged.kinds
        },
        "phi_full_top64_vs_lora_top8_mean": float(np.nanmean([kc.grid[-1, -1] for kc in merged.kinds])),
        "adapter_vs_merged_phi_diff": max(
            abs(float(a.diagonal[-1] - b.diagonal[-1])) for a, b in zip(merged.matrices, adapter.matrices, strict=True)
        ),
        "trajectory": {
            "steps": [p.step for p in t.points],
            "median_rank": [p.summary.overall.median_rank for p in t.points],
            "max_rank": [p.summary.overall.max_rank for p in t.points],
            "per_kind_median_rank": {k: [g.median_rank if g else None for g in t.kind_series(k)] for k in t.kinds()},
            "median_relative_change": [
                float(np.median([m.relative_change for m in p.matrices if m.relative_change is not None]))
                for p in t.points
            ],
            "captured_8": [p.summary.overall.captured[8] for p in t.points],
            "phi16_consecutive": [{k: round(v, 3) for k, v in sim.kinds.items()} for sim in t.similarity],
        },
    }


if __name__ == "__main__":
    main()
