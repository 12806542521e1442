"""Print one line: the mean held-out next-token loss (nats, lower is better) of the causal LM in MODEL on the
standard-library task of validate_causal.py (see causal_task.py), for `spectra sweep --eval ... --lower-is-better`.

    python benchmarks/causal_eval.py MODEL --split val|test [--cache DIR] [--n N]

MODEL is a folder with config.json + model.safetensors (e.g. a merged model); the tokenizer comes from the cached
base (cache/base, written by validate_causal.py or on first use here).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from causal_task import N_EVAL, default_cache, eval_windows, load_model, load_tokenizer, mean_loss, prepare_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--split", choices=("val", "test"), required=True)
    parser.add_argument("--cache", type=Path, default=default_cache())
    parser.add_argument("--n", type=int, default=N_EVAL, help="held-out windows")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model}: no config.json (a model folder with config.json + model.safetensors)")
    tokenizer = load_tokenizer(prepare_base(args.cache))
    print(f"{mean_loss(load_model(args.model), eval_windows(tokenizer, args.split, args.n)):.6f}")


if __name__ == "__main__":
    main()
