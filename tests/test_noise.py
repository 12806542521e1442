"""The storage-rounding floor: planted rank-8 updates stored in bf16, flagged when ΔW sinks into the rounding noise.

Setting of the issue's acceptance test: W continuous (float64 Gaussian), base = bf16(W), tuned = bf16(W + Δ), Δ of
rank 8 with equal singular values and ‖Δ‖_F/‖W‖_F = `rel`; both roundings land in the stored ΔW.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import planted_matrix, save_checkpoint
from spectra import Analysis, Options, analyze
from spectra.io.checkpoint import open_checkpoint
from spectra.io.tensors import Handles
from spectra.plan.delta import make_delta
from spectra.plan.dense import plan_pair
from spectra.records import Delta

SHAPE = (256, 320)
NAME = "model.layers.0.mlp.up_proj.weight"


def weights(rel: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(W, Δ): W Gaussian with entries of std 0.02 (LLM-like scale), Δ rank 8 with ‖Δ‖/‖W‖ = rel."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(SHAPE) * 0.02
    delta = planted_matrix(SHAPE, np.ones(8), rng)
    return w, delta * rel * np.linalg.norm(w) / np.linalg.norm(delta)


def stored_pair(
    tmp_path: Path,
    w_base: np.ndarray,
    w_tuned: np.ndarray,
    base_dtype: torch.dtype = torch.bfloat16,
    tuned_dtype: torch.dtype = torch.bfloat16,
) -> tuple[Path, Path]:
    base = save_checkpoint({NAME: torch.from_numpy(w_base).to(base_dtype)}, tmp_path / "base")
    tuned = save_checkpoint({NAME: torch.from_numpy(w_tuned).to(tuned_dtype)}, tmp_path / "tuned")
    return base, tuned


def analyze_pair(base: Path, tuned: Path) -> Analysis:
    return analyze(str(base), str(tuned), Options())


def delta_of(base: Path, tuned: Path) -> Delta:
    with open_checkpoint(str(base)) as b, open_checkpoint(str(tuned)) as t:
        (job,) = plan_pair(b, t, Options()).jobs
    with contextlib.closing(Handles()) as handles:
        delta = make_delta(job, handles, wide=True)  # as precision="exact" asks for it
    assert isinstance(delta, Delta)
    return delta


def test_rank8_update_at_1e_3_in_bf16_is_flagged(tmp_path: Path) -> None:
    w, delta = weights(1e-3)
    (layer,) = analyze_pair(*stored_pair(tmp_path, w, w + delta)).layers
    assert layer.dtype == "bf16"
    assert layer.noisy
    assert layer.noise_fraction > 0.5  # the rounding noise dominates ΔW
    assert layer.rank > 50  # ... and it shows: the planted rank 8 reads as a large rank


def test_rank8_update_at_1e_1_in_bf16_is_not_flagged_and_rank_is_recovered(tmp_path: Path) -> None:
    w, delta = weights(1e-1)
    (layer,) = analyze_pair(*stored_pair(tmp_path, w, w + delta)).layers
    assert not layer.noisy
    assert 0.0 < layer.noise_fraction < 1e-2
    assert layer.rank == 8
    assert layer.gd_rank == 8  # Gavish–Donoho: exactly the planted directions stand above the noise


@pytest.mark.parametrize(
    ("base_dtype", "tuned_dtype", "rel"),
    [
        (torch.bfloat16, torch.bfloat16, 3e-2),  # both sides rounded: the setting
        (torch.bfloat16, torch.bfloat16, 1e-2),
        (torch.float32, torch.bfloat16, 3e-2),  # only the tuned side rounded
        (torch.float16, torch.float16, 3e-2),
    ],
)
def test_noise_estimate_matches_measured_null_delta(
    tmp_path: Path, base_dtype: torch.dtype, tuned_dtype: torch.dtype, rel: float
) -> None:
    """A dense random perturbation P (a "null" update: no structure) is stored; ‖ΔW − P‖² is pure rounding noise.

    The estimate, made from the stored tensors alone (P unknown to it), must match the measured energy within 5%.
    """
    rng = np.random.default_rng(7)
    w = rng.standard_normal(SHAPE) * 0.02
    p = rng.standard_normal(SHAPE) * 0.02 * rel
    delta = delta_of(*stored_pair(tmp_path, w, w + p, base_dtype, tuned_dtype))
    assert delta.values is not None
    measured = float(((delta.values.double() - torch.from_numpy(p)) ** 2).sum())
    assert delta.noise_energy == pytest.approx(measured, rel=0.05)


def test_update_far_below_one_ulp_is_all_noise(tmp_path: Path) -> None:
    """At ‖Δ‖/‖W‖ = 1e-4 almost every element rounds the same way on both sides: ΔW is a sparse ±ulp pattern whose
    energy is (in expectation) all rounding noise; the estimate is capped at ‖ΔW‖², so noise_fraction = 1."""
    w, delta = weights(1e-4)
    base, tuned = stored_pair(tmp_path, w, w + delta)
    d = delta_of(base, tuned)
    assert d.values is not None
    energy = float(d.values.double().square().sum())
    measured = float(((d.values.double() - torch.from_numpy(delta)) ** 2).sum())
    assert measured / energy > 0.9  # the premise: the stored ΔW is almost all noise
    assert d.noise_energy == pytest.approx(energy, rel=1e-5)
    (layer,) = analyze(str(base), str(tuned), Options()).layers
    assert layer.noisy and layer.noise_fraction == pytest.approx(1.0, rel=1e-5)


def test_float32_storage_has_no_floor(tmp_path: Path) -> None:
    w, delta = weights(1e-4)
    (layer,) = analyze_pair(*stored_pair(tmp_path, w, w + delta, torch.float32, torch.float32)).layers
    assert layer.noise_fraction == 0.0 and not layer.noisy
    assert layer.rank == 8 and layer.gd_rank == 8
