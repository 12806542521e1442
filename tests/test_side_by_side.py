"""`spectra rank BASE T1 T2 …`: one stream, each input's analysis as if alone, labels, TSV, the saved record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from spectra import Options, OptionsError, SideBySide, analyze, analyze_side_by_side, load_record, save_record
from spectra_cli.app import app

OPTIONS = Options(device="cpu", threshold=0.99)
runner = CliRunner()


def inputs(tmp_path: Path, ranks: tuple[int, ...] = (4, 8)) -> tuple[Path, list[Path]]:
    """A base and one fine-tune per planted rank (every matrix's ΔW has that rank, equal σ)."""
    rng = np.random.default_rng(0)
    names = [f"model.layers.{i}.self_attn.{k}.weight" for i in range(2) for k in ("q_proj", "o_proj")]
    base = {n: rng.standard_normal((32, 24)) for n in names}
    save_file({n: torch.from_numpy(w) for n, w in base.items()}, str(tmp_path / "base.safetensors"))
    tuned = []
    for rank in ranks:
        delta = {
            n: np.linalg.qr(rng.standard_normal((32, rank)))[0] @ np.linalg.qr(rng.standard_normal((24, rank)))[0].T
            for n in names
        }
        folder = tmp_path / f"r{rank}"
        folder.mkdir()
        save_file({n: torch.from_numpy(base[n] + 0.1 * delta[n]) for n in names}, str(folder / "model.safetensors"))
        tuned.append(folder / "model.safetensors")
    return tmp_path / "base.safetensors", tuned


def test_each_analysis_equals_its_pair_alone(tmp_path: Path) -> None:
    base, tuned = inputs(tmp_path)
    record = analyze_side_by_side(base, tuned, OPTIONS)
    assert record.labels == ("r4", "r8")  # the folder names of …/NAME/model.safetensors
    for analysis, path, rank in zip(record.analyses, tuned, (4, 8), strict=True):
        alone = analyze(base, path, OPTIONS)
        assert [lm.rank for lm in analysis.layers] == [lm.rank for lm in alone.layers] == [rank] * 4
        assert analysis.layers == alone.layers
    with pytest.raises(OptionsError, match="at least two"):
        analyze_side_by_side(base, tuned[:1], OPTIONS)
    with pytest.raises(OptionsError, match="1 labels for 2"):
        analyze_side_by_side(base, tuned, OPTIONS, labels=["x"])


def test_record_round_trips(tmp_path: Path) -> None:
    base, tuned = inputs(tmp_path)
    record = analyze_side_by_side(base, tuned, OPTIONS, labels=["full", "full"])
    assert record.labels == ("full", "full (2)")  # repeats numbered so tables tell them apart
    path = save_record(record, tmp_path / "s.json")
    data = json.loads(path.read_text())
    assert (
        data["format"] == "spectra.analyses/1" and [a["format"] for a in data["analyses"]] == ["spectra.analysis/1"] * 2
    )
    again = load_record(path)
    assert isinstance(again, SideBySide) and again.labels == record.labels
    assert [a.layers for a in again.analyses] == [a.layers for a in record.analyses]


def test_rank_command_with_several_tuned(tmp_path: Path) -> None:
    base, tuned = inputs(tmp_path, (4, 8, 2))
    out = tmp_path / "s.json"
    args = ["rank", str(base), *map(str, tuned), "--label", "A", "--label", "B", "--label", "C", "--threshold", "0.99"]
    result = runner.invoke(app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    row = next(line for line in result.stdout.splitlines() if "layers.1.self_attn.o_proj" in line)
    assert [cell.strip() for cell in row.split("│") if cell.strip()] == ["layers.1.self_attn.o_proj", "4", "8", "2"]
    assert json.loads(out.read_text())["labels"] == ["A", "B", "C"]
    tsv = runner.invoke(app, [*args, "--tsv"])
    rows = [line.split("\t") for line in tsv.stdout.strip().splitlines()]
    assert rows[0][:2] == ["input", "name"] and len(rows) == 1 + 3 * 4
    assert {(r[0], r[4]) for r in rows[1:]} == {("A", "4"), ("B", "8"), ("C", "2")}


def test_rank_command_refuses_a_label_count_that_does_not_match(tmp_path: Path) -> None:
    base, tuned = inputs(tmp_path)
    out = tmp_path / "s.json"
    result = runner.invoke(app, ["rank", str(base), *map(str, tuned), "--label", "A", "--json", str(out)])
    assert result.exit_code == 2 and "1 labels for 2" in result.stderr and not out.exists()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and result.stdout == ""


@pytest.mark.slow
def test_report_rerenders_side_by_side(tmp_path: Path) -> None:
    base, tuned = inputs(tmp_path)
    out = tmp_path / "s.json"
    assert runner.invoke(app, ["rank", str(base), *map(str, tuned), "--json", str(out)]).exit_code == 0
    result = runner.invoke(app, ["report", str(out), "-o", str(tmp_path / "s.html")])
    assert result.exit_code == 0, result.output
    html = (tmp_path / "s.html").read_text()
    assert "r4" in html and "r8" in html
