"""Write a small Llama-shaped base/tuned pair with planted ΔW spectra, for trying spectra without a model.

    python examples/make_pair.py OUT_DIR [--layers 4] [--hidden 256] [--dtype bf16]

OUT_DIR/base.safetensors and OUT_DIR/tuned.safetensors, and a config.json naming the planted model (a Llama
architecture, so `spectra recommend` writes task_type CAUSAL_LM). Each ΔW = U diag(s) Vᵀ with a spectrum chosen per
module kind, so the energy rank is known before spectra runs:
  q_proj, k_proj: exact rank 8 (equal σ)      v_proj, o_proj: geometric σ_i = 0.9^i
  gate_proj, up_proj: power law σ_i = i^-0.6   down_proj: a step of 32 directions over a flat floor (1% each)
‖ΔW‖_F / ‖W‖_F is about 0.05 for every matrix.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def planted_spectrum(kind: str, k: int) -> np.ndarray:
    i = np.arange(1, k + 1, dtype=np.float64)
    if kind in ("q_proj", "k_proj"):
        return np.where(i <= 8, 1.0, 0.0)
    if kind in ("v_proj", "o_proj"):
        return 0.9 ** (i - 1)
    if kind in ("gate_proj", "up_proj"):
        return i**-0.6
    return np.where(i <= 32, 1.0, 0.1)


def planted_delta(shape: tuple[int, int], s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """U diag(s) Vᵀ with Haar-random orthonormal U (m×k) and V (n×k)."""
    m, n = shape
    k = len(s)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return (u * s) @ v.T


def make_pair(out: Path, layers: int, hidden: int, dtype: str, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    inter = hidden * 11 // 4
    shapes = {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden // 2, hidden),
        "self_attn.v_proj": (hidden // 2, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (inter, hidden),
        "mlp.up_proj": (inter, hidden),
        "mlp.down_proj": (hidden, inter),
    }
    base: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(512, hidden) * 0.02}
    tuned: dict[str, torch.Tensor] = {"model.embed_tokens.weight": base["model.embed_tokens.weight"].clone()}
    for layer in range(layers):
        for path, shape in shapes.items():
            name = f"model.layers.{layer}.{path}.weight"
            w = rng.standard_normal(shape) * 0.02
            delta = planted_delta(shape, planted_spectrum(path.split(".")[-1], min(shape)), rng)
            delta *= 0.05 * np.linalg.norm(w) / np.linalg.norm(delta)
            base[name], tuned[name] = torch.from_numpy(w), torch.from_numpy(w + delta)
        norm = f"model.layers.{layer}.input_layernorm.weight"
        base[norm], tuned[norm] = torch.ones(hidden), torch.ones(hidden)
    out.mkdir(parents=True, exist_ok=True)
    cast = DTYPES[dtype]
    for label, tensors in (("base", base), ("tuned", tuned)):
        save_file({k: v.to(cast).contiguous() for k, v in tensors.items()}, out / f"{label}.safetensors")
    config = {"_name_or_path": f"planted-llama-{layers}x{hidden}", "architectures": ["LlamaForCausalLM"]}
    config |= {"model_type": "llama", "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out / "base.safetensors", out / "tuned.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    args = parser.parse_args()
    for path in make_pair(args.out, args.layers, args.hidden, args.dtype):
        print(path)


if __name__ == "__main__":
    main()
