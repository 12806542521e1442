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
from spectra.io.store import load_analysis, save_analysis
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
    from spectra.lora.extract import extract
    from spectra.lora.resize import resize
    from spectra.lora.rules import RankRule
    from spectra.lora.split import ExtractResult, ModuleResult, extraction_json, save_extraction
    from spectra.report.html import write_comparison_report, write_report

__version__ = version()

_LAZY = {
    "write_report": "spectra.report.html",
    "write_comparison_report": "spectra.report.html",
    "extract": "spectra.lora.extract",
    "resize": "spectra.lora.resize",
    "RankRule": "spectra.lora.rules",
    "ExtractResult": "spectra.lora.split",
    "ModuleResult": "spectra.lora.split",
    "save_extraction": "spectra.lora.split",
    "extraction_json": "spectra.lora.split",
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
    "ExtractResult",
    "GroupSummary",
    "LayerMetrics",
    "MismatchError",
    "ModuleResult",
    "Options",
    "OptionsError",
    "ProgressHook",
    "RankOption",
    "RankRule",
    "RecommendSettings",
    "Recommendation",
    "Skipped",
    "SpectraError",
    "Spectrum",
    "Summary",
    "__version__",
    "analyze",
    "analyze_many",
    "extract",
    "extraction_json",
    "load_analysis",
    "recommend",
    "resize",
    "save_analysis",
    "save_extraction",
    "write_adapter_config",
    "write_comparison_report",
    "write_report",
]
