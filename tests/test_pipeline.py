"""analyze(): planted spectra recovered exactly for every layout and dtype; the JSON round trip is lossless."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import LAYOUTS, PairFactory, expected_rank, save_checkpoint
from spectra import Analysis, MismatchError, Options, analyze, load_analysis, save_analysis
from spectra.io.store import analysis_from_dict, analysis_to_dict
from spectra.pipeline import analyze_many

THRESHOLDS = (0.5, 0.8, 0.9, 0.99, 1.0)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_planted_ranks_are_exact_in_fp32_for_every_layout(
    planted_pair: PairFactory, layout: str, threshold: float
) -> None:
    base, tuned, spectra = planted_pair(layout=layout)
    analysis = analyze(str(base), str(tuned), Options(threshold=threshold, precision="exact"))
    got = {m.name: m.rank for m in analysis.layers}
    assert got == {name: expected_rank(s, threshold) for name, s in spectra.items()}


@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_fast_default_gives_the_same_ranks(planted_pair: PairFactory, precision: str) -> None:
    base, tuned, spectra = planted_pair(layout="shards")
    for threshold in THRESHOLDS:
        analysis = analyze(str(base), str(tuned), Options(threshold=threshold, precision=precision))
        assert {m.name: m.rank for m in analysis.layers} == {n: expected_rank(s, threshold) for n, s in spectra.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(planted_pair: PairFactory, dtype: torch.dtype) -> None:
    """Documented behaviour: with ‖ΔW‖/‖W‖ = 0.1, storage rounding leaves well-separated spectra intact
    (rank8, step at 0.9) while the noise floor is measured and small; smooth spectra may shift by a little."""
    base, tuned, spectra = planted_pair(dtype=dtype, scale=0.1)
    analysis = analyze(str(base), str(tuned), Options())
    by_name = {m.name: m for m in analysis.layers}
    for name in ("model.layers.0.mlp.rank8.weight", "model.layers.3.mlp.step.weight"):
        assert by_name[name].rank == expected_rank(spectra[name], 0.9)
    for m in analysis.layers:
        assert m.dtype in ("f16", "bf16") and 0 < m.noise_fraction < 0.05 and not m.noisy
        assert abs(m.rank - expected_rank(spectra[m.name], 0.9)) <= 2


def test_measures_and_skips(planted_pair: PairFactory) -> None:
    base, tuned, spectra = planted_pair()
    a = analyze(str(base), str(tuned), Options(lora_ranks=(2, 8)))
    assert [m.name for m in a.layers] == list(spectra)  # natural key order
    m = a.layers[0]  # rank8
    assert m.kind == "rank8" and m.layer == 0 and m.shape == (48, 40)
    assert m.relative_change == pytest.approx(0.1, rel=1e-5)
    assert m.captured[8] == pytest.approx(1.0) and m.captured[2] == pytest.approx(0.25, rel=1e-5)
    assert m.lora_params == {2: 2 * 88, 8: 8 * 88}
    assert m.stable_rank == pytest.approx(8.0, rel=1e-5) and m.effective_rank == pytest.approx(8.0, rel=1e-4)
    assert {(s.name, s.reason) for s in a.skipped} == {(f"model.layers.{i}.norm.weight", "not-2d") for i in range(4)}
    assert a.summary.overall.n == 4 and {g.key for g in a.summary.kinds} == {"rank8", "geometric", "power", "step"}
    assert a.base_info is not None and a.base_info.n_tensors == 8 and a.tuned_info.dtypes == ("f32",)


def test_json_round_trip_is_lossless(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    analysis = analyze(str(base), str(tuned))
    path = save_analysis(analysis, tmp_path / "a.json")
    data = json.loads(path.read_text())
    assert data["format"] == "spectra.analysis/1" and data["threshold"] == 0.9
    layer = data["layers"][0]
    for key in (
        "name",
        "shape",
        "rank",
        "stable_rank",
        "effective_rank",
        "spectral_norm",
        "frobenius_norm",
        "relative_change",
        "captured",
        "random_rank",
        "singular_values",
    ):
        assert key in layer
    assert set(layer["captured"]) == {"8", "16", "64", "256"}
    assert {"skipped", "summary", "recommendation"} <= set(data)
    loaded = load_analysis(path)
    assert_same(loaded, analysis)
    assert_same(analysis_from_dict(analysis_to_dict(loaded)), analysis)


def assert_same(a: Analysis, b: Analysis) -> None:
    assert a == b  # every field except the spectra (arrays compare separately)
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.s.dtype == np.float64 and np.array_equal(x.s, y.s)


def test_no_common_tensors_is_a_mismatch(tmp_path: Path) -> None:
    base = save_checkpoint({"a.weight": torch.randn(3, 3)}, tmp_path / "b")
    tuned = save_checkpoint({"z.weight": torch.randn(3, 3)}, tmp_path / "t")
    with pytest.raises(MismatchError, match="no tensor names in common"):
        analyze(str(base), str(tuned))


def test_identical_checkpoints_are_a_mismatch(tmp_path: Path) -> None:
    t = {"a.weight": torch.randn(3, 3)}
    base, tuned = save_checkpoint(t, tmp_path / "b"), save_checkpoint(t, tmp_path / "t")
    with pytest.raises(MismatchError, match="nothing changed"):
        analyze(str(base), str(tuned))


def test_saved_files_get_normal_permissions(planted_pair: PairFactory, tmp_path: Path) -> None:
    import os
    import stat

    base, tuned, _ = planted_pair()
    path = save_analysis(analyze(str(base), str(tuned)), tmp_path / "out" / "a.json")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]  # no temp file left behind


def test_resized_vocabulary_is_analysed_over_shared_rows_with_a_note(tmp_path: Path) -> None:
    """A fine-tune that added two tokens: the embedding's planted rank-3 update on the shared rows is found."""
    rng = np.random.default_rng(8)
    embed = rng.standard_normal((200, 32))
    update = rng.standard_normal((200, 3)) @ rng.standard_normal((3, 32))
    tuned_embed = np.concatenate([embed + 0.1 * update, rng.standard_normal((2, 32))])
    q = rng.standard_normal((32, 32))
    base = save_checkpoint(
        {
            "model.embed_tokens.weight": torch.from_numpy(embed).float(),
            "model.layers.0.q_proj.weight": torch.from_numpy(q).float(),
        },
        tmp_path / "b",
    )
    tuned = save_checkpoint(
        {
            "model.embed_tokens.weight": torch.from_numpy(tuned_embed).float(),
            "model.layers.0.q_proj.weight": torch.from_numpy(q + 0.1).float(),
        },
        tmp_path / "t",
    )
    analysis = analyze(str(base), str(tuned), Options(threshold=1.0))
    layer = next(lm for lm in analysis.layers if lm.name == "model.embed_tokens.weight")
    assert layer.shape == (200, 32) and layer.rank == 3
    assert any("200 → 202 rows" in note and "2 added rows" in note for note in analysis.notes)
    assert load_analysis_round_trip(analysis, tmp_path).notes == analysis.notes


def load_analysis_round_trip(analysis: Analysis, tmp_path: Path) -> Analysis:
    save_analysis(analysis, tmp_path / "a.json")
    return load_analysis(tmp_path / "a.json")


def without_timing(analysis: Analysis) -> dict[str, object]:
    data = analysis_to_dict(analysis)
    for key in ("elapsed_s", "created", "version"):
        data.pop(key)
    return data


def test_paths_may_be_path_objects_and_are_stored_as_strings(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair()
    analysis = analyze(base, tuned)  # pathlib.Path, not str
    assert analysis.base == str(base) and analysis.tuned == str(tuned) and type(analysis.base) is str
    assert without_timing(load_analysis(save_analysis(analysis, tmp_path / "a.json"))) == without_timing(analysis)
    assert without_timing(analysis) == without_timing(analyze(str(base), str(tuned)))


@pytest.fixture
def one_base_two_tuned(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A base and two fine-tunes with different planted updates; the second leaves one matrix unchanged."""
    rng = np.random.default_rng(9)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)] + ["model.layers.0.self_attn.q_proj.weight"]
    base = {n: rng.standard_normal((40, 32)) for n in names}
    tuned = [
        {n: w + 0.1 * rng.standard_normal((40, 4)) @ rng.standard_normal((4, 32)) for n, w in base.items()},
        {n: w + (0 if i == 2 else 0.05 * rng.standard_normal((40, 32))) for i, (n, w) in enumerate(base.items())},
    ]
    as_torch = lambda d: {k: torch.from_numpy(v).float() for k, v in d.items()}  # noqa: E731
    return save_checkpoint(as_torch(base), tmp_path / "base"), [
        save_checkpoint(as_torch(t), tmp_path / f"t{i}") for i, t in enumerate(tuned)
    ]


@pytest.mark.parametrize("precision", ["fast", "exact"])
def test_analyze_many_equals_each_pair_analysed_alone(
    one_base_two_tuned: tuple[Path, list[Path]], precision: str
) -> None:
    base, tuned = one_base_two_tuned
    options = Options(precision=precision, threads=2)
    sizes: list[int] = []

    def progress(items: Any) -> Any:
        sizes.append(len(items))
        return items

    many = analyze_many(base, tuned, options, progress=progress)
    assert sizes == [8]  # every matrix of both inputs, unchanged ones included
    assert [a.tuned for a in many] == [str(t) for t in tuned]
    for analysis, t in zip(many, tuned, strict=True):
        alone = analyze(base, t, options)
        assert without_timing(analysis) == without_timing(alone)
        for x, y in zip(analysis.layers, alone.layers, strict=True):
            np.testing.assert_array_equal(x.s, y.s)
    assert [s.name for s in many[1].skipped if s.reason == "unchanged"] == ["model.layers.2.mlp.up_proj.weight"]
    assert {lm.rank for lm in many[0].layers} == {4} and len(many[1].layers) == 3


def test_analyze_many_names_the_input_that_changed_nothing(
    one_base_two_tuned: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    base, tuned = one_base_two_tuned
    with pytest.raises(MismatchError, match=rf"{tmp_path / 'base'}.*nothing changed"):
        analyze_many(base, [tuned[0], base])
