"""io/store: the analysis JSON codec round-trips the records, whatever types the caller used for paths."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path, PurePosixPath

from builders import make_analysis
from conftest import PairFactory
from spectra import analyze, load_analysis, save_analysis


def test_round_trip_of_a_built_analysis(tmp_path: Path) -> None:
    analysis = make_analysis()
    assert load_analysis(save_analysis(analysis, tmp_path / "a.json")) == analysis


def test_paths_given_as_path_objects_are_saved_as_str(tmp_path: Path) -> None:
    analysis = make_analysis()
    info = replace(analysis.tuned_info, path=PurePosixPath("runs/tuned.safetensors"))  # type: ignore[arg-type]
    with_paths = replace(
        analysis,
        base=Path("runs/base.safetensors"),  # type: ignore[arg-type]
        tuned=Path("runs/tuned.safetensors"),  # type: ignore[arg-type]
        tuned_info=info,
    )
    saved = save_analysis(with_paths, tmp_path / "a.json")
    data = json.loads(saved.read_text())
    assert (data["base"], data["tuned"], data["tuned_info"]["path"]) == (
        "runs/base.safetensors",
        "runs/tuned.safetensors",
        "runs/tuned.safetensors",
    )
    loaded = load_analysis(saved)
    assert loaded.base == "runs/base.safetensors" and loaded.tuned_info.path == "runs/tuned.safetensors"


def test_analyze_with_path_objects_then_save(planted_pair: PairFactory, tmp_path: Path) -> None:
    """The reported defect: analyze(Path, Path) worked, save_analysis then failed (PosixPath not serializable)."""
    base, tuned, _ = planted_pair()
    analysis = analyze(Path(base), Path(tuned))  # type: ignore[arg-type]
    loaded = load_analysis(save_analysis(analysis, tmp_path / "a.json"))
    assert (loaded.base, loaded.tuned) == (str(base), str(tuned))
    assert [lm.rank for lm in loaded.layers] == [lm.rank for lm in analysis.layers]
