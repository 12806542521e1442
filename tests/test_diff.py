"""Dense planning and ΔW: name pairing with reasons for everything skipped, upcast-before-subtract, and the
rounding-noise estimate."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import save_checkpoint
from spectra import Options
from spectra.io.checkpoint import Checkpoint, open_checkpoint
from spectra.io.tensors import Handles
from spectra.plan.delta import make_delta
from spectra.plan.dense import plan_pair
from spectra.plan.jobs import Dense, Job
from spectra.plan.noise import rounding_noise_energy
from spectra.records import Delta, Skipped


def pair(
    tmp_path: Path, base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], **options: object
) -> tuple[Checkpoint, Checkpoint, dict[str, Job], dict[str, Skipped]]:
    b = open_checkpoint(str(save_checkpoint(base, tmp_path / "b")))
    t = open_checkpoint(str(save_checkpoint(tuned, tmp_path / "t")))
    plan = plan_pair(b, t, Options(**options))  # type: ignore[arg-type]
    return b, t, {j.name: j for j in plan.jobs}, {s.name: s for s in plan.skipped}


def delta(job: Job, wide: bool = False) -> Delta:
    with contextlib.closing(Handles()) as handles:
        made = make_delta(job, handles, wide=wide)
    assert isinstance(made, Delta)
    return made


def test_every_unanalysed_tensor_has_a_reason(tmp_path: Path) -> None:
    w = torch.randn(4, 6)
    base = {
        "x.weight": w,
        "norm.weight": torch.ones(4),
        "emb.weight": torch.randn(10, 6),
        "gone.weight": w.clone(),
        "steps": torch.zeros(3, 3, dtype=torch.int64),
    }  # "emb" is not a vocabulary module name: no row matching
    tuned = {
        "x.weight": w + 1,
        "norm.weight": torch.ones(4),
        "emb.weight": torch.randn(12, 6),
        "new.weight": w.clone(),
        "steps": torch.ones(3, 3, dtype=torch.int64),
    }
    _, _, pairs, skipped = pair(tmp_path, base, tuned)
    assert set(pairs) == {"x.weight"}
    assert {n: s.reason for n, s in skipped.items()} == {
        "norm.weight": "not-2d",
        "emb.weight": "shape-mismatch",
        "gone.weight": "only-in-base",
        "new.weight": "only-in-tuned",
        "steps": "not-float",
    }
    assert "(10, 6)" in skipped["emb.weight"].detail and "(12, 6)" in skipped["emb.weight"].detail


@pytest.mark.parametrize("prefix", ["base_model.model.", "model."])
@pytest.mark.parametrize("side", ["tuned", "base"])
def test_a_leading_prefix_on_one_side_is_normalised(tmp_path: Path, prefix: str, side: str) -> None:
    names = ["layers.0.q.weight", "layers.1.q.weight", "head.weight"]
    plain = {n: torch.randn(3, 3) for n in names}
    prefixed = {prefix + n: t + 1 for n, t in plain.items()}
    base, tuned = (plain, prefixed) if side == "tuned" else (prefixed, plain)
    _, _, pairs, skipped = pair(tmp_path, base, tuned)
    assert len(pairs) == 3 and not skipped
    for p in pairs.values():
        assert isinstance(p.operand, Dense) and p.operand.base is not None
        assert (p.name, p.operand.base.name) in {(prefix + n, n) for n in names} | {(n, prefix + n) for n in names}


def test_ambiguous_prefix_is_not_guessed(tmp_path: Path) -> None:
    base = {"q.weight": torch.randn(2, 2), "k.weight": torch.randn(2, 2)}
    tuned = {"a.q.weight": torch.randn(2, 2), "b.k.weight": torch.randn(2, 2)}
    _, _, pairs, skipped = pair(tmp_path, base, tuned)
    assert not pairs
    assert {s.reason for s in skipped.values()} == {"only-in-base", "only-in-tuned"}


def test_include_and_exclude(tmp_path: Path) -> None:
    t = {f"layers.{i}.{k}.weight": torch.randn(3, 3) for i in range(2) for k in ("q", "v")}
    _, _, pairs, skipped = pair(tmp_path, t, {k: v + 1 for k, v in t.items()}, include=r"\.q\.", exclude="layers.1")
    assert set(pairs) == {"layers.0.q.weight"}
    assert all(s.reason == "excluded" for s in skipped.values()) and len(skipped) == 3


def test_unchanged_matrix_is_skipped_not_analysed(tmp_path: Path) -> None:
    w = torch.randn(5, 5)
    _, _, pairs, _ = pair(tmp_path, {"w": w}, {"w": w.clone()})
    with contextlib.closing(Handles()) as handles:
        result = make_delta(pairs["w"], handles)
    assert isinstance(result, Skipped) and result.reason == "unchanged" and result.name == "w"


def test_bf16_update_is_subtracted_after_upcast(tmp_path: Path) -> None:
    w = torch.full((4, 4), 1.0, dtype=torch.bfloat16)
    w_next = (w.float() + 2.0**-7).bfloat16()  # one bf16 ulp up; bf16 arithmetic would also round it
    _, _, pairs, _ = pair(tmp_path, {"w": w}, {"w": w_next})
    d = delta(pairs["w"])
    assert d.values is not None and d.values.dtype == torch.float32
    assert torch.all(d.values == 2.0**-7)
    assert d.base_norm == pytest.approx(4.0)
    wide = delta(pairs["w"], wide=True)  # what exact kernels ask for
    assert wide.values is not None and wide.values.dtype == torch.float64 and torch.all(wide.values == 2.0**-7)


@pytest.mark.parametrize(("dtype", "name"), [(torch.bfloat16, "bf16"), (torch.float16, "f16")])
def test_noise_estimate_matches_measured_rounding_energy(dtype: torch.dtype, name: str) -> None:
    """Σ ulp²/12 predicts ‖round(W) − W‖² for continuous W (here 300×400 Gaussian, within 3%)."""
    w = torch.from_numpy(np.random.default_rng(1).standard_normal((300, 400)) * 0.02)
    stored = w.to(dtype)
    measured = float(((stored.double() - w) ** 2).sum())
    assert rounding_noise_energy(stored, name) == pytest.approx(measured, rel=0.03)
    assert rounding_noise_energy(stored.float(), "f32") == 0.0


@pytest.mark.parametrize("chunk_bytes", [1, 7 * 4 * 13, 2**30])  # one row, 7 rows (last chunk short), all rows
@pytest.mark.parametrize(
    ("base_dtype", "tuned_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]
)
def test_chunked_delta_equals_whole_tensor_arithmetic(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    chunk_bytes: int,
    base_dtype: torch.dtype,
    tuned_dtype: torch.dtype,
) -> None:
    """ΔW, ‖W_base‖, the noise estimate and its cap do not depend on how many rows are formed at a time."""
    monkeypatch.setattr("spectra.plan.delta.DIFF_CHUNK_BYTES", chunk_bytes)
    rng = np.random.default_rng(3)
    w = torch.from_numpy(rng.standard_normal((45, 13)) * 0.02).to(base_dtype)
    w_tuned = (w.double() + torch.from_numpy(rng.standard_normal((45, 13)) * 1e-3)).to(tuned_dtype)
    _, _, pairs, _ = pair(tmp_path, {"w": w}, {"w": w_tuned})
    d = delta(pairs["w"])
    assert d.values is not None
    assert torch.equal(d.values, w_tuned.float() - w.float())
    assert d.base_norm == pytest.approx(float(torch.linalg.vector_norm(w.double())), rel=1e-12)
    expected = rounding_noise_energy(w, "f16" if base_dtype == torch.float16 else "bf16")
    expected += rounding_noise_energy(w_tuned, "bf16" if tuned_dtype == torch.bfloat16 else "f32")
    assert d.noise_energy == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(("dtype", "name"), [(torch.float8_e4m3fn, "f8_e4m3"), (torch.float8_e5m2, "f8_e5m2")])
def test_float8_checkpoints_are_diffed_and_measured(tmp_path: Path, dtype: torch.dtype, name: str) -> None:
    rng = np.random.default_rng(4)
    w = torch.from_numpy(rng.standard_normal((30, 20))).to(dtype)
    w_tuned = (w.double() + torch.from_numpy(rng.standard_normal((30, 20)) * 0.1)).to(dtype)
    _, _, pairs, _ = pair(tmp_path, {"w": w}, {"w": w_tuned})
    d = delta(pairs["w"])
    assert d.dtype == name and d.values is not None
    assert torch.equal(d.values, w_tuned.float() - w.float())
    assert d.base_norm == pytest.approx(float(torch.linalg.vector_norm(w.double())), rel=1e-12)
    assert d.noise_energy == pytest.approx(
        rounding_noise_energy(w, name) + rounding_noise_energy(w_tuned, name), rel=1e-12
    )


@pytest.mark.parametrize(
    "name", ["model.embed_tokens.weight", "lm_head.weight", "transformer.wte.weight", "output.weight"]
)
@pytest.mark.parametrize(("base_rows", "tuned_rows"), [(100, 102), (102, 100)])
def test_a_resized_vocabulary_is_compared_over_its_shared_rows(
    tmp_path: Path, name: str, base_rows: int, tuned_rows: int
) -> None:
    """Tokens appended by resize_token_embeddings have no base row: ΔW is formed over the rows both share."""
    rng = np.random.default_rng(5)
    w = torch.from_numpy(rng.standard_normal((base_rows, 16))).float()
    shared = min(base_rows, tuned_rows)
    tuned_w = torch.from_numpy(rng.standard_normal((tuned_rows, 16))).float()
    tuned_w[:shared] = w[:shared] + 0.1
    _, _, pairs, skipped = pair(tmp_path, {name: w}, {name: tuned_w})
    assert not skipped and pairs[name].shape == (shared, 16)
    note = pairs[name].note
    assert note is not None and f"{base_rows} → {tuned_rows}" in note and f"{shared} rows both share" in note
    assert ("2 added" if tuned_rows > base_rows else "2 removed") in note
    d = delta(pairs[name])
    assert d.values is not None and torch.allclose(d.values, torch.full((shared, 16), 0.1), atol=1e-6)
    assert d.base_norm == pytest.approx(float(torch.linalg.vector_norm(w[:shared].double())))


def test_other_shape_changes_are_not_compared(tmp_path: Path) -> None:
    base = {"layers.0.mlp.up.weight": torch.randn(10, 6), "layers.0.embed_tokens.weight": torch.randn(10, 6)}
    tuned = {"layers.0.mlp.up.weight": torch.randn(12, 6), "layers.0.embed_tokens.weight": torch.randn(10, 8)}
    _, _, pairs, skipped = pair(tmp_path, base, tuned)
    assert not pairs and {s.reason for s in skipped.values()} == {"shape-mismatch"}
