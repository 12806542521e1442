"""compare: φ, principal angles, intruders and amplification against float64 references, planted cases with known
answers, PEFT's own intruder helper, the saved record, and the command's bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from spectra import (
    CompareSettings,
    Comparison,
    MismatchError,
    Options,
    compare_finetunes,
    load_record,
    save_record,
    write_record_report,
)
from spectra.compare.intruders import intruder_counts, max_cosines, top_left_vectors
from spectra.compare.subspace import (
    chance_similarity,
    principal_angles,
    projected_norm,
    subspace_similarity,
)
from spectra_cli.app import app

peft = pytest.importorskip("peft")

CPU = Options(device="cpu")
runner = CliRunner()


def orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return q


def save(tensors: dict[str, np.ndarray], path: Path) -> Path:
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, str(path))
    return path


def triple(tmp_path: Path, base: dict[str, np.ndarray], a: dict[str, np.ndarray], b: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    return (
        save(base, tmp_path / "base.safetensors"),
        save(a, tmp_path / "a.safetensors"),
        save(b, tmp_path / "b.safetensors"),
    )


# ---------------------------------------------------------------- the numerics against float64 references


def test_subspace_similarity_matches_the_definition() -> None:
    rng = np.random.default_rng(0)
    u_a, u_b = orthonormal(rng, 40, 7), orthonormal(rng, 40, 5)
    expected = np.array(
        [[np.linalg.norm(u_a[:, :i].T @ u_b[:, :j]) ** 2 / min(i, j) for j in range(1, 6)] for i in range(1, 8)]
    )
    np.testing.assert_allclose(subspace_similarity(u_a, u_b), expected, rtol=1e-12, atol=1e-15)
    assert subspace_similarity(u_a, u_a)[6, 6] == pytest.approx(1.0)


def test_chance_level_of_independent_random_subspaces() -> None:
    """E φ(i, j) = max(i, j)/d for random subspaces; off the diagonal this tells max from min and from i·j/d."""
    rng = np.random.default_rng(1)
    d, a, b = 256, 4, 16
    mean = np.mean([subspace_similarity(orthonormal(rng, d, a), orthonormal(rng, d, b)) for _ in range(200)], axis=0)
    chance = chance_similarity(a, b, d)
    np.testing.assert_allclose(mean, chance, rtol=0.12)
    assert chance[3, 15] == 16 / d and chance[0, 0] == 1 / d


def test_principal_angles_match_scipy_and_planted_angles() -> None:
    rng = np.random.default_rng(2)
    u_a, u_b = orthonormal(rng, 30, 6), orthonormal(rng, 30, 4)
    reference = np.sort(np.degrees(scipy.linalg.subspace_angles(u_a, u_b)))
    np.testing.assert_allclose(principal_angles(u_a, u_b), reference, atol=1e-10)
    # planted: B = A rotated by known angles into an orthogonal complement, tiny angles included
    basis = orthonormal(rng, 30, 8)
    theta = np.array([1e-7, 1e-3, 0.5, 1.2])
    rotated = basis[:, :4] * np.cos(theta) + basis[:, 4:] * np.sin(theta)
    np.testing.assert_allclose(np.radians(principal_angles(basis[:, :4], rotated)), theta, rtol=1e-7, atol=1e-14)


def test_projected_norm_from_triplets_equals_the_dense_product() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((20, 14))
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    u_r, v_r = orthonormal(rng, 20, 3), orthonormal(rng, 14, 3)
    assert projected_norm(u_r, v_r.T, u, s, vt) == pytest.approx(np.linalg.norm(u_r.T @ w @ v_r), rel=1e-12)


def peft_intruders(w: torch.Tensor, w_merged: torch.Tensor, top_k: int = 10, eps: float = 0.5) -> list[int]:
    """PEFT's lines, verbatim in substance (peft/tuners/lora/intruders.py, reduce_intruder_dimension, peft 0.21)."""
    u_base, _s_base, _v_base = torch.linalg.svd(w, full_matrices=False)
    u_merged, _s_merged, _v_merged = torch.linalg.svd(w_merged, full_matrices=False)
    cos_sim = (u_merged.T @ u_base).abs().max(dim=1).values
    return torch.where(cos_sim[:top_k] < eps)[0].tolist()


@pytest.mark.parametrize("shape", [(24, 24), (30, 18), (18, 30)])
def test_intruder_cosines_match_peft_lines(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(4)
    for trial in range(6):
        w = rng.standard_normal(shape)
        merged = w + (1.0 + trial) * rng.standard_normal((shape[0], 2)) @ rng.standard_normal((2, shape[1]))
        u_base = np.linalg.svd(w)[0][:, : min(shape)]
        u_tuned = np.linalg.svd(merged)[0][:, :10]
        ours = intruder_counts(max_cosines(u_tuned, u_base), [0.5])[0.5]
        assert ours == len(peft_intruders(torch.from_numpy(w), torch.from_numpy(merged)))


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_top_left_vectors_match_numpy_svd(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(5)
    w = (orthonormal(rng, shape[0], 20) * np.geomspace(100.0, 0.1, 20)) @ orthonormal(rng, shape[1], 20).T
    ours, reference = top_left_vectors(w, 10), np.linalg.svd(w)[0][:, :10]
    np.testing.assert_allclose(np.abs(np.sum(ours * reference, axis=0)), np.ones(10), atol=1e-10)
    np.testing.assert_allclose(ours.T @ ours, np.eye(10), atol=1e-12)


# ---------------------------------------------------------------- planted cases, end to end through checkpoints


def shared_pair(tmp_path: Path, shared: int, k: int = 8, d: tuple[int, int] = (40, 32)):  # type: ignore[no-untyped-def]
    """ΔW_A and ΔW_B of rank k whose right singular subspaces share exactly `shared` directions."""
    rng = np.random.default_rng(shared)
    m, n = d
    base, a, b = {}, {}, {}
    for layer in range(2):
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        q = orthonormal(rng, n, 2 * k - shared)
        right_a, right_b = q[:, :k], np.concatenate([q[:, :shared], q[:, k:]], axis=1)
        s = np.linspace(3.0, 1.0, k)
        w = rng.standard_normal(d)
        base[name] = w
        a[name] = w + (orthonormal(rng, m, k) * s) @ right_a.T
        b[name] = w + (orthonormal(rng, m, k) * s) @ right_b.T
    return triple(tmp_path, base, a, b)


@pytest.mark.parametrize("shared", [0, 3, 8])
def test_planted_shared_directions_give_phi_s_over_k(tmp_path: Path, shared: int) -> None:
    paths = shared_pair(tmp_path, shared)
    c = compare_finetunes(*paths, CompareSettings(top_k=(8,), intruders=False), CPU)
    assert [mc.n_a for mc in c.matrices] == [8, 8]
    for mc in c.matrices:
        assert mc.diagonal[7] == pytest.approx(shared / 8, abs=1e-10)
        assert np.sum(mc.angles[8] < 1e-4) == shared  # the shared directions are at 0°, the others at 90°
        assert np.all((mc.angles[8] < 1e-4) | (mc.angles[8] > 90 - 1e-4))
    (kind,) = c.kinds
    assert kind.diagonal[7] == pytest.approx(shared / 8, abs=1e-10) and kind.dim == 32


def test_phi_matches_an_independent_svd_of_both_updates(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    name = "model.layers.0.mlp.up_proj.weight"
    w = rng.standard_normal((36, 28))
    da, db = rng.standard_normal((36, 28)), rng.standard_normal((36, 28))
    paths = triple(tmp_path, {name: w}, {name: w + da}, {name: w + db})
    for side in ("right", "left"):
        c = compare_finetunes(*paths, CompareSettings(top_k=(5, 12), side=side, amplification_ranks=(4,)), CPU)
        (mc,) = c.matrices
        (ua, sa, vta), (ub, _, vtb) = np.linalg.svd(da), np.linalg.svd(db)
        va, vb = (vta[:12].T, vtb[:12].T) if side == "right" else (ua[:, :12], ub[:, :12])
        expected = [np.linalg.norm(va[:, :i].T @ vb[:, :i]) ** 2 / i for i in range(1, 13)]
        np.testing.assert_allclose(mc.diagonal, expected, rtol=1e-9)
        angles = np.sort(np.degrees(scipy.linalg.subspace_angles(va[:, :5], vb[:, :5])))
        np.testing.assert_allclose(mc.angles[5], angles, atol=1e-8)
        amp = np.linalg.norm(da) / np.linalg.norm(ua[:, :4].T @ w @ vta[:4].T)
        assert mc.amplification_a[4] == pytest.approx(amp, rel=1e-9)
        assert mc.captured_a == pytest.approx(np.sum(sa[:12] ** 2) / np.sum(sa**2), rel=1e-12)


def spread(basis: np.ndarray, start: int) -> np.ndarray:
    """A unit vector with equal weight on basis columns start.. (|cos| 1/√(d − start) with each of them)."""
    return basis[:, start:].sum(axis=1) / np.sqrt(basis.shape[1] - start)


def test_planted_intruders_counted_exactly(tmp_path: Path) -> None:
    """A: two strong directions orthogonal to W_base's top singular vectors → 2 intruders at ε = 0.5. B: ΔW inside
    W_base's top-10 subspace → 0 intruders."""
    rng = np.random.default_rng(8)
    m = n = 48
    base, a, b = {}, {}, {}
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        u, v = orthonormal(rng, m, m), orthonormal(rng, n, n)
        sigma = np.linspace(10.0, 1.0, m)
        w = (u * sigma) @ v.T
        p1, p2 = spread(u[:, :30], 10), spread(u[:, 30:], 0)  # orthogonal, spread over base vectors 11..48
        q1, q2 = spread(v[:, :30], 10), spread(v[:, 30:], 0)
        base[name] = w
        a[name] = w + 100.0 * np.outer(p1, q1) + 80.0 * np.outer(p2, q2)
        b[name] = w + (u[:, :10] * rng.uniform(1.0, 3.0, 10)) @ v[:, :10].T
    c = compare_finetunes(*triple(tmp_path, base, a, b), CompareSettings(top_k=(2,)), CPU)
    for mc in c.matrices:
        assert mc.intruders_a is not None and mc.intruders_b is not None
        assert mc.intruders_a.counts[0.5] == 2 and mc.intruders_b.counts[0.5] == 0
        assert mc.intruders_b.max_cos == pytest.approx(np.ones(10), abs=1e-9)
        counts = [mc.intruders_a.counts[e] for e in c.settings.epsilons]
        assert counts == sorted(counts)  # monotone in ε
    (kind,) = c.kinds
    assert kind.intruders_a[0.5] == 4 and kind.intruders_b[0.5] == 0


def test_intruders_agree_with_peft_on_a_peft_model(tmp_path: Path) -> None:
    """PEFT's own reduce_intruder_dimension, run on a LoRA model, logs each layer's intruder count; compare_finetunes
    on the same weights (merged model as A, the saved adapter as B) reports the same counts."""
    torch.manual_seed(0)
    names = ("q", "k", "v", "o")
    model = torch.nn.Sequential()
    for name in names:
        model.add_module(name, torch.nn.Linear(32, 24, bias=False, dtype=torch.float64))
    base = {f"{n}.weight": getattr(model, n).weight.detach().clone() for n in names}
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(names), init_lora_weights=False)
    lora = peft.get_peft_model(model, config)
    with torch.no_grad():
        for i, name in enumerate(names):  # updates from tiny to dominant: from 0 to several intruders
            layer = lora.base_model.model.get_submodule(name)
            layer.lora_B["default"].weight.mul_(0.3 * 3.0**i)
    merged = {
        f"{n}.weight": base[f"{n}.weight"] + lora.base_model.model.get_submodule(n).get_delta_weight("default")
        for n in names
    }
    lora.save_pretrained(str(tmp_path / "adapter"))
    logged: list[str] = []
    intruders = pytest.importorskip("peft.tuners.lora.intruders")  # peft ≥ 0.18
    intruders.reduce_intruder_dimension(lora, logging_sink=logged.append)
    expected = {}
    for line in logged:
        if ": " in line and not line.startswith("Enabling"):
            module, what = line.split(": ", 1)
            expected[module.removeprefix("base_model.model.") + ".weight"] = (
                0 if what == "No intruders" else int(what.split(": ")[1])
            )
    assert sorted(expected) == sorted(base) and len(set(expected.values())) > 1
    save_file({k: v.contiguous() for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    save_file({k: v.detach().contiguous() for k, v in merged.items()}, str(tmp_path / "merged.safetensors"))
    c = compare_finetunes(tmp_path / "base.safetensors", tmp_path / "merged.safetensors", tmp_path / "adapter",
                          CompareSettings(top_k=(4,)), CPU)  # fmt: skip
    for mc in c.matrices:
        assert mc.intruders_a is not None and mc.intruders_b is not None
        assert mc.intruders_a.counts[0.5] == expected[mc.name], mc.name
        assert mc.intruders_b.counts[0.5] == expected[mc.name], mc.name
        assert mc.diagonal[-1] == pytest.approx(1.0)  # the merged model and its adapter are the same update


def test_directions_at_the_storage_rounding_floor_are_not_compared(tmp_path: Path) -> None:
    """A rank-4 update merged into float32 weights reads as full rank (rounding noise ~1e-7·‖W‖); only the 4 real
    directions are compared. A full-rank update far above the floor keeps all its directions."""
    rng = np.random.default_rng(11)
    name = "model.layers.0.self_attn.q_proj.weight"
    w = rng.standard_normal((32, 24)).astype(np.float32)
    full = w + np.float32(0.01) * rng.standard_normal((32, 24)).astype(np.float32)
    lora = w + (0.1 * rng.standard_normal((32, 4)) @ rng.standard_normal((4, 24))).astype(np.float32)
    c = compare_finetunes(*triple(tmp_path, {name: w}, {name: full}, {name: lora}), CompareSettings(top_k=(12,)), CPU)
    (mc,) = c.matrices
    assert (mc.n_a, mc.n_b) == (24, 4) and mc.diagonal.size == 4  # all 24 directions of the full update
    assert mc.amplification_b[4] is not None and mc.amplification_b[16] is None


# ---------------------------------------------------------------- the record


def lora_vs_full(tmp_path: Path) -> tuple[Path, Path, Path]:
    rng = np.random.default_rng(9)
    base, a, b = {}, {}, {}
    for layer in range(3):
        for kind, shape in (("q_proj", (32, 24)), ("down_proj", (24, 40))):
            name = f"model.layers.{layer}.{kind}.weight"
            w = rng.standard_normal(shape)
            base[name] = w
            a[name] = w + 0.1 * rng.standard_normal(shape)  # full rank, like a full fine-tune
            b[name] = w + rng.standard_normal((shape[0], 4)) @ rng.standard_normal((4, shape[1]))  # rank 4
    return triple(tmp_path, base, a, b)


def test_record_round_trips_and_renders(tmp_path: Path) -> None:
    c = compare_finetunes(*lora_vs_full(tmp_path), CompareSettings(top_k=(2, 8)), CPU, labels=("full", "lora"))
    assert isinstance(c, Comparison) and [k.kind for k in c.kinds] == ["q_proj", "down_proj"]
    assert all(mc.n_b == 4 for mc in c.matrices) and c.kinds[0].grid.shape == (8, 4)
    assert any("at most 4 directions" in n for n in c.notes)
    path = save_record(c, tmp_path / "out" / "c.json")
    data = json.loads(path.read_text())
    assert data["format"] == "spectra.comparison/1" and len(data["matrices"]) == 6
    assert data["matrices"][0]["amplification_b"]["16"] is None  # fewer than 8 directions: null, not NaN
    again = load_record(path)
    assert isinstance(again, Comparison) and again == c
    for one, two in zip(c.kinds, again.kinds, strict=True):
        np.testing.assert_array_equal(one.grid, two.grid)
    for one, two in zip(c.matrices, again.matrices, strict=True):
        assert one.intruders_a is not None and two.intruders_a is not None
        np.testing.assert_array_equal(one.intruders_a.max_cos, two.intruders_a.max_cos)
        np.testing.assert_array_equal(one.angles[8], two.angles[8])
    html = write_record_report(again, tmp_path / "c.html").read_text()
    assert html.count("<img ") == 5 and "model.layers.2.down_proj.weight" in html and "lora" in html


# ---------------------------------------------------------------- the command, and bad inputs


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, code: int, fragment: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in lines[0], result.stderr
    assert "Traceback" not in result.output and result.stdout == ""


def test_compare_command_prints_and_writes_the_record(tmp_path: Path) -> None:
    base, a, b = lora_vs_full(tmp_path)
    out = tmp_path / "o"
    result = invoke("compare", base, a, b, "--top-k", "2,4", "--label", "full", "--label", "lora",
                    "--json", out / "c.json", "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "φ(4,4)" in result.stdout and "q_proj" in result.stdout and "intruders" in result.stdout
    assert json.loads((out / "c.json").read_text())["labels"] == ["full", "lora"]


def test_json_to_stdout_alone(tmp_path: Path) -> None:
    base, a, b = lora_vs_full(tmp_path)
    result = invoke("compare", base, a, b, "--top-k", "4", "--no-intruders", "--json", "-", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"] == "spectra.comparison/1" and data["matrices"][0]["intruders_a"] is None


@pytest.mark.slow
def test_report_rerenders_a_saved_comparison(tmp_path: Path) -> None:
    base, a, b = lora_vs_full(tmp_path)
    assert invoke("compare", base, a, b, "--json", tmp_path / "c.json", "--html", tmp_path / "c.html").exit_code == 0
    again = invoke("report", tmp_path / "c.json", "-o", tmp_path / "again.html")
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again.html").read_text().count("<img ") == (tmp_path / "c.html").read_text().count("<img ") == 5


def test_compare_needs_exactly_two_fine_tunes(tmp_path: Path) -> None:
    base, a, _ = lora_vs_full(tmp_path)
    out = tmp_path / "c.json"
    one_line_error(invoke("compare", base, a, "--json", out), 2, "exactly two fine-tunes")
    one_line_error(invoke("compare", base, a, a, a, "--json", out), 2, "exactly two fine-tunes")
    one_line_error(invoke("compare", base, a, a, "--label", "x", "--json", out), 2, "--label twice")
    assert not out.exists()


def test_different_architectures_are_refused(tmp_path: Path) -> None:
    base, a, _ = lora_vs_full(tmp_path)
    other = save({"encoder.block.0.wi.weight": np.ones((8, 8))}, tmp_path / "other.safetensors")
    out = tmp_path / "c.json"
    one_line_error(invoke("compare", base, a, other, "--json", out), 1, "same architecture")
    assert not out.exists()


def test_fine_tunes_of_disjoint_modules_have_nothing_in_common(tmp_path: Path) -> None:
    base, a, _ = lora_vs_full(tmp_path)
    tensors = load_file(str(a))
    only_q = save_file_at({k: v for k, v in tensors.items() if "q_proj" in k}, tmp_path / "q.safetensors")
    only_down = save_file_at({k: v for k, v in tensors.items() if "down_proj" in k}, tmp_path / "d.safetensors")
    with pytest.raises(MismatchError, match="no matrix in common"):
        compare_finetunes(base, only_q, only_down, options=CPU)


def save_file_at(tensors: dict[str, torch.Tensor], path: Path) -> Path:
    save_file(tensors, str(path))
    return path
