"""spectra: how much rank did a fine-tune learn? Singular spectra of ΔW = W_tuned − W_base, and LoRA advice.

>>> from spectra import analyze, Options
>>> analysis = analyze("base.safetensors", "tuned.safetensors", Options(threshold=0.9))
>>> analysis.layers[0].rank

The HTML report writers (`write_report`, `write_comparison_report`) are imported on first use, so `import spectra`
loads no matplotlib or jinja2.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from spectra.compare.records import (
    CompareSettings,
    Comparison,
    Intruders,
    KindComparison,
    MatrixComparison,
    PointMatrix,
    SideBySide,
    StepSimilarity,
    Trajectory,
    TrajectoryPoint,
    TrajectorySettings,
    record_to_json,
    save_record,
)
from spectra.errors import CheckpointError, MismatchError, OptionsError, SpectraError
from spectra.io.store import load_analysis, load_record, save_analysis
from spectra.lora.recommend import RecommendSettings, recommend, write_adapter_config
from spectra.pipeline import ProgressHook, analyze, analyze_many, version
from spectra.records import (
    Analysis,
    CheckpointInfo,
    GroupSummary,
    LayerMetrics,
    Options,
    RankOption,
    Recommendation,
    Skipped,
    Spectrum,
    Summary,
)

if TYPE_CHECKING:
    from spectra.compare.run import compare_finetunes
    from spectra.compare.side_by_side import analyze_side_by_side
    from spectra.report.compare import write_record_report
    from spectra.report.html import write_comparison_report, write_report
    from spectra.trajectory import analyze_trajectory, checkpoint_list

__version__ = version()

_LAZY = {
    "write_report": "spectra.report.html",
    "write_comparison_report": "spectra.report.html",
    "write_record_report": "spectra.report.compare",
    "compare_finetunes": "spectra.compare.run",
    "analyze_side_by_side": "spectra.compare.side_by_side",
    "analyze_trajectory": "spectra.trajectory",
    "checkpoint_list": "spectra.trajectory",
}


def __getattr__(name: str) -> Any:
    """The lazily imported part of the public API (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spectra' has no attribute {name!r}")


__all__ = [
    "Analysis",
    "CheckpointError",
    "CheckpointInfo",
    "CompareSettings",
    "Comparison",
    "GroupSummary",
    "Intruders",
    "KindComparison",
    "LayerMetrics",
    "MatrixComparison",
    "MismatchError",
    "Options",
    "OptionsError",
    "PointMatrix",
    "ProgressHook",
    "RankOption",
    "RecommendSettings",
    "Recommendation",
    "SideBySide",
    "Skipped",
    "SpectraError",
    "Spectrum",
    "StepSimilarity",
    "Summary",
    "Trajectory",
    "TrajectoryPoint",
    "TrajectorySettings",
    "__version__",
    "analyze",
    "analyze_many",
    "analyze_side_by_side",
    "analyze_trajectory",
    "checkpoint_list",
    "compare_finetunes",
    "load_analysis",
    "load_record",
    "recommend",
    "record_to_json",
    "save_analysis",
    "save_record",
    "write_adapter_config",
    "write_comparison_report",
    "write_record_report",
    "write_report",
]
