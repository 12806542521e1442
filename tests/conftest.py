"""Shared helpers: planted spectra (ΔW = U diag(s) Vᵀ with s chosen up front) and checkpoint writers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LAYOUTS = ("file", "folder", "shards")


def planted_spectra(k: int) -> dict[str, np.ndarray]:
    """Spectra whose energy ranks are known before any SVD runs (length k, descending)."""
    i = np.arange(1, k + 1, dtype=np.float64)
    return {
        "rank8": np.where(i <= 8, 1.0, 0.0),
        "geometric": 0.8 ** (i - 1),
        "power": i**-1.0,
        "step": np.where(i <= 12, 1.0, 0.05),
    }


def expected_rank(s: np.ndarray, threshold: float) -> int:
    """Brute force, independent of spectra: smallest k with Σ_{i≤k} σ² ≥ τ·(1 − 1e-6)·Σ σ² (the documented slack)."""
    total = float(np.sum(s.astype(np.float64) ** 2))
    running = 0.0
    for k, sigma in enumerate(s, start=1):
        running += float(sigma) ** 2
        if running >= threshold * total * (1 - 1e-6):
            return k
    return len(s)


def planted_matrix(shape: tuple[int, int], s: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """U diag(s) Vᵀ with Haar-random orthonormal U and V, float64."""
    m, n = shape
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return (u * s) @ v.T


def save_checkpoint(tensors: dict[str, torch.Tensor], where: Path, layout: str = "file") -> Path:
    """Write `tensors` as a single file, a folder with model.safetensors, or two shards plus an index."""
    where.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if layout == "file":
        save_file(tensors, where / "weights.safetensors")
        return where / "weights.safetensors"
    if layout == "folder":
        save_file(tensors, where / "model.safetensors")
        return where
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, where / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    (where / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return where


PairFactory = Callable[..., tuple[Path, Path, dict[str, np.ndarray]]]


@pytest.fixture
def planted_pair(tmp_path: Path) -> PairFactory:
    """Factory: base/tuned checkpoints whose ΔW per matrix has a planted spectrum; returns paths and the spectra."""

    def make(
        layout: str = "file",
        dtype: torch.dtype = torch.float32,
        shape: tuple[int, int] = (48, 40),
        scale: float = 0.1,
        seed: int = 0,
    ) -> tuple[Path, Path, dict[str, np.ndarray]]:
        rng = np.random.default_rng(seed)
        spectra = planted_spectra(min(shape))
        base: dict[str, torch.Tensor] = {}
        tuned: dict[str, torch.Tensor] = {}
        for layer, (kind, s) in enumerate(spectra.items()):
            name = f"model.layers.{layer}.mlp.{kind}.weight"
            w = rng.standard_normal(shape)
            delta = planted_matrix(shape, s * scale * np.linalg.norm(w) / np.linalg.norm(s), rng)
            base[name], tuned[name] = torch.from_numpy(w).to(dtype), torch.from_numpy(w + delta).to(dtype)
            base[f"model.layers.{layer}.norm.weight"] = torch.ones(shape[0], dtype=dtype)
            tuned[f"model.layers.{layer}.norm.weight"] = torch.ones(shape[0], dtype=dtype) * 1.5
        sub = f"{layout}-{str(dtype).removeprefix('torch.')}-{seed}"
        return (
            save_checkpoint(base, tmp_path / sub / "base", layout),
            save_checkpoint(tuned, tmp_path / sub / "tuned", layout),
            {f"model.layers.{i}.mlp.{k}.weight": s for i, (k, s) in enumerate(spectra.items())},
        )

    return make
