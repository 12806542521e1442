"""Regenerate reports/example.html and reports/example.json from the planted pair of make_pair.py.

    python examples/make_example_report.py

The pair is written to a temporary folder (about 25 MB) and removed afterwards; the analysis runs with the default
options, exactly like `spectra rank BASE TUNED --json reports/example.json --html reports/example.html`.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from make_pair import make_pair

from spectra import analyze, save_analysis
from spectra.report.html import write_report

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base, tuned = make_pair(Path(tmp), layers=4, hidden=256, dtype="bf16")
        analysis = analyze(str(base), str(tuned))
    # the report would name a deleted temp folder: record the paths a user of make_pair.py would type instead
    assert analysis.base_info is not None
    analysis = replace(
        analysis,
        base="pair/base.safetensors",
        tuned="pair/tuned.safetensors",
        base_info=replace(analysis.base_info, path="pair/base.safetensors"),
        tuned_info=replace(analysis.tuned_info, path="pair/tuned.safetensors"),
    )
    print(save_analysis(analysis, REPORTS / "example.json"))
    print(write_report(analysis, REPORTS / "example.html"))


if __name__ == "__main__":
    main()
