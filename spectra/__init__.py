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

from spectra.errors import CheckpointError, MismatchError, OptionsError, SpectraError
from spectra.io.files import Interrupted, interrupts
from spectra.io.outputs import Outputs
from spectra.io.store import load_analysis, save_analysis
from spectra.journal import Journal, journal_path
from spectra.lora.recommend import RecommendSettings, recommend, write_adapter_config
from spectra.names import printable
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
    from spectra.report.html import write_comparison_report, write_report

__version__ = version()

_LAZY = {"write_report": "spectra.report.html", "write_comparison_report": "spectra.report.html"}


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
    "GroupSummary",
    "Interrupted",
    "Journal",
    "LayerMetrics",
    "MismatchError",
    "Options",
    "OptionsError",
    "Outputs",
    "ProgressHook",
    "RankOption",
    "RecommendSettings",
    "Recommendation",
    "Skipped",
    "SpectraError",
    "Spectrum",
    "Summary",
    "__version__",
    "analyze",
    "analyze_many",
    "interrupts",
    "journal_path",
    "load_analysis",
    "printable",
    "recommend",
    "save_analysis",
    "write_adapter_config",
    "write_comparison_report",
    "write_report",
]
