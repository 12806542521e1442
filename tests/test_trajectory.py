"""trajectory: planted ranks that grow with the step come back in step order, Trainer folders, the cache of
analyses, φ of consecutive checkpoints, the saved record, and bad inputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from spectra import (
    Options,
    OptionsError,
    Trajectory,
    TrajectorySettings,
    analyze_trajectory,
    checkpoint_list,
    load_record,
    save_record,
)
from spectra_cli.app import app

OPTIONS = Options(device="cpu", threshold=0.99)  # rank@0.99 of r equal σ is r for r ≤ 99
SHAPE = (48, 40)
NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight",
         "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight")  # fmt: skip
runner = CliRunner()


def planted(rank: int, rng: np.random.Generator, basis: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """ΔW with `rank` equal singular values: along the first `rank` columns of `basis`, or random directions."""
    u, v = basis or (
        np.linalg.qr(rng.standard_normal((SHAPE[0], rank)))[0],
        np.linalg.qr(rng.standard_normal((SHAPE[1], rank)))[0],
    )
    return 0.05 * u[:, :rank] @ v[:, :rank].T


def write(tensors: dict[str, np.ndarray], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: torch.from_numpy(v) for k, v in tensors.items()}, str(path))
    return path


def run_folder(tmp_path: Path, ranks: dict[int, int], seed: int = 0) -> tuple[Path, Path]:
    """BASE and a Trainer output folder `run/checkpoint-<step>/model.safetensors` whose ΔW at each step has the
    planted rank (every matrix)."""
    rng = np.random.default_rng(seed)
    base = {name: rng.standard_normal(SHAPE) for name in NAMES}
    base_path = write(base, tmp_path / "base.safetensors")
    for step, rank in ranks.items():
        write(
            {n: w + planted(rank, rng) for n, w in base.items()},
            tmp_path / "run" / f"checkpoint-{step}" / "model.safetensors",
        )
    (tmp_path / "run" / "trainer_state.json").write_text("{}")
    return base_path, tmp_path / "run"


def test_checkpoint_list_orders_a_trainer_folder_by_step(tmp_path: Path) -> None:
    _, run = run_folder(tmp_path, {500: 1, 1000: 1, 50: 1})
    found = checkpoint_list([run])
    assert [step for _, step in found] == [50, 500, 1000]  # numeric, not lexicographic
    assert checkpoint_list([run / "checkpoint-500", "elsewhere/x.safetensors"]) == [
        (str(run / "checkpoint-500"), 500), ("elsewhere/x.safetensors", None)]  # fmt: skip


def test_planted_ranks_grow_8_16_32_in_step_order(tmp_path: Path) -> None:
    base, run = run_folder(tmp_path, {300: 32, 100: 8, 200: 16})
    for given in ([run], [run / "checkpoint-300", run / "checkpoint-100", run / "checkpoint-200"]):
        t = analyze_trajectory(base, given, options=OPTIONS)
        assert [p.step for p in t.points] == [100, 200, 300]
        assert [p.label for p in t.points] == ["step 100", "step 200", "step 300"]
        for point, rank in zip(t.points, (8, 16, 32), strict=True):
            assert [m.rank for m in point.matrices] == [rank] * 4
            assert [g.median_rank for g in point.summary.kinds] == [rank, rank]
        assert [g.median_rank for g in t.kind_series("up_proj")] == [8, 16, 32]  # type: ignore[union-attr]
        changes = [np.median([m.relative_change for m in p.matrices]) for p in t.points]
        assert changes == sorted(changes)  # ‖ΔW‖ grows with √rank here


def test_steps_given_order_the_points(tmp_path: Path) -> None:
    base, run = run_folder(tmp_path, {1: 16, 2: 8})
    a, b = run / "checkpoint-1", run / "checkpoint-2"
    t = analyze_trajectory(base, [a, b], TrajectorySettings(steps=(20, 10), labels=("late", "early")), OPTIONS)
    assert [(p.label, p.step, p.matrices[0].rank) for p in t.points] == [("early", 10, 8), ("late", 20, 16)]


def test_cache_reuses_analyses_and_notices_changed_files_and_options(tmp_path: Path) -> None:
    base, run = run_folder(tmp_path, {1: 4, 2: 8})
    cache = tmp_path / "cache"
    first = analyze_trajectory(base, [run], options=OPTIONS, cache=cache)
    assert [p.cached for p in first.points] == [False, False] and len(list(cache.glob("*.json"))) == 2
    again = analyze_trajectory(base, [run], options=OPTIONS, cache=cache)
    assert [p.cached for p in again.points] == [True, True]
    assert [(p.matrices, p.summary) for p in again.points] == [(p.matrices, p.summary) for p in first.points]
    target = run / "checkpoint-2" / "model.safetensors"
    os.utime(target, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns + 10**9))  # the file changed
    assert [p.cached for p in analyze_trajectory(base, [run], options=OPTIONS, cache=cache).points] == [True, False]
    other = Options(device="cpu", threshold=0.5)
    assert [p.cached for p in analyze_trajectory(base, [run], options=other, cache=cache).points] == [False, False]


def test_with_vectors_phi_is_one_for_kept_directions_and_near_chance_for_new_ones(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = {name: rng.standard_normal(SHAPE) for name in NAMES}
    basis = (np.linalg.qr(rng.standard_normal((SHAPE[0], 8)))[0], np.linalg.qr(rng.standard_normal((SHAPE[1], 8)))[0])
    scales = np.linspace(2.0, 1.0, 8)
    kept = {n: w + (basis[0] * scales) @ basis[1].T for n, w in base.items()}
    grown = {n: w + 3.0 * (basis[0] * scales) @ basis[1].T for n, w in base.items()}  # same directions, larger
    fresh = {n: w + planted(8, rng) for n, w in base.items()}  # new random directions
    paths = [write(t, tmp_path / f"c{i}.safetensors") for i, t in enumerate((kept, grown, fresh))]
    base_path = write(base, tmp_path / "base.safetensors")
    settings = TrajectorySettings(steps=(1, 2, 3), with_vectors=True, top_k=8)
    t = analyze_trajectory(base_path, paths, settings, OPTIONS)
    first, second = t.similarity
    assert (first.a, first.b, second.a, second.b) == (0, 1, 1, 2)
    assert all(v == pytest.approx(1.0) for v in first.matrices.values())
    chance = 8 / SHAPE[1]
    assert all(v < 3 * chance for v in second.matrices.values()) and second.chance["q_proj"] == chance


def test_record_round_trips(tmp_path: Path) -> None:
    base, run = run_folder(tmp_path, {1: 4, 2: 8})
    t = analyze_trajectory(base, [run], TrajectorySettings(with_vectors=True, top_k=4), OPTIONS)
    path = save_record(t, tmp_path / "t.json")
    data = json.loads(path.read_text())
    assert data["format"] == "spectra.trajectory/1" and [p["step"] for p in data["points"]] == [1, 2]
    assert isinstance(again := load_record(path), Trajectory) and again == t


def test_bad_inputs_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    base, run = run_folder(tmp_path, {1: 4, 2: 8})
    with pytest.raises(OptionsError, match="at least two"):
        analyze_trajectory(base, [run / "checkpoint-1"], options=OPTIONS)
    out = tmp_path / "out" / "t.json"
    for args, fragment in (
        (["--steps", "1,2,3"], "--steps has 3 values for 2 checkpoints"),
        (["--label", "x"], "1 labels for 2 checkpoints"),
        (["--steps", "a,b"], "comma-separated integers"),
    ):
        result = runner.invoke(app, ["trajectory", str(base), str(run), *args, "--json", str(out)])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and fragment in lines[0] and result.stdout == ""
    assert not (tmp_path / "out").exists()  # neither the record nor the cache beside it
    other = write({"encoder.wi.weight": np.ones((4, 4))}, tmp_path / "other.safetensors")
    result = runner.invoke(app, ["trajectory", str(base), str(run / "checkpoint-1"), str(other), "--json", str(out)])
    assert result.exit_code == 1 and "same architecture" in result.stderr and not out.exists()


def test_command_prints_writes_and_caches_beside_the_output(tmp_path: Path) -> None:
    base, run = run_folder(tmp_path, {10: 4, 20: 8})
    out = tmp_path / "out" / "t.json"
    result = runner.invoke(app, ["trajectory", str(base), str(run), "--json", str(out), "--threshold", "0.99"])
    assert result.exit_code == 0, result.output
    assert "step 10" in result.stdout and "step 20" in result.stdout and "up_proj" in result.stdout
    assert len(list((tmp_path / "out" / "spectra-cache").glob("analysis-*.json"))) == 2
    again = runner.invoke(app, ["trajectory", str(base), str(run), "--json", str(out), "--threshold", "0.99"])
    assert again.exit_code == 0 and "yes" in again.stdout  # the cached column


@pytest.mark.slow
def test_report_rerenders_a_saved_trajectory(tmp_path: Path) -> None:
    base, run = run_folder(tmp_path, {10: 4, 20: 8, 30: 16})
    out = tmp_path / "t.json"
    assert runner.invoke(app, ["trajectory", str(base), str(run), "--with-vectors", "--json", str(out)]).exit_code == 0
    result = runner.invoke(app, ["report", str(out), "-o", str(tmp_path / "t.html")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "t.html").read_text()
    assert html.count("<img ") == 5 and "step 30" in html
