"""spectra: how much rank did a fine-tune learn? Singular spectra of ΔW = W_tuned − W_base, and LoRA advice.

>>> import spectra
>>> analysis = spectra.analyze("base.safetensors", "tuned.safetensors", threshold=0.9)
>>> analysis                                   # counts, medians and the recommendation; a table in Jupyter
>>> analysis.to_pandas()                       # one row per matrix (needs the `spectra-lm[pandas]` extra)

`import spectra` is light: it loads numpy but not torch, matplotlib or jinja2. The parts that touch tensors
(`analyze`) and the HTML report writers are imported on first use (PEP 562 module __getattr__).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from importlib import metadata
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
from spectra.io.files import Interrupted, held_signals, interruptible, interrupts
from spectra.io.outputs import Outputs
from spectra.io.store import load_analysis, load_record, save_analysis, save_summary, to_json
from spectra.journal import Journal, journal_path
from spectra.lora.evaluate import Candidate, EvaluationError, Evaluator, save_sweep, shell_evaluator, sweep_json
from spectra.lora.recommend import RecommendSettings, recommend, write_adapter_config
from spectra.lora.usage import KindUse, RankUse, kind_use, rank_use, use_sentences
from spectra.names import printable
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
    Sweep,
    SweepPoint,
    SweepSettings,
)

if TYPE_CHECKING:
    from spectra.compare.run import compare_finetunes
    from spectra.compare.side_by_side import analyze_side_by_side
    from spectra.lora.extract import extract
    from spectra.lora.resize import resize
    from spectra.lora.rules import RankRule
    from spectra.lora.split import ExtractResult, ModuleResult, extraction_json, save_extraction
    from spectra.lora.sweep import sweep
    from spectra.pipeline import analyze, analyze_many
    from spectra.report.compare import write_record_report
    from spectra.report.html import write_comparison_report, write_report
    from spectra.report.sweep import sweep_html, write_sweep_report
    from spectra.trajectory import analyze_trajectory, checkpoint_list

try:
    __version__ = metadata.version("spectra-lm")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

ProgressHook = Callable[[Iterable[Any]], Iterable[Any]]  # == spectra.pipeline.ProgressHook, without loading torch

# name -> module that defines it, imported when the name is first used: torch loads with `analyze` only
_LAZY = {
    "analyze": "spectra.pipeline",
    "analyze_many": "spectra.pipeline",
    "write_report": "spectra.report.html",
    "write_comparison_report": "spectra.report.html",
    "extract": "spectra.lora.extract",
    "resize": "spectra.lora.resize",
    "merge_adapter": "spectra.peft.merge",
    "MergeResult": "spectra.peft.merge",
    "RankRule": "spectra.lora.rules",
    "ExtractResult": "spectra.lora.split",
    "ModuleResult": "spectra.lora.split",
    "save_extraction": "spectra.lora.split",
    "extraction_json": "spectra.lora.split",
    "write_record_report": "spectra.report.compare",
    "compare_finetunes": "spectra.compare.run",
    "analyze_side_by_side": "spectra.compare.side_by_side",
    "analyze_trajectory": "spectra.trajectory",
    "checkpoint_list": "spectra.trajectory",
    "sweep": "spectra.lora.sweep",
    "sweep_html": "spectra.report.sweep",
    "write_sweep_report": "spectra.report.sweep",
}


def __getattr__(name: str) -> Any:
    """The lazily imported part of the public API (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spectra' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "Analysis",
    "Candidate",
    "CheckpointError",
    "CheckpointInfo",
    "CompareSettings",
    "Comparison",
    "EvaluationError",
    "Evaluator",
    "ExtractResult",
    "GroupSummary",
    "Interrupted",
    "Intruders",
    "Journal",
    "KindComparison",
    "KindUse",
    "LayerMetrics",
    "MatrixComparison",
    "MergeResult",
    "MismatchError",
    "ModuleResult",
    "Options",
    "OptionsError",
    "Outputs",
    "PointMatrix",
    "ProgressHook",
    "RankOption",
    "RankRule",
    "RankUse",
    "RecommendSettings",
    "Recommendation",
    "SideBySide",
    "Skipped",
    "SpectraError",
    "Spectrum",
    "StepSimilarity",
    "Summary",
    "Sweep",
    "SweepPoint",
    "SweepSettings",
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
    "extract",
    "extraction_json",
    "held_signals",
    "interruptible",
    "interrupts",
    "journal_path",
    "kind_use",
    "load_analysis",
    "load_record",
    "merge_adapter",
    "printable",
    "rank_use",
    "recommend",
    "record_to_json",
    "resize",
    "save_analysis",
    "save_extraction",
    "save_record",
    "save_summary",
    "save_sweep",
    "shell_evaluator",
    "sweep",
    "sweep_html",
    "sweep_json",
    "to_json",
    "use_sentences",
    "write_adapter_config",
    "write_comparison_report",
    "write_record_report",
    "write_report",
    "write_sweep_report",
]
