"""spectra: how much rank did a fine-tune learn? Singular spectra of ΔW = W_tuned − W_base, and LoRA advice.

>>> from spectra import analyze, Options
>>> analysis = analyze("base.safetensors", "tuned.safetensors", Options(threshold=0.9))
>>> analysis.layers[0].rank
"""

from spectra.errors import CheckpointError, MismatchError, OptionsError, SpectraError
from spectra.io.store import load_analysis, save_analysis
from spectra.pipeline import analyze, version
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

__version__ = version()

__all__ = [
    "Analysis",
    "CheckpointError",
    "CheckpointInfo",
    "GroupSummary",
    "LayerMetrics",
    "MismatchError",
    "Options",
    "OptionsError",
    "RankOption",
    "Recommendation",
    "Skipped",
    "SpectraError",
    "Spectrum",
    "Summary",
    "__version__",
    "analyze",
    "load_analysis",
    "save_analysis",
]
