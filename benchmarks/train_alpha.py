"""Which LoRA α (scaling) and learning rate train on the demo task at large rank (issue 17, item 5): train PEFT
LoRAs on the demo's own batches, targets and seed at ranks {8, 64, 256} under three scalings and two learning rates,
and measure held-out top-1 retrieval on the demo's 500 test pairs.

Scalings (PEFT's update is scale · B A, B initialised to zero):
  A  plain LoRA, α = 2r           scale α/r = 2 at every r (the common practice; what `recommend` advised)
  B  rsLoRA, α = 2√8 fixed        scale α/√r = 2·√(8/r): 2 at r = 8, 0.71 at r = 64, 0.35 at r = 256
  C  plain LoRA, α = 16 fixed     scale α/r = 16/r: 2 at r = 8, 0.25 at r = 64, 0.0625 at r = 256
At r = 8 all three give scale 2 (identical runs), so r = 8 is trained once per learning rate.

    python benchmarks/train_alpha.py [--ranks 8,64,256] [--lrs 2.5e-4,1e-3] [--scalings A,B,C] [--skip C@2.5e-4]
                                     [--base] [--seed 0] [--threads 1] [--json OUT]

Everything but the LoRA config and the learning rate is the demo's recipe (spectra_demo.train.Recipe: 40 AdamW
steps of 16 pairs, seed 0, no weight decay, no dropout); the model is the packaged all-MiniLM-L6-v2, offline.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from spectra_demo.data import load_corpus
from spectra_demo.train import LORA_TARGETS, Recipe, _fine_tune, _load_base, model_dir, top1_retrieval, training_batches

SCALINGS = {
    "A": "plain, α = 2r",
    "B": "rsLoRA, α = 2√8",
    "C": "plain, α = 16",
}


@dataclass(frozen=True, slots=True)
class Cell:
    """One LoRA configuration of the grid."""

    rank: int
    scaling: str  # a key of SCALINGS
    lr: float

    @property
    def alpha(self) -> float:
        return {"A": 2.0 * self.rank, "B": 2.0 * math.sqrt(8), "C": 16.0}[self.scaling]

    @property
    def rslora(self) -> bool:
        return self.scaling == "B"

    @property
    def scale(self) -> float:
        """PEFT's multiplier of B A: α/√r under rsLoRA, α/r otherwise."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass(frozen=True, slots=True)
class Outcome:
    """The measurement of one cell."""

    rank: int
    scaling: str
    alpha: float
    scale: float
    lr: float
    top1: float
    delta_rel: float  # ‖scale·BA‖_F / ‖W‖_F, mean over the targeted matrices: how far training moved them
    train_s: float
    eval_s: float


def grid(ranks: Iterable[int], scalings: Iterable[str], lrs: Iterable[float]) -> list[Cell]:
    """Every (rank, scaling, lr) cell, dropping cells whose (rank, scale, rslora-equivalent) run is already listed:
    at r = 8 the three scalings give the same scale 2 and the same training."""
    cells: list[Cell] = []
    seen: set[tuple[int, float, float]] = set()
    for lr in lrs:
        for r in ranks:
            for sc in scalings:
                cell = Cell(r, sc, lr)
                key = (r, round(cell.scale, 9), lr)
                if key not in seen:
                    seen.add(key)
                    cells.append(cell)
    return cells


def _identity(batches: Iterable[Any]) -> Iterable[Any]:
    return batches


def train_cell(cell: Cell, src: Path, corpus: Any, batches: list[Any], recipe: Recipe) -> Outcome:
    """Train one LoRA exactly as the demo trains its r = 8 one (same seeding), with the cell's config."""
    from peft import LoraConfig, get_peft_model

    tokenizer, model = _load_base(src, "cpu")
    config = LoraConfig(
        r=cell.rank,
        lora_alpha=cell.alpha,
        lora_dropout=0.0,
        target_modules=list(LORA_TARGETS),
        use_rslora=cell.rslora,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)  # as the demo: also seeds the LoRA A initialisation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            lora = get_peft_model(model, config)
        train_s = _fine_tune(lora, tokenizer, batches, cell.lr, recipe, "cpu", _identity)
    started = time.perf_counter()
    top1 = top1_retrieval(lora, tokenizer, corpus.test, recipe, "cpu")
    eval_s = time.perf_counter() - started
    ratios = []
    with torch.no_grad():
        for module in lora.modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                scaling = module.scaling["default"]
                assert math.isclose(scaling, cell.scale, rel_tol=1e-6), (scaling, cell)
                delta = module.get_delta_weight("default")
                ratios.append(float(delta.norm() / module.base_layer.weight.norm()))
    assert len(ratios) == 36, len(ratios)  # 6 linear layers × 6 blocks
    return Outcome(
        rank=cell.rank,
        scaling=cell.scaling,
        alpha=cell.alpha,
        scale=cell.scale,
        lr=cell.lr,
        top1=top1,
        delta_rel=sum(ratios) / len(ratios),
        train_s=train_s,
        eval_s=eval_s,
    )


def table(rows: list[Outcome], base: float | None) -> str:
    """The markdown table of the outcomes, sorted by rank, scaling, lr."""
    lines = [
        "| rank | scaling | α | scale | lr | top-1 | ‖ΔW‖/‖W‖ | seconds (train + eval) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if base is not None:
        lines.append(f"| base | – | – | – | – | {base:.3f} | 0 | – |")
    for o in sorted(rows, key=lambda o: (o.rank, o.scaling, o.lr)):
        name = SCALINGS[o.scaling] if o.rank != 8 else "any (scale 2)"
        lines.append(
            f"| {o.rank} | {o.scaling}: {name} | {o.alpha:.4g} | {o.scale:.4g} | {o.lr:g} | {o.top1:.3f} | "
            f"{o.delta_rel:.2e} | {o.train_s:.0f} + {o.eval_s:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="8,64,256")
    parser.add_argument("--scalings", default="A,B,C")
    parser.add_argument("--lrs", default="2.5e-4,1e-3")
    parser.add_argument("--skip", default="", help="cells to leave out, e.g. 'C@2.5e-4,64@2.5e-4' (scaling or rank)")
    parser.add_argument("--base", action="store_true", help="also measure the base model's top-1")
    parser.add_argument("--seed", type=int, default=0, help="the recipe's seed (batches and LoRA A init); demo: 0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scalings = [s for s in args.scalings.split(",") if s]
    if unknown := set(scalings) - set(SCALINGS):
        parser.error(f"unknown scalings {sorted(unknown)}; choose from {sorted(SCALINGS)}")
    cells = grid([int(r) for r in args.ranks.split(",")], scalings, [float(x) for x in args.lrs.split(",")])
    for item in filter(None, args.skip.split(",")):
        what, _, lr = item.partition("@")
        cells = [c for c in cells if not (what in (c.scaling, str(c.rank)) and math.isclose(c.lr, float(lr)))]
    recipe = Recipe(seed=args.seed)
    corpus = load_corpus(recipe.n_test)
    batches = training_batches(corpus.train, recipe)
    src = model_dir()
    print(f"{len(cells)} cells: " + ", ".join(f"r{c.rank}/{c.scaling}/{c.lr:g}" for c in cells), flush=True)
    base = None
    if args.base:
        tokenizer, model = _load_base(src, "cpu")
        base = top1_retrieval(model, tokenizer, corpus.test, recipe, "cpu")
        print(json.dumps({"base": base}), flush=True)
    rows = []
    for cell in cells:
        outcome = train_cell(cell, src, corpus, batches, recipe)
        rows.append(outcome)
        print(json.dumps(asdict(outcome)), flush=True)
    print()
    print(table(rows, base))
    if args.json:
        payload = {"recipe": asdict(recipe), "threads": args.threads, "base": base, "rows": [asdict(o) for o in rows]}
        args.json.write_text(json.dumps(payload, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
