"""`spectra sweep`: exit codes 0 / 1 / 2, the table on stdout and progress on stderr, no traceback, the outputs in
-o DIR together or not at all, and `spectra report sweep.json`."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import PairFactory
from spectra_cli.app import app

runner = CliRunner()
SCRIPT = """import sys
sys.path.insert(0, {tests!r})
from test_sweep import distance
print("loading", sys.argv[1])
print(distance(*sys.argv[1:4]))
"""


def invoke(*args: str | Path):  # type: ignore[no-untyped-def]
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def evaluation(tmp_path: Path) -> str:
    script = tmp_path / "evaluate.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{model}} {{base}} {{tuned}}"


def test_sweep_prints_the_table_writes_the_folder_and_report_rerenders(
    planted_pair: PairFactory, tmp_path: Path
) -> None:
    base, tuned, _ = planted_pair(shape=(48, 40))
    out = tmp_path / "sweep out"
    args = ["sweep", base, tuned, "--eval", evaluation(tmp_path), "--ranks", "1,4,8", "--no-recommendation"]
    result = invoke(*args, "--tolerance", "0.6", "-o", out, "--cache", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    for label in ("base", "full fine-tune", "r=1", "r=4", "r=8"):
        assert label in result.stdout
    assert "recommended: r=" in result.stdout
    assert "[3/5] r=1: extract" in result.stderr and "% of gain)" in result.stderr
    assert f"wrote {out}" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "sweep.html", "sweep.json"]
    record = json.loads((out / "sweep.json").read_text())
    assert record["format"] == "spectra.sweep/1" and record["chosen"] in ("r=1", "r=4", "r=8")
    assert [p["label"] for p in record["points"]][:2] == ["base", "full fine-tune"]
    # a non-empty output folder is refused (exit 2) before anything runs; --overwrite replaces it, from the cache
    again = invoke(*args, "-o", out, "--cache", tmp_path / "cache")
    assert again.exit_code == 2 and "--overwrite" in again.stderr and again.stdout == ""
    again = invoke(*args, "-o", out, "--cache", tmp_path / "cache", "--overwrite")
    assert again.exit_code == 0 and "cached" in again.stdout
    page = tmp_path / "page.html"
    shown = invoke("report", out / "sweep.json", "-o", page)
    assert shown.exit_code == 0, shown.output
    html = page.read_text()
    assert html.count("<img") == 1 and html.count("<tr>") == 1 + 5  # header + one row per point


def test_a_failing_base_evaluation_exits_1_with_its_output_and_writes_nothing(
    planted_pair: PairFactory, tmp_path: Path
) -> None:
    base, tuned, _ = planted_pair(shape=(48, 40))
    out = tmp_path / "out"
    result = invoke("sweep", base, tuned, "--eval", "echo cannot open {model} >&2; exit 4", "-o", out, "--no-cache")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stdout == ""
    assert "error: base: the evaluation exited with status 4" in result.stderr
    assert "cannot open" in result.stderr  # the command's own output, to fix it
    assert not out.exists()


def test_bad_usage_exits_2_before_anything_runs(planted_pair: PairFactory, tmp_path: Path) -> None:
    base, tuned, _ = planted_pair(shape=(48, 40))
    for extra, fragment in (
        (["--eval", "run {checkpoint}"], "unknown placeholder {checkpoint}"),
        (["--eval", "run something"], "no {model} placeholder"),
        (["--eval", "echo 1 {model}", "--tolerance", "1.5"], "tolerance"),
        (["--eval", "echo 1 {model}", "--ranks", "four"], "--ranks"),
        (["--eval", "echo 1 {model}", "--budgets", "150%"], "budget"),
        (["--eval", "echo 1 {model}", "--adapter", "=x"], "LABEL=DIR"),
        (["--eval", "echo 1 {model}", "--adapter", "a=x", "--adapter", "a=y"], "its own label"),
    ):
        result = invoke("sweep", base, tuned, *extra, "-o", tmp_path / "o", "--no-cache")
        assert result.exit_code == 2, (extra, result.output)
        assert "Traceback" not in result.output and fragment in result.stderr
        assert not (tmp_path / "o").exists()


def test_a_trained_adapter_is_a_row_of_the_table(planted_pair: PairFactory, tmp_path: Path) -> None:
    import spectra

    base, tuned, _ = planted_pair(shape=(48, 40))
    spectra.extract(base, tuned, tmp_path / "my lora", spectra.RankRule(rank=2))
    args = ["sweep", base, tuned, "--eval", evaluation(tmp_path), "--ranks", "2,4", "--no-recommendation"]
    result = invoke(*args, "--adapter", f"mine={tmp_path / 'my lora'}", "-o", tmp_path / "o", "--no-cache")
    assert result.exit_code == 0, result.output
    assert "[5/5] mine: merge" in result.stderr and "│ mine " in result.stdout
    points = json.loads((tmp_path / "o" / "sweep.json").read_text())["points"]
    assert [p["kind"] for p in points] == ["base", "full", "uniform", "uniform", "trained"]
    assert points[-1]["energy_kept"] is None and points[-1]["metric"] == pytest.approx(points[2]["metric"], rel=1e-6)
