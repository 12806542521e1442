"""Time the PEFT config building and key verification on Mixture-of-Experts-sized layouts (issue: hostile inputs,
item 8: 448 matrices of 16×16 took 1.8 s, 896 took 60 s, because every key was matched against every module).

    python benchmarks/bench_moe.py                       # 1k, 4k, 16k small matrices and a Mixtral-shaped layout
    python benchmarks/bench_moe.py --baseline /work/main # also time `recommend` from another checkout, per child

Layouts (module names only; no tensors): `small-N` is N expert matrices of 16×16
(`model.layers.{l}.mlp.experts.{e}.{gate,up,down}_proj`, 32 experts per layer: with many more, each per-expert
module kind holds < 1% of the energy and `recommend` targets none); `mixtral` is 32 layers × (8 experts × w1/w2/w3
+ q/k/v/o_proj + the router `gate`) plus embed_tokens and lm_head, Mixtral-8x7B's names and shapes.

Columns: `mixed` = build_adapter_config + its verification with a random rank per matrix (one rank_pattern key per
matrix before merging: the worst case), `per-kind` = one rank per module kind (a few keys), `recommend` = the whole
recommendation from planted spectra (allocation, config, verification), each the best of `--repeat` runs, seconds.
The per-matrix figure is `mixed` / matrices; `keys` counts the mixed config's rank_pattern keys and `PEFT lookup`
times PEFT's own get_pattern_key for every module on that config (as LoraModel does when it builds the model).
`--baseline` runs `recommend` in a child process with PYTHONPATH set to that checkout (stopped after `--timeout` s).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from spectra.names import module_kinds
from spectra.peft.config import build_adapter_config

EXPERT_KINDS = ("gate_proj", "up_proj", "down_proj")


def small(n: int) -> dict[str, tuple[int, int]]:
    """n expert matrices of 16×16, 32 experts per layer (module kinds are per expert index: "7.up_proj")."""
    n_layers = math.ceil(n / 32 / len(EXPERT_KINDS))
    names = [
        f"model.layers.{layer}.mlp.experts.{e}.{kind}.weight"
        for layer in range(n_layers)
        for e in range(32)
        for kind in EXPERT_KINDS
    ]
    return {name: (16, 16) for name in names[:n]}


def mixtral() -> dict[str, tuple[int, int]]:
    """Mixtral-8x7B's matrix names and shapes (hidden 4096, ffn 14336, 8 KV heads of 128)."""
    shapes: dict[str, tuple[int, int]] = {"model.embed_tokens.weight": (32000, 4096)}
    for layer in range(32):
        at = f"model.layers.{layer}"
        for kind, shape in (("q_proj", (4096, 4096)), ("k_proj", (1024, 4096)), ("v_proj", (1024, 4096))):
            shapes[f"{at}.self_attn.{kind}.weight"] = shape
        shapes[f"{at}.self_attn.o_proj.weight"] = (4096, 4096)
        shapes[f"{at}.block_sparse_moe.gate.weight"] = (8, 4096)
        for e in range(8):
            for kind, shape in (("w1", (14336, 4096)), ("w2", (4096, 14336)), ("w3", (14336, 4096))):
                shapes[f"{at}.block_sparse_moe.experts.{e}.{kind}.weight"] = shape
    shapes["lm_head.weight"] = (32000, 4096)
    return shapes


def time_build(kinds: dict[str, str], ranks: dict[str, int], repeat: int) -> tuple[float, dict[str, Any]]:
    best, config = math.inf, {}
    for _ in range(repeat):
        start = time.perf_counter()
        config, _ = build_adapter_config(kinds, ranks, rslora=False, task_type="CAUSAL_LM", base_model=None)
        best = min(best, time.perf_counter() - start)
    return best, config


def time_peft(config: dict[str, Any], modules: list[str]) -> str:
    """PEFT's own per-module lookup (get_pattern_key for r and alpha, as LoraModel does) over every module."""
    try:
        from peft.utils.other import get_pattern_key
    except ImportError:
        return "-"
    rank_keys, alpha_keys = list(config["rank_pattern"]), list(config["alpha_pattern"])
    start = time.perf_counter()
    for module in modules:
        get_pattern_key(rank_keys, module)
        get_pattern_key(alpha_keys, module)
    return f"{time.perf_counter() - start:.3f}"


RECOMMEND = """
import math, sys, time
import numpy as np
from spectra.lora.recommend import recommend
from spectra.names import module_kinds
from spectra.records import LayerMetrics
shapes = eval(sys.stdin.read())
kinds = module_kinds(list(shapes))
rng = np.random.default_rng(0)
layers = []
for name, shape in shapes.items():
    s = np.sort(rng.uniform(0.0, 1.0, 16) ** rng.uniform(1.0, 8.0))[::-1]
    kind, block = kinds[name]
    layers.append(LayerMetrics(name=name, shape=shape, kind=kind, layer=block, rank=0, stable_rank=0.0,
        effective_rank=0.0, spectral_norm=float(s[0]), frobenius_norm=float(np.sqrt(np.sum(s**2))),
        relative_change=None, captured={}, lora_params={}, random_rank=0, noise_fraction=0.0, noisy=False,
        gd_rank=0, dtype="f32", method="svd-f64", s=s))
best = math.inf
for _ in range(int(sys.argv[1])):
    start = time.perf_counter()
    rec = recommend(layers, max_rank=16)
    best = min(best, time.perf_counter() - start)
print(best, len(rec.config["rank_pattern"]) if rec else "no-recommendation")
"""


def time_recommend(shapes: dict[str, tuple[int, int]], repeat: int, path: str | None, timeout: float) -> str:
    """`recommend` on planted 16-value spectra in a child process (PYTHONPATH=path when given)."""
    env = dict(os.environ, **({"PYTHONPATH": path} if path else {}))
    try:
        done = subprocess.run(
            [sys.executable, "-c", RECOMMEND, str(repeat)],
            input=repr(shapes),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=path or None,
        )
    except subprocess.TimeoutExpired:
        return f">{timeout:.0f}"
    if done.returncode != 0:
        return "error: " + done.stderr.strip().splitlines()[-1]
    seconds, n_keys = done.stdout.split()
    return f"{float(seconds):.3f} ({n_keys} keys)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1024,4096,16384", help="small-matrix counts")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--baseline", help="another checkout whose `recommend` to time as well")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    layouts: dict[str, dict[str, tuple[int, int]]] = {f"small-{n}": small(int(n)) for n in args.sizes.split(",")}
    layouts["mixtral"] = mixtral()
    rows: list[list[Any]] = []
    for label, shapes in layouts.items():
        kinds = {name: kind for name, (kind, _) in module_kinds(list(shapes)).items()}
        rng = random.Random(0)
        mixed = {name: rng.randint(1, 16) for name in shapes}
        by_kind = {kind: rng.randint(1, 16) for kind in set(kinds.values())}
        per_kind = {name: by_kind[kinds[name]] for name in shapes}
        (t_mixed, config), (t_kind, _) = time_build(kinds, mixed, args.repeat), time_build(kinds, per_kind, args.repeat)
        row = [label, len(shapes), f"{t_mixed:.3f}", f"{t_mixed / len(shapes) * 1e6:.0f}", f"{t_kind:.3f}"]
        row += [len(config["rank_pattern"]), time_peft(config, [n.removesuffix(".weight") for n in shapes])]
        row.append(time_recommend(shapes, args.repeat, None, args.timeout))
        if args.baseline:
            row.append(time_recommend(shapes, 1, str(Path(args.baseline).resolve()), args.timeout))
        rows.append(row)
        print("\t".join(map(str, row)), file=sys.stderr, flush=True)
    header = ["layout", "matrices", "mixed s", "µs/matrix", "per-kind s", "keys", "PEFT lookup s", "recommend s"]
    header += ["baseline recommend s"] if args.baseline else []
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for line in [header, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True)))


if __name__ == "__main__":
    main()
