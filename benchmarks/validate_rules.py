"""Validate spectra's rank rules on the demo's real fine-tune (issue 17): truncate the full fine-tune's ΔW per
matrix to each rule's rank (no training), merge into the base, and measure top-1 retrieval with the demo's own
evaluator on a validation split (500 training pairs the 40 steps never drew) and on the demo's test split.

Only the LoRA-targetable matrices (the 36 attention/MLP linear weights) carry the truncated ΔW; every other
tensor (embeddings, LayerNorms, biases) stays at the base, as it would under a LoRA. "share of gain" is
(top-1 − base)/(full fine-tune − base) on the same split; params are LoRA parameters Σ r·(m+n) over Σ m·n.

    python benchmarks/validate_rules.py [--cache DIR] [--json OUT]

Needs the demo's cached fine-tune (run `spectra demo` once; pass XDG_CACHE_HOME's spectra/demo as --cache).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from spectra import Options, analyze, recommend
from spectra.analysis.baselines import RULES
from spectra_demo.cache import default_cache_dir, load_trained
from spectra_demo.data import load_corpus
from spectra_demo.sweep import validation_pairs
from spectra_demo.train import Recipe, _load_base, model_dir, top1_retrieval

UNIFORM = (1, 2, 4, 8, 16, 32, 64)


def _cached_entry(cache: Path) -> Path:
    entries = sorted(p for p in cache.glob("s40-b16-seed0-cpu-*") if load_trained(p) is not None)
    if not entries:
        raise SystemExit(f"no complete demo cache entry under {cache}: run `spectra demo` first")
    return entries[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache_dir())
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Recipe()
    trained = load_trained(_cached_entry(args.cache))
    assert trained is not None
    src = model_dir()
    base_file, full_file = src / "model.safetensors", trained.full

    corpus = load_corpus(recipe.n_test)
    validation = validation_pairs(corpus, recipe)  # the demo's sweep selects on the same pairs
    splits = {"val": validation, "test": list(corpus.test)}

    base = load_file(str(base_file))
    full = load_file(str(full_file))
    analysis = analyze(str(base_file), str(full_file), Options(device="cpu", precision="exact"))
    layers = {lm.name: lm for lm in analysis.layers}
    targets = [k for k in full if k.startswith("encoder.layer.") and k.endswith(".weight") and full[k].ndim == 2]
    svd = {}
    for k in targets:
        delta = full[k].double() - base[k].double()
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        svd[k] = (u, s, vt, float((delta**2).sum()))
    dense = sum(base[k].numel() for k in targets)
    tokenizer, model = _load_base(src, "cpu")

    def evaluate(ranks: dict[str, int] | None, everything: bool = False) -> dict[str, float]:
        state = {k: v.clone() for k, v in (full if everything else base).items()}
        if ranks is not None and not everything:
            for k, r in ranks.items():
                u, s, vt, _ = svd[k]
                state[k] = (base[k].double() + (u[:, :r] * s[:r]) @ vt[:r]).float()
        model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)
        return {name: top1_retrieval(model, tokenizer, pairs, recipe, "cpu") for name, pairs in splits.items()}

    def row(label: str, ranks: dict[str, int] | None, everything: bool = False) -> dict[str, Any]:
        started = time.perf_counter()
        top1 = evaluate(ranks, everything)
        params = sum(r * sum(base[k].shape) for k, r in (ranks or {}).items())
        kept = sum(float((svd[k][1][:r] ** 2).sum()) for k, r in (ranks or {}).items())
        energy = sum(v[3] for v in svd.values())
        out = {
            "variant": label,
            "params_pct": 100 * params / dense,
            "energy_kept": kept / energy if ranks else (1.0 if everything else 0.0),
            **{f"top1_{s}": v for s, v in top1.items()},
            "seconds": time.perf_counter() - started,
        }
        print(json.dumps(out), flush=True)
        return out

    rows = [row("base", None), row("full fine-tune (every tensor)", None, everything=True)]
    rows.append(row("ΔW of the 36 matrices, untruncated", {k: int(svd[k][1].numel()) for k in targets}))
    for r in UNIFORM:
        rows.append(row(f"uniform r = {r}", dict.fromkeys(targets, r)))
    per_matrix = {
        "gd": {k: layers[k].gd_rank for k in targets},
        "mp": {k: layers[k].mp_rank for k in targets},
        "stable": {k: layers[k].stable_rank_ceil for k in targets},
        "energy@0.9 per matrix": {k: layers[k].rank for k in targets},
    }
    for label, ranks in per_matrix.items():
        rows.append(row(f"per-matrix {label} (uncapped)", ranks))
    recs = {}
    for rule in RULES:
        rec = recommend(analysis.layers, rule=rule, task_type="FEATURE_EXTRACTION")
        assert rec is not None
        alloc = {k: rec.allocation.get(k, 0) for k in targets}
        recs[rule] = {
            "uniform_rank": rec.uniform_rank,
            "allocation_params_pct": 100 * rec.allocation_params / dense,
            "not_low_rank": len(rec.not_low_rank),
            "reason": rec.reason,
        }
        rows.append(row(f"spectra recommend --rule {rule}: rank_pattern", alloc))
        rows.append(
            row(
                f"spectra recommend --rule {rule}: uniform r = {rec.uniform_rank}",
                dict.fromkeys(targets, rec.uniform_rank),
            )
        )
    ref = {s: (rows[0][f"top1_{s}"], rows[1][f"top1_{s}"]) for s in splits}
    for r in rows:
        for s, (b, f) in ref.items():
            r[f"gain_{s}"] = (r[f"top1_{s}"] - b) / (f - b) if f != b else float("nan")
    print()
    print(
        "| variant | LoRA params (% of dense) | ΔW energy kept | top-1 val | top-1 test | gain kept val "
        "| gain kept test |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['params_pct']:.1f}% | {100 * r['energy_kept']:.0f}% | {r['top1_val']:.3f} | "
            f"{r['top1_test']:.3f} | {100 * r['gain_val']:.0f}% | {100 * r['gain_test']:.0f}% |"
        )
    print()
    print("median per-matrix ranks:", {k: float(np.median(list(v.values()))) for k, v in per_matrix.items()})
    for rule, info in recs.items():
        print(rule, json.dumps(info))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "recommend": recs}, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
